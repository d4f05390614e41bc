"""Pull with datajoint-link 0.11 (the system djlink succeeds): run by bench/pull.py in its own venv.

Not importable from the project: datajoint-link's package is also called
`link`. bench/pull.py runs this file by path with the venv's Python, which
puts bench/ (not the repository) first on sys.path.

    <venv>/bin/python bench/datajoint_link_pull.py '<json settings>'

prints one JSON line: {"entities": n, "seconds": s}.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time


def main() -> None:
    cfg = json.loads(sys.argv[1])
    os.environ["LINK_USER"], os.environ["LINK_PASS"] = cfg["source_user"], cfg["source_password"]
    import datajoint as dj

    dj.config.update(
        {
            "database.host": cfg["dest_host"],
            "database.user": cfg["dest_user"],
            "database.password": cfg["dest_password"],
            "database.use_tls": False,
            "safemode": False,
        }
    )
    # datajoint-link opens its connections with use_tls=None, which PyMySQL >= 1.2 turns into "SSL
    # required" against a server without TLS; the benchmark's servers have none.
    original = dj.Connection.__init__

    @functools.wraps(original)
    def without_tls(self, host, user, password, port=None, init_fun=None, use_tls=False):  # type: ignore[no-untyped-def]
        original(self, host, user, password, port=port, init_fun=init_fun, use_tls=use_tls)

    dj.Connection.__init__ = without_tls  # type: ignore[method-assign]
    from link import link  # datajoint-link's

    def declare() -> type:
        class Recording:
            """datajoint-link's copy."""

        return link(
            cfg["source_host"], cfg["source_schema"], cfg["helper_schema"], "RecordingOutbound", cfg["dest_schema"]
        )(Recording)

    table = declare()
    restriction = f"recording_id <= {int(cfg['entities'])}"
    started = time.perf_counter()
    (table().source & restriction).pull(display_progress=False)
    seconds = time.perf_counter() - started
    print(json.dumps({"entities": len(table() & restriction), "seconds": seconds}))


if __name__ == "__main__":
    main()
