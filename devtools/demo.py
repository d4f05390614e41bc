"""The README's end-to-end example: a small source table pulled through Kafka.

It brings up the local services, declares a DataJoint table with a part table
and a longblob at the source, grants a link user only datajoint-link's
privileges (plus binlog reading), runs capture, source agent and applier,
links the table from the destination side and pulls two of its three rows.

With `secure` (`./dev demo --secure`) the services run in secure mode: the
source roles authenticate to Kafka as the source site's principal, the applier
and the façade as the destination's, each limited by its ACLs.
"""

from __future__ import annotations

import os
import threading
import time

import datajoint as dj
import numpy as np

from devtools import services
from djlink.run import Role, run_roles
from foundation.config import Settings

SOURCE, HELPER, DEST = "djlink_demo_source", "djlink_demo_helper", "djlink_demo_dest"
LINK_USER, LINK_PASS = "djlink_demo", "djlink-demo-password"


def prepare_source(env: dict[str, str]) -> None:
    conn = services.admin_connection(env, "SOURCE")
    with conn.cursor() as cur:
        for db in (HELPER, SOURCE):
            cur.execute(f"DROP DATABASE IF EXISTS `{db}`")
        cur.execute(f"CREATE USER IF NOT EXISTS '{LINK_USER}'@'127.0.0.1' IDENTIFIED BY '{LINK_PASS}'")
        cur.execute(f"GRANT SELECT, REFERENCES ON `{SOURCE}`.* TO '{LINK_USER}'@'127.0.0.1'")
        cur.execute(f"GRANT ALL PRIVILEGES ON `{HELPER}`.* TO '{LINK_USER}'@'127.0.0.1'")
        cur.execute(f"GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO '{LINK_USER}'@'127.0.0.1'")
    conn.close()
    source = dj.Connection(
        f"{env['DJLINK_SOURCE_HOST']}:{env['DJLINK_SOURCE_PORT']}",
        env["DJLINK_SOURCE_USER"],
        env["DJLINK_SOURCE_PASSWORD"],
        use_tls=False,
    )
    schema = dj.Schema(SOURCE, connection=source)

    @schema
    class Recording(dj.Manual):
        definition = """
        recording_id : int
        ---
        subject : varchar(32)
        trace : longblob
        """

        class Channel(dj.Part):
            definition = """
            -> master
            channel : tinyint
            ---
            gain : double
            """

    for i in (1, 2, 3):
        Recording.insert1({"recording_id": i, "subject": f"mouse-{i}", "trace": np.arange(i * 4, dtype=float)})
        Recording.Channel.insert({"recording_id": i, "channel": c, "gain": 0.5 * c} for c in range(2))
    source.close()


def _secure_sites(operator: dict[str, str], prefix: str) -> dict[str, Settings]:
    """Each site's settings with its own Kafka principal, and its ACLs for the demo's topic prefix."""
    from foundation import acls
    from foundation.kafka import admin_client
    from foundation.topics import Topics

    sites = {site: Settings.from_env({**os.environ, **services.site_env(site)}) for site in services.SITES}
    entries = [
        entry
        for site, user in services.SITES.items()
        for entry in acls.site_acls(Topics(prefix), acls.Site(site), f"User:{user}")
    ]
    acls.apply(admin_client(Settings.from_env({**os.environ, **operator})), entries)
    return sites


def main(secure: bool = False) -> None:
    started = time.monotonic()
    env = services.up(quiet=True, secure=secure)
    conn = services.admin_connection(env, "DEST")
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{DEST}`")
    conn.close()
    prepare_source(env)
    print(f"source: {SOURCE}.recording with 3 rows and 6 part rows")

    # The source site runs capture and agent as the link user; the destination runs the applier.
    os.environ.update(env)
    os.environ.update(
        {
            "DJLINK_SOURCE_USER": LINK_USER,
            "DJLINK_SOURCE_PASSWORD": LINK_PASS,
            "DJLINK_ALLOWED_SCHEMAS": "djlink_demo_*",
            "DJLINK_TOPIC_PREFIX": f"djlink-demo-{int(time.time())}",
            "LINK_USER": LINK_USER,
            "LINK_PASS": LINK_PASS,
        }
    )
    if secure:
        sites = _secure_sites(env, os.environ["DJLINK_TOPIC_PREFIX"])
        runs = [([Role.capture, Role.agent], sites["source"]), ([Role.applier], sites["destination"])]
        os.environ.update(services.site_env("destination"))  # the notebook is at the destination site
    else:
        runs = [([Role.capture, Role.agent, Role.applier], Settings.from_env())]
    stop = threading.Event()
    failure: list[BaseException] = []
    threads = []
    for roles, settings in runs:
        ready = threading.Event()

        def pipeline(roles: list[Role] = roles, settings: Settings = settings, ready: threading.Event = ready) -> None:
            try:
                run_roles(roles, settings, stop, ready.set)
            except BaseException as exc:
                failure.append(exc)
                ready.set()

        threads.append(threading.Thread(target=pipeline, daemon=True))
        threads[-1].start()
        ready.wait(120)
        if failure:
            raise failure[0]
    how = "over SASL_SSL, one Kafka principal per site" if secure else "over PLAINTEXT"
    print(f"pipeline: capture, source agent and applier running {how} ({time.monotonic() - started:.1f} s)")

    dj.config.update(
        {
            "database.host": f"{env['DJLINK_DEST_HOST']}:{env['DJLINK_DEST_PORT']}",
            "database.user": env["DJLINK_DEST_USER"],
            "database.password": env["DJLINK_DEST_PASSWORD"],
            "database.use_tls": False,
            "loglevel": "WARNING",
        }
    )
    from link import link

    @link(f"{env['DJLINK_SOURCE_HOST']}:{env['DJLINK_SOURCE_PORT']}", SOURCE, HELPER, "Outbound", DEST)
    class Recording:
        """Recordings shared from the source lab."""

    summary = (Recording().source & "recording_id < 3").pull(display_progress=True)
    print(f"pull: {summary}")
    print(f"destination rows: {len(Recording())}")
    for row in Recording().fetch(as_dict=True):
        print(f"  recording {row['recording_id']}: {row['subject']}, trace {row['trace'].tolist()}")
    print(f"destination part rows: {len(Recording.Channel())}")
    print(f"pulled at {time.monotonic() - started:.1f} s")
    stop.set()
    for thread in threads:
        thread.join(30)
    print(f"done in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
