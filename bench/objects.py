"""Copying one external object between two stores: memory and rate of djlink's streamed copy.

Peer: reading the object whole and writing it whole, as DataJoint itself moves
objects (`Folder.get`, `Path.read_bytes`) and as djlink did before it streamed.
Both verify the content hash before the object appears. Each runs in a process
of its own, so that its peak resident memory is its own:

    python -m bench.objects              # a 256 MiB object in two `file` stores under a temporary folder
    python -m bench.objects --mib 1024
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from foundation.stores import CHUNK, ObjectError, Store, copy_object, mismatch, relative_path


def whole(row: dict[str, object], source: Store, destination: Store) -> int:
    """The peer: the object read whole, checked, written whole."""
    content = source.get(relative_path(row, "src"))
    if mismatch(row, content) is not None:
        raise ObjectError("mismatch")
    destination.put(relative_path(row, "dst"), content)
    return len(content)


def one(how: str, folder: Path, mib: int) -> None:
    """Child process: make the object, copy it `how`, print seconds and the growth of peak RSS."""
    source = Store("raw", {"protocol": "file", "location": str(folder / "source")})
    destination = Store("archive", {"protocol": "file", "location": str(folder / how)})
    path = folder / "source" / "raw" / "object.dat"
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.md5()
    with open(path, "wb") as f:
        for _ in range(mib * (1 << 20) // CHUNK):
            block = os.urandom(CHUNK)
            digest.update(block)
            f.write(block)
    row = {"hash": b"\0" * 16, "filepath": "raw/object.dat", "contents_hash": digest.digest(), "size": mib << 20}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    copied = copy_object(row, source, "src", destination, "dst") if how == "djlink" else whole(row, source, destination)
    seconds = time.perf_counter() - started
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert copied == mib << 20
    print(f"{seconds} {grown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="size of the object in MiB (default 256)")
    parser.add_argument("--child", choices=["djlink", "whole"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        one(args.child, Path(args.folder), args.mib)
        return
    figures = {}
    with tempfile.TemporaryDirectory(prefix="djlink-bench-objects-") as folder:
        for how in ("whole", "djlink"):
            out = subprocess.run(
                [sys.executable, "-m", "bench.objects", "--child", how, "--folder", folder, "--mib", str(args.mib)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            figures[how] = (float(out[0]), float(out[1]))
    for how, label in (("whole", "read whole, write whole (the peer)"), ("djlink", "djlink, streamed")):
        seconds, grown = figures[how]
        print(f"{label}: {args.mib / seconds:,.0f} MiB/s, peak memory grew {grown:,.1f} MiB ({args.mib} MiB object)")
    print(
        f"ratio djlink / peer: rate {figures['whole'][0] / figures['djlink'][0]:.2f}x, "
        f"peak memory {figures['djlink'][1] / max(figures['whole'][1], 0.1):.3f}x"
    )


if __name__ == "__main__":
    main()
