"""The fault tests, run as a survey: a table of faults injected, entities checked, lost, duplicated, recovery time.

    python -m bench.faults                       # each fault test once; prints the table
    python -m bench.faults --runs 3              # three runs of each (the table has one row per run)
    python -m bench.faults --runs 3 --write-docs # and puts the table into docs/faults.md
    python -m bench.faults --help

It runs `tests/integration/test_faults.py`,
`tests/integration/test_operator_faults.py` and
`tests/integration/test_cluster.py` (which starts a three-broker cluster of
its own) with pytest over the development services (`python -m devtools.services up` first, as `./dev test` does), each
test appending one record to a file (tests/conftest.py: `record_fault`):
the fault and how many were injected, `djlink verify`'s tally once the
pipeline was equal again (entities compared; lost: missing or with rows
missing or changed; duplicated: there but not shared, or with rows the source
does not have), and the recovery time, from the end of the fault (the service
back, the role started again, the last kill) to verify equal, the test's own
work after the fault included. A test that fails is a row of its own, marked
FAILED: the table never hides one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/integration/test_faults.py",
    "tests/integration/test_operator_faults.py",
    "tests/integration/test_cluster.py",
]
DOC = ROOT / "docs" / "faults.md"
BEGIN, END = "<!-- figures: python -m bench.faults -->", "<!-- end of figures -->"


def run_once(extra: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """One pytest run of the fault tests: the records they wrote, and the tests that failed."""
    with tempfile.TemporaryDirectory() as tmp:
        report, junit = Path(tmp) / "faults.jsonl", Path(tmp) / "junit.xml"
        env = dict(os.environ, DJLINK_FAULT_REPORT=str(report))
        argv = [sys.executable, "-m", "pytest", *TESTS, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *extra]
        subprocess.run(argv, env=env, cwd=ROOT, check=False)
        records = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
        failed = re.findall(r'<testcase [^>]*name="([^"]+)"[^>]*>\s*<(?:failure|error)', junit.read_text())
    return records, failed


def table(rows: list[dict[str, Any]], failed: list[str]) -> list[str]:
    lines = [
        "| fault | injected | entities checked | lost | duplicated | recovery (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['injected']} | {r['checked']} | {r['lost']} | {r['duplicated']} | {r['recovery_s']} |"
        )
    lines += [f"| FAILED: {name} | | | | | |" for name in failed]
    return lines


def write_docs(lines: list[str], runs: int) -> None:
    text = DOC.read_text()
    block = "\n".join([BEGIN, f"Produced by `python -m bench.faults --runs {runs}`:", "", *lines, END])
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n## Figures\n\n" + block + "\n"
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="runs of each fault test (default 1)")
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/faults.md")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (e.g. -k purged)")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    for n in range(args.runs):
        print(f"run {n + 1} of {args.runs}", file=sys.stderr)
        records, broken = run_once(args.pytest_args)
        rows += records
        failed += broken
    rows.sort(key=lambda r: r["kind"])
    lines = table(rows, failed)
    print("\n".join(lines))
    lost = sum(r["lost"] + r["duplicated"] for r in rows)
    print(f"\n{len(rows)} faults survived, {len(failed)} tests failed, {lost} entities lost or duplicated")
    if args.write_docs:
        write_docs(lines, args.runs)
    sys.exit(1 if failed or lost else 0)


if __name__ == "__main__":
    main()
