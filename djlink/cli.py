"""The `djlink` command: run the services of a site, bring local services up, run the demo.

djlink run --role capture --role agent     # source site
djlink run --role applier                  # destination site
djlink status                              # where the capture has committed up to
djlink verify [LINK] [--json]              # the destination equals what the source shares, byte for byte
djlink dead-letters [--json]               # what the applier gave up, why, and what to do
djlink resnapshot [LINK]                   # after a purged binlog: capture from now, every shared entity read again
djlink grants --role R --user U            # the MariaDB grants a role needs, as GRANT statements
djlink acls --site S --principal User:P    # the Kafka ACLs a site needs (--apply creates them)
djlink services up|down|status|env         # local MariaDB x2 + Kafka for development
djlink demo [--secure]                     # the README's end-to-end example
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import traceback
from collections.abc import Iterator

import pymysql
import typer

from djlink.health import Readiness, configure_logging, serve
from djlink.process import READY
from djlink.run import Role, run_roles
from foundation.config import ConfigError, Settings
from foundation.kafka import refusal

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)


def expected_error(exc: BaseException) -> str | None:
    """A one-line message for failures a user can cause and fix; None for bugs."""
    from cdc.preconditions import PreconditionError
    from cdc.streaming import BinlogUnavailable, UnsupportedTransaction
    from devtools.services import ServiceError
    from djlink.verify.command import UnknownLink
    from foundation.catalog import UnknownTable
    from foundation.grants import MissingGrant
    from foundation.stores import StoreError
    from foundation.tls import TlsError
    from foundation.topics import KafkaUnavailable

    expected = (
        PreconditionError, ConfigError, ServiceError, KafkaUnavailable, UnsupportedTransaction, TlsError,
        MissingGrant, UnknownLink, UnknownTable, StoreError, BinlogUnavailable,
    )  # fmt: skip
    if isinstance(exc, expected):
        return str(exc)
    refused = refusal(exc)
    if refused:
        return refused
    if isinstance(exc, pymysql.err.OperationalError):
        code = exc.args[0] if exc.args else 0
        if code == 1045:
            return f"database refused the login: {exc.args[1]} (check DJLINK_*_USER / DJLINK_*_PASSWORD)"
        if code in (2002, 2003):
            return f"cannot reach the database: {exc.args[1]} (check DJLINK_*_HOST / DJLINK_*_PORT)"
        if code in (1142, 1143, 1227, 1044, 1370):
            return f"missing privilege: {exc.args[1]} (docs/security.md lists each role's grants)"
        return f"database error {code}: {exc.args[1] if len(exc.args) > 1 else exc}"
    return None


@contextlib.contextmanager
def user_errors(show_bugs: bool = False) -> Iterator[None]:
    """Turn an expected failure into one line on stderr and exit code 1; let bugs through."""
    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:
        message = expected_error(exc)
        if message is None:
            if not show_bugs:
                raise
            traceback.print_exc()
            message = f"{type(exc).__name__}: {exc}"
        print(f"error: {message}", file=sys.stderr)
        raise typer.Exit(1) from None


@app.command()
def run(
    role: list[Role] = typer.Option(
        [Role.capture, Role.agent, Role.applier], "--role", "-r", help="services to run (repeat); default all"
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log at DEBUG level"),
) -> None:
    """Run djlink services until interrupted. Configured by DJLINK_* variables (see README)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with user_errors(show_bugs=True):
        try:
            settings = Settings.from_env()
            configure_logging(settings.log_format, verbose)
            readiness = Readiness()
            if settings.metrics_port:
                serve(settings.metrics_port, readiness)

            def ready() -> None:
                readiness.ready()
                print(READY, flush=True)

            run_roles(list(role), settings, stop, ready, readiness.failed)
        except KeyboardInterrupt:
            stop.set()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def services(ctx: typer.Context, action: str = typer.Argument(..., help="up, down [--purge], status or env")) -> None:
    """Start or stop the local development services (two MariaDB servers and Kafka)."""
    from devtools import services as svc

    raise typer.Exit(svc.main([action, *ctx.args]))


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json", help="one JSON object, for scripts"),
    max_lag: int = typer.Option(
        -1, "--max-lag", help="exit 5 when the applier is more than this many messages behind (-1: never)"
    ),
) -> None:
    """Where the capture has committed up to and how far the applier is behind, read from Kafka (no role need run
    here). Exit code 3 when the capture has never run on this prefix, 5 when --max-lag is exceeded."""
    import json

    from djlink import status as pipeline
    from foundation.topics import Admin

    with user_errors():
        settings = Settings.from_env()
        Admin(settings).check()
        found = pipeline.read(settings)
    if as_json:
        print(json.dumps(found.as_json(), sort_keys=True))
    else:
        for line in found.lines():
            print(line)
    if found.capture_gtid is None:
        raise typer.Exit(3)
    if 0 <= max_lag < found.applier_lag:
        raise typer.Exit(5)


@app.command()
def verify(
    link: list[str] = typer.Argument(None, help="link ids (helper_db.helper_table); none: every link"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object, for scripts"),
    progress: bool = typer.Option(
        None, "--progress/--no-progress", help="a progress bar on stderr (default: when stderr is a terminal)"
    ),
    object_contents: bool = typer.Option(
        True,
        "--object-contents/--no-object-contents",
        help="read each object at the destination store "
        "(DJLINK_DEST_STORES) and check it against its tracking row; the tracking rows are compared either way",
    ),
    chunk_size: int = typer.Option(1000, "--chunk-size", min=1, help="entities per checksum"),
) -> None:
    """Prove that every shared entity at the destination equals its source rows (master and parts, byte for
    byte; objects by their recorded hashes) and that nothing unshared is there: each server computes checksums
    of chunks of keys in a read-only snapshot, and differences are drilled down to the row and column.

    Exit code 0 when every link is equal, 4 when one is not.
    """
    import json

    from djlink.verify import command, report
    from djlink.verify.compare import Options

    show = sys.stderr.isatty() if progress is None else progress
    with user_errors():
        settings = Settings.from_env()
        results = [
            command.verify_link(settings, spec, Options(chunk_size=chunk_size), object_contents, show)
            for spec in command.links(settings, link or [])
        ]
    if as_json:
        print(json.dumps(report.as_json(results), sort_keys=True))
    else:
        for line in report.lines(results, settings.topic_prefix):
            print(line)
    raise typer.Exit(report.exit_code(results))


@app.command()
def resnapshot(
    link: list[str] = typer.Argument(None, help="link ids (helper_db.helper_table); none: every link"),
) -> None:
    """Recover a capture whose binlog position the source server purged (the capture says so and stops): the
    capture resumes at the source's current position, and every entity the links share is read again when it
    starts, so the destination catches up with what the lost binlog held. Run it at the source site with the
    capture stopped, start the capture, then run `djlink verify` (docs/faults.md)."""
    from cdc.resnapshot import resnapshot as start_over
    from djlink.verify import command

    with user_errors():
        settings = Settings.from_env()
        done = start_over(settings, command.links(settings, link or []))
    entities = sum(done.entities.values())
    print(
        f"the capture will resume at GTID position {done.gtid_position!r} and read again {entities} entities "
        f"of {len(done.entities)} link(s) ({done.request_id}); start it, then run `djlink verify`"
    )


@app.command("dead-letters")
def dead_letters(
    as_json: bool = typer.Option(False, "--json", help="one JSON object per record, original key and value in base64"),
) -> None:
    """List what the applier dead-lettered (one line per unit or message: when, stage, what, why) and what to do.

    Exit code 0 when there is none, 4 when there is some.
    """
    from djlink import deadletters
    from foundation.topics import Admin

    with user_errors():
        settings = Settings.from_env()
        Admin(settings).check()
        topic, records = deadletters.read(settings)
    lines = (
        (deadletters.as_json(r) for r in records)
        if as_json
        else deadletters.report(deadletters.summarize(records), topic)
    )
    for line in lines:
        print(line)
    raise typer.Exit(4 if records else 0)


@app.command()
def acls(
    site: str = typer.Option(..., "--site", help="source (capture and agent) or destination (applier and façade)"),
    principal: str = typer.Option(..., "--principal", help="the site's Kafka principal, e.g. User:lab-a"),
    apply: bool = typer.Option(
        False, "--apply", help="create them, with the DJLINK_KAFKA_* credentials of an operator allowed to alter ACLs"
    ),
) -> None:
    """The Kafka ACLs a site's principal needs for this deployment (DJLINK_TOPIC_PREFIX), and nothing more:
    printed as kafka-acls.sh commands, or created with --apply. See docs/security.md."""
    from foundation import acls as entries
    from foundation.kafka import admin_client
    from foundation.topics import Topics

    with user_errors():
        if site not in {s.value for s in entries.Site}:
            raise ConfigError(f"--site must be source or destination, not {site!r}")
        if not principal.startswith("User:"):
            raise ConfigError(f"--principal is a Kafka principal such as User:lab-a, not {principal!r}")
        settings = Settings.from_env()
        wanted = entries.site_acls(Topics(settings.topic_prefix), entries.Site(site), principal)
        if apply:
            entries.apply(admin_client(settings), wanted)
            print(f"{len(wanted)} ACL entries for {principal} on prefix {settings.topic_prefix!r} are in place")
        else:
            print("\n".join(entries.commands(wanted, settings.kafka_bootstrap)))


@app.command()
def grants(
    role: str = typer.Option(..., "--role", help="capture, agent, applier or facade (the link user)"),
    user: str = typer.Option(..., "--user", help="the role's database account, e.g. \"'djlink-capture'@'%'\""),
    source_schema: str = typer.Option("<source_schema>", "--source-schema", help="the linked table's schema"),
    helper_schema: str = typer.Option("<helper_schema>", "--helper-schema", help="the link's helper schema"),
    destination_schema: str = typer.Option("<destination_schema>", "--destination-schema", help="the copy's schema"),
    state_db: str = typer.Option("djlink_applier", "--state-db", help="the applier's DJLINK_APPLIER_STATE_DB"),
) -> None:
    """The MariaDB grants a role's database user needs for one link, and nothing more, as GRANT statements
    (the source server's for capture, agent and facade; the destination's for applier). See docs/security.md."""
    from foundation.grants import RoleName, role_grants

    with user_errors():
        if role not in {r.value for r in RoleName}:
            raise ConfigError(f"--role must be capture, agent, applier or facade, not {role!r}")
        for g in role_grants(RoleName(role), source_schema, helper_schema, destination_schema, state_db):
            print(f"{g.statement(user)};  -- {g.why}")


@app.command()
def demo(
    secure: bool = typer.Option(
        False, "--secure", help="Kafka in secure mode: SASL_SSL only, a SCRAM principal per site, ACLs on"
    ),
) -> None:
    """Bring up local services, run the pipeline, pull a small table through Kafka, print what arrived."""
    from devtools import demo as demo_module

    with user_errors():
        demo_module.main(secure)


def main() -> None:
    app()
