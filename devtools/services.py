"""Start and stop the three local servers that djlink's tests and demos run against.

djlink needs a *source* MariaDB server whose binlog it reads, a separate
*destination* MariaDB server it writes to, and a Kafka broker between them.
This machine has no Docker, so this module runs them as plain local processes:

- source MariaDB: its own datadir, ``log_bin`` with ``binlog_format=ROW``,
  ``binlog_row_image=FULL``, ``binlog_row_metadata=FULL`` (without it the
  binlog reader cannot name columns), ``server_id=1``, ``gtid_domain_id=0``,
  binlog files purged after a day;
- destination MariaDB: a second ``mariadbd`` with ``server_id=2``, no binlog;
- Kafka: one KRaft node (broker and controller) from the Maven Central jars of
  ``org.apache.kafka:kafka_2.13`` (see ``devtools/kafka/pom.xml``), with
  replication factor and min ISR 1 for the internal topics, so that consumer
  groups and transactional producers work on a single node; or, with
  ``up --brokers 3``, a cluster of three such nodes (each a broker and a
  controller voter, 512 MB heaps) with ``default.replication.factor=3`` and
  ``min.insync.replicas=2``, the internal topics likewise. The count is kept
  in the state dir until another ``--brokers`` changes it, which starts the
  Kafka data afresh (a KRaft quorum's voters are fixed when it is formatted).

Everything binds to 127.0.0.1 on free ports chosen once (by binding port 0)
and kept in the state dir, ``<project root>/.djlink/`` unless ``DJLINK_STATE_DIR``
says otherwise. ``mariadbd`` runs with ``--no-defaults`` so that the system's
``/etc/mysql`` configuration never leaks in. Each server keeps its data, socket,
pid file and logs under its own folder of the state dir; the Kafka jars are
cached in ``<statedir>/kafka-lib`` and survive ``down --purge``.

Credentials: each MariaDB server gets a random root password, generated when its
datadir is created and kept in ``<statedir>/state.json``; ``root`` may log in
over TCP from 127.0.0.1 with it. Where the services are is written to
``<statedir>/services.env`` (``KEY=value`` lines) and ``<statedir>/services.json``
with the keys ``DJLINK_SOURCE_{HOST,PORT,USER,PASSWORD}``,
``DJLINK_DEST_{HOST,PORT,USER,PASSWORD}`` and ``DJLINK_KAFKA_BOOTSTRAP``.

Usage::

    python -m devtools.services up        # start what is not running; prints export lines
    python -m devtools.services status    # what runs where (exit 3 if not all run)
    eval "$(python -m devtools.services env)"
    python -m devtools.services down [--purge]

``up`` installs what is missing (``mariadb-server``, Java, Maven through
apt-get when run as root; the Kafka jars through Maven) and is idempotent.
From Python: :func:`up`, :func:`down`, :func:`load_env`; errors a user can hit
are :class:`ServiceError` with a one-line message.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymysql
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from foundation.config import Settings

__all__ = [
    "ENV_KEYS",
    "KAFKA_SECURITY_KEYS",
    "SITES",
    "TLS_ENV_KEYS",
    "ServiceError",
    "down",
    "load_env",
    "site_env",
    "state_dir",
    "status",
    "up",
]

HOST = "127.0.0.1"
PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
KAFKA_POM = PACKAGE_DIR / "kafka" / "pom.xml"
REGISTRY_SOURCES = (PACKAGE_DIR / "registry" / "pom.xml", PACKAGE_DIR / "registry" / "application.properties")
KAFKA_LOG4J = PACKAGE_DIR / "kafka" / "log4j2.properties"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

MARIADB_START_TIMEOUT = 60.0
KAFKA_START_TIMEOUT = 120.0
REGISTRY_START_TIMEOUT = 120.0
REGISTRY = "registry"
REGISTRY_LABEL = "schema registry"
STOP_TIMEOUT = 30.0
BINLOG_KEEP_S = 86_400  # the local source server purges binlog files older than this
POLL_INTERVAL = 0.2
SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes; stay clear of it

# Both local servers offer TLS with a certificate from a CA made at the first start; clients verify it.
TLS_ENV_KEYS = ("DJLINK_SOURCE_TLS", "DJLINK_SOURCE_TLS_CA", "DJLINK_DEST_TLS", "DJLINK_DEST_TLS_CA")
# What a Kafka client needs on the broker's SASL_SSL listener (librdkafka properties, DJLINK_KAFKA_<PROPERTY>).
KAFKA_SECURITY_KEYS = (
    "DJLINK_KAFKA_SECURITY_PROTOCOL",
    "DJLINK_KAFKA_SASL_MECHANISM",
    "DJLINK_KAFKA_SASL_USERNAME",
    "DJLINK_KAFKA_SASL_PASSWORD",
    "DJLINK_KAFKA_SSL_CA_LOCATION",
)
ENV_KEYS = (
    "DJLINK_SOURCE_HOST",
    "DJLINK_SOURCE_PORT",
    "DJLINK_SOURCE_USER",
    "DJLINK_SOURCE_PASSWORD",
    "DJLINK_DEST_HOST",
    "DJLINK_DEST_PORT",
    "DJLINK_DEST_USER",
    "DJLINK_DEST_PASSWORD",
    "DJLINK_KAFKA_BOOTSTRAP",
    *TLS_ENV_KEYS,
)

log = logging.getLogger(__name__)
# librdkafka's messages while polling a broker that is not up yet go here, not to stderr.
log.addHandler(logging.NullHandler())


class ServiceError(Exception):
    """A local service cannot be installed, started or stopped; the message is for the user."""


@dataclass(frozen=True)
class _MariaDB:
    """One of the two MariaDB servers: what differs between source and destination."""

    name: str  # folder under the state dir and key in state.json
    label: str  # for messages
    env_prefix: str
    server_id: int
    binlog: bool


SOURCE = _MariaDB("source", "source MariaDB", "DJLINK_SOURCE", server_id=1, binlog=True)
DEST = _MariaDB("dest", "destination MariaDB", "DJLINK_DEST", server_id=2, binlog=False)
MARIADBS = (SOURCE, DEST)
KAFKA = "kafka"  # the first Kafka node; the others of a cluster are kafka-2, kafka-3, ...
KAFKA_LABEL = "Kafka broker"
MAX_BROKERS = 5


def kafka_nodes(count: int) -> list[str]:
    """The names (folders, keys of state.json's ports) of a local Kafka of `count` nodes, node id = position + 1."""
    return [KAFKA, *(f"{KAFKA}-{i}" for i in range(2, count + 1))]


def _broker_count(state: dict[str, Any]) -> int:
    return int(state.get("kafka_brokers", 1))


def _kafka_label(name: str, count: int) -> str:
    return KAFKA_LABEL if count == 1 else f"{KAFKA_LABEL} {kafka_nodes(count).index(name) + 1}"


# The broker's principals: its own (inter-broker and controller traffic, and the operator: a super user, PLAIN),
# and one per site (SCRAM-SHA-512), whose ACLs for the default topic prefix are made at every start.
KAFKA_ADMIN = "admin"
SITES = {"source": "djlink-source", "destination": "djlink-dest"}
DEFAULT_PREFIX = "djlink"


# --------------------------------------------------------------------------- paths and state


def state_dir() -> Path:
    """The folder holding data, logs and pid files of the services (``DJLINK_STATE_DIR``)."""
    configured = os.environ.get("DJLINK_STATE_DIR")
    return Path(configured).expanduser().resolve() if configured else PROJECT_ROOT / ".djlink"


def _pid_file(sd: Path, name: str) -> Path:
    return sd / name / "pid"


def _socket_path(sd: Path, db: _MariaDB) -> Path:
    path = sd / db.name / "mariadb.sock"
    if len(str(path)) <= SOCKET_PATH_MAX:
        return path
    digest = hashlib.sha1(str(sd).encode()).hexdigest()[:12]
    return Path("/tmp") / f"djlink-{digest}-{db.name}.sock"


def _load_state(sd: Path) -> dict[str, Any]:
    path = sd / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _save_state(sd: Path, state: dict[str, Any]) -> None:
    _write_atomic(sd / "state.json", json.dumps(state, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _locked(sd: Path) -> Iterator[None]:
    """Serialise ``up``/``down`` of one state dir across processes."""
    sd.mkdir(parents=True, exist_ok=True)
    with open(sd / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _env_from_state(sd: Path, state: dict[str, Any], site: str | None = None) -> dict[str, str]:
    """The clients' settings: in the default mode plain Kafka; in secure mode (or for a `site`) the SASL_SSL
    listener with the operator's (or that site's) SCRAM principal."""
    env: dict[str, str] = {}
    for db in MARIADBS:
        env[f"{db.env_prefix}_HOST"] = HOST
        env[f"{db.env_prefix}_PORT"] = str(state["ports"][db.name])
        env[f"{db.env_prefix}_USER"] = "root"
        env[f"{db.env_prefix}_PASSWORD"] = state["passwords"][db.name]
        env[f"{db.env_prefix}_TLS"] = "verify"
        env[f"{db.env_prefix}_TLS_CA"] = str(_tls_paths(sd)["ca"])
    nodes = kafka_nodes(_broker_count(state))
    env["DJLINK_KAFKA_BOOTSTRAP"] = ",".join(f"{HOST}:{state['ports'][n]}" for n in nodes)
    if site is None and not state.get("kafka_secure"):
        return {k: env[k] for k in ENV_KEYS}
    user = SITES[site] if site else KAFKA_ADMIN
    env |= {
        "DJLINK_KAFKA_BOOTSTRAP": ",".join(f"{HOST}:{state['ports'][f'{n}_sasl']}" for n in nodes),
        "DJLINK_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "DJLINK_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512" if site else "PLAIN",
        "DJLINK_KAFKA_SASL_USERNAME": user,
        "DJLINK_KAFKA_SASL_PASSWORD": state["kafka_users"][user],
        "DJLINK_KAFKA_SSL_CA_LOCATION": str(_tls_paths(sd)["ca"]),
    }
    return {k: env[k] for k in (*ENV_KEYS, *KAFKA_SECURITY_KEYS)}


# --------------------------------------------------------------------------- TLS


def _tls_paths(sd: Path) -> dict[str, Path]:
    folder = sd / "tls"
    return {
        "ca": folder / "ca.pem",
        "ca_key": folder / "ca.key",
        "cert": folder / "server.pem",
        "key": folder / "server.key",
        "broker": folder / "broker.pem",  # the server key and certificate in one file, Kafka's PEM keystore
    }


def _ensure_certs(sd: Path, say: Callable[[str], None]) -> dict[str, Path]:
    """A local CA and a server certificate for 127.0.0.1 signed by it (both servers use it), made once."""
    paths = _tls_paths(sd)
    if all(p.exists() for k, p in paths.items() if k != "broker"):
        _write_atomic(paths["broker"], paths["key"].read_text() + paths["cert"].read_text())
        return paths
    openssl = _ensure_tool(sd, "openssl", "openssl", say)
    folder = paths["ca"].parent
    folder.mkdir(parents=True, exist_ok=True)
    extensions = folder / "server.ext"
    extensions.write_text(
        f"subjectAltName=IP:{HOST}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    steps = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-subj", "/CN=djlink local CA",
         "-keyout", str(paths["ca_key"]), "-out", str(paths["ca"])],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={HOST}",
         "-keyout", str(paths["key"]), "-out", str(folder / "server.csr")],
        [openssl, "x509", "-req", "-in", str(folder / "server.csr"), "-CA", str(paths["ca"]),
         "-CAkey", str(paths["ca_key"]), "-CAcreateserial", "-days", "3650", "-extfile", str(extensions),
         "-out", str(paths["cert"])],
    ]  # fmt: skip
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise ServiceError(f"openssl could not make the local TLS certificates: {done.stderr.strip()[-300:]}")
    for key in ("ca_key", "key"):
        paths[key].chmod(0o600)
    _write_atomic(paths["broker"], paths["key"].read_text() + paths["cert"].read_text())
    return paths


def _write_env_files(sd: Path, env: dict[str, str]) -> None:
    _write_atomic(sd / "services.json", json.dumps(env, indent=2) + "\n")
    _write_atomic(sd / "services.env", "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))


def _export_lines(env: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


# --------------------------------------------------------------------------- ports


def _free_ports(count: int) -> list[int]:
    """Ports the kernel hands out for port 0, all held open until each is chosen."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- processes


def _pid_alive(pid: int, marker: str) -> bool:
    """True if ``pid`` runs, is not a zombie, and its command line contains ``marker``.

    The marker (a datadir or properties path) guards against a recycled pid.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and marker in cmdline.decode(errors="replace")


def _running_pid(sd: Path, name: str, marker: str) -> int | None:
    try:
        pid = int(_pid_file(sd, name).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid, marker) else None


def _spawn(argv: list[str], log_path: Path, cwd: Path) -> int:
    """Start ``argv`` as a daemon (new session, reparented away from us); return its pid.

    The short-lived ``sh`` forks the server in the background and exits, so the
    server outlives the caller (the CLI, or a test process) and never becomes
    the caller's zombie.
    """
    script = 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'
    done = subprocess.run(
        ["/bin/sh", "-c", script, "sh", str(log_path), *argv],
        cwd=cwd,
        start_new_session=True,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip())


_THROWABLE = re.compile(r"^(Caused by: )?[\w.$]+(Exception|Error)\b")


def _log_sizes(paths: tuple[Path, ...]) -> dict[Path, int]:
    """Where each log ends now, so that a failure is explained from what this start wrote."""
    return {p: p.stat().st_size if p.exists() else 0 for p in paths}


def _failure_cause(logs: dict[Path, int]) -> str:
    """The most telling line written to the logs since the given offsets.

    Preference: the root cause of a Java exception, the first MariaDB/log4j
    ERROR line (later ones are consequences, like "Aborting"), the last line.
    """
    for path, offset in logs.items():
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            continue
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        throwables = [ln for ln in lines if _THROWABLE.match(ln)]
        causes = [ln for ln in throwables if ln.startswith("Caused by: ")]
        errors = [ln for ln in lines if "[ERROR]" in ln or " ERROR " in ln]
        for line in causes[-1:] or throwables[:1] or errors[:1] or lines[-1:]:
            return line[:300]
    return "nothing in its log"


def _wait_ready(
    label: str,
    probe: Callable[[], bool],
    pid: int,
    marker: str,
    logs: dict[Path, int],
    timeout: float,
) -> None:
    """Poll ``probe`` until it answers; fail early if the process dies."""
    deadline = time.monotonic() + timeout
    main_log = next(iter(logs))
    while not probe():
        if not _pid_alive(pid, marker):
            raise ServiceError(f"{label} exited during start ({_failure_cause(logs)}); see {main_log}")
        if time.monotonic() > deadline:
            raise ServiceError(f"{label} (pid {pid}) did not answer within {timeout:.0f}s; see {main_log}")
        time.sleep(POLL_INTERVAL)


def _stop(pids: dict[str, tuple[int, str]], timeout: float = STOP_TIMEOUT) -> list[str]:
    """SIGTERM every pid, wait up to ``timeout``, SIGKILL what is left; return names killed."""
    for pid, _ in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    waiting = dict(pids)
    while waiting and time.monotonic() < deadline:
        waiting = {n: pm for n, pm in waiting.items() if _pid_alive(*pm)}
        if waiting:
            time.sleep(POLL_INTERVAL)
    for pid, _ in waiting.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return list(waiting)


# --------------------------------------------------------------------------- installing


def _find_exe(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _apt_install(sd: Path, packages: list[str], missing: str, say: Callable[[str], None]) -> None:
    """Install Debian packages with apt-get, or explain how when we cannot."""
    command = f"apt-get install -y {' '.join(packages)}"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ServiceError(f"{missing}; install it with: {command}")
    say(f"{missing}: running apt-get update && {command}")
    apt_log = sd / "apt.log"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = [
        (
            ["apt-get", "update"],
            "apt-get update failed (is the package mirror reachable?)",
        ),
        (["apt-get", "install", "-y", *packages], f"{command} failed"),
    ]
    with open(apt_log, "ab") as out:
        for argv, failure in steps:
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
            if done.returncode != 0:
                raise ServiceError(f"{failure}; see {apt_log}")


def _ensure_mariadb(sd: Path, say: Callable[[str], None]) -> tuple[str, str]:
    """Paths of ``mariadbd`` and ``mariadb-install-db``, installing mariadb-server if needed."""
    mariadbd, install_db = _find_exe("mariadbd"), _find_exe("mariadb-install-db")
    if mariadbd and install_db:
        return mariadbd, install_db
    _apt_install(sd, ["mariadb-server"], "mariadbd not found", say)
    # The package may start the system server on port 3306; we never use it.
    subprocess.run(["service", "mariadb", "stop"], capture_output=True, check=False)
    mariadbd, install_db = _find_exe("mariadbd"), _find_exe("mariadb-install-db")
    if not (mariadbd and install_db):
        raise ServiceError("mariadb-server was installed but mariadbd or mariadb-install-db is still missing")
    return mariadbd, install_db


def _ensure_tool(sd: Path, name: str, package: str, say: Callable[[str], None]) -> str:
    found = _find_exe(name)
    if not found:
        _apt_install(sd, [package], f"{name} not found", say)
        found = _find_exe(name)
    if not found:
        raise ServiceError(f"{name} not found even after installing {package}")
    return found


def _kafka_lib(sd: Path, say: Callable[[str], None]) -> Path:
    """The folder of Kafka jars, resolved by Maven from the pom when missing or out of date."""
    lib = sd / "kafka-lib"
    pom_hash = hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()
    marker = lib / ".pom.sha256"
    if marker.exists() and marker.read_text().strip() == pom_hash and any(lib.glob("kafka_2.13-*.jar")):
        return lib
    mvn = _ensure_tool(sd, "mvn", "maven", say)
    say(f"fetching the Kafka jars with Maven into {lib}")
    tmp = sd / "kafka-lib.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    maven_log = sd / "maven.log"
    with open(maven_log, "wb") as out:
        done = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(KAFKA_POM),
                f"{DEPENDENCY_PLUGIN}:copy-dependencies",
                f"-DoutputDirectory={tmp}",
                "-DincludeScope=runtime",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=sd,
            check=False,
        )
    if done.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
        raise ServiceError(f"Maven could not fetch the Kafka jars (is Maven Central reachable?); see {maven_log}")
    (tmp / ".pom.sha256").write_text(pom_hash + "\n")
    shutil.rmtree(lib, ignore_errors=True)
    os.replace(tmp, lib)
    return lib


# --------------------------------------------------------------------------- MariaDB


def _mariadb_probe(port: int, password: str) -> str:
    """``"ready"`` (root logs in over TCP), ``"unprovisioned"`` (server answers, login refused) or ``"down"``."""
    try:
        conn = pymysql.connect(host=HOST, port=port, user="root", password=password, connect_timeout=2)
    except pymysql.err.OperationalError as exc:
        return "unprovisioned" if exc.args and exc.args[0] in (1045, 1130) else "down"
    except pymysql.err.MySQLError:
        return "down"
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        return "ready"
    except pymysql.err.MySQLError:
        return "down"
    finally:
        conn.close()


def _mariadb_argv(mariadbd: str, sd: Path, db: _MariaDB, port: int) -> list[str]:
    folder = sd / db.name
    argv = [
        mariadbd,
        "--no-defaults",  # must come first
        "--user=root",
        f"--datadir={folder / 'data'}",
        f"--socket={_socket_path(sd, db)}",
        f"--pid-file={_pid_file(sd, db.name)}",
        f"--log-error={folder / 'error.log'}",
        f"--port={port}",
        f"--bind-address={HOST}",
        "--skip-name-resolve",
        f"--server-id={db.server_id}",
        "--gtid-domain-id=0",
        "--character-set-server=utf8mb4",
        "--innodb-buffer-pool-size=64M",
        "--innodb-log-file-size=32M",
        # AIO contexts are a kernel-wide budget that a shared host can run out
        # of; InnoDB's own I/O threads are as fast for a test-sized server.
        "--innodb-use-native-aio=0",
        "--max-allowed-packet=64M",
        # TLS offered (not required): clients verify the certificate against the local CA (DJLINK_*_TLS_CA).
        f"--ssl-ca={_tls_paths(sd)['ca']}",
        f"--ssl-cert={_tls_paths(sd)['cert']}",
        f"--ssl-key={_tls_paths(sd)['key']}",
    ]
    if db.binlog:
        argv += [
            "--log-bin=mariadb-bin",
            "--binlog-format=ROW",
            "--binlog-row-image=FULL",
            "--binlog-row-metadata=FULL",
            # Tests and benchmarks write gigabytes of binlog; a day of it is plenty for a development source
            # (a capture stopped longer than that starts again from DJLINK_CAPTURE_START_GTID or the end).
            f"--binlog-expire-logs-seconds={BINLOG_KEEP_S}",
            "--max-binlog-size=256M",
        ]
    return argv


def _init_datadir(install_db: str, sd: Path, db: _MariaDB) -> None:
    """Create the datadir once; build it aside and rename, so a crash never leaves half of one.

    The bootstrap runs with native AIO off: io_uring/libaio contexts are a
    kernel-wide budget that a busy shared host can exhaust, and a bootstrap
    gains nothing from them. A failure is retried once (a transient resource
    shortage), then reported with the line of the log that says why.
    """
    data = sd / db.name / "data"
    if data.exists():
        return
    tmp = sd / db.name / "data.tmp"
    install_log = sd / db.name / "install.log"
    argv = [
        install_db,
        "--no-defaults",
        f"--datadir={tmp}",
        "--user=root",
        "--auth-root-authentication-method=normal",
        "--skip-test-db",
        "--skip-name-resolve",
        "--innodb-use-native-aio=0",
    ]
    for _attempt in range(2):
        shutil.rmtree(tmp, ignore_errors=True)
        with open(install_log, "ab") as out:
            offsets = {install_log: out.tell()}
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
        if done.returncode == 0:
            os.replace(tmp, data)
            return
    raise ServiceError(f"mariadb-install-db failed for the {db.label} ({_failure_cause(offsets)}); see {install_log}")


def _provision_root(sd: Path, db: _MariaDB, password: str) -> None:
    """Give every root account the password; a fresh datadir has root without one."""
    conn = pymysql.connect(
        unix_socket=str(_socket_path(sd, db)),
        user="root",
        password="",
        connect_timeout=5,
    )
    try:
        with conn.cursor() as cur:
            # Keep the account setup out of the binlog that the capture reads.
            cur.execute("SET SESSION sql_log_bin = 0")
            cur.execute("CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'")
            cur.execute("GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION")
            cur.execute("SELECT host FROM mysql.global_priv WHERE user = 'root'")
            for (host,) in cur.fetchall():
                if host in ("localhost", "127.0.0.1", "::1"):
                    cur.execute("ALTER USER 'root'@%s IDENTIFIED BY %s", (host, password))
                else:  # root@<hostname>: ignored with skip-name-resolve, and passwordless
                    cur.execute("DROP USER 'root'@%s", (host,))
            cur.execute("FLUSH PRIVILEGES")
    finally:
        conn.close()


# --------------------------------------------------------------------------- Kafka


def _kafka_properties(sd: Path, state: dict[str, Any], node: str = KAFKA) -> str:
    """A Kafka node's configuration. A SASL_SSL listener always (SCRAM for the sites, PLAIN for the broker itself
    and the operator), with the StandardAuthorizer; in the default mode also a PLAINTEXT listener whose
    unauthenticated clients are super users, for development and the tests. Every node of a cluster is a broker
    and a controller voter."""
    data = sd / node / "data"
    ports, secure = state["ports"], bool(state.get("kafka_secure"))
    nodes = kafka_nodes(_broker_count(state))
    node_id = nodes.index(node) + 1
    voters = ",".join(f"{i}@{HOST}:{ports[f'{n}_controller']}" for i, n in enumerate(nodes, 1))
    replicas = min(3, len(nodes))  # what a production cluster would ask for, as far as there are brokers
    min_isr = min(2, len(nodes))
    tls = _tls_paths(sd)
    admin_password = state["kafka_users"][KAFKA_ADMIN]
    plain = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'username="{KAFKA_ADMIN}" password="{admin_password}" user_{KAFKA_ADMIN}="{admin_password}";'
    )
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    listeners = [f"SASL_SSL://{HOST}:{ports[f'{node}_sasl']}"]
    if not secure:
        listeners.insert(0, f"PLAINTEXT://{HOST}:{ports[node]}")
    super_users = [f"User:{KAFKA_ADMIN}"] + ([] if secure else ["User:ANONYMOUS"])
    return "\n".join(
        [
            "# Written by devtools.services on every start; edits are overwritten.",
            "process.roles=broker,controller",
            f"node.id={node_id}",
            f"controller.quorum.voters={voters}",
            f"listeners={','.join(listeners)},CONTROLLER://{HOST}:{ports[f'{node}_controller']}",
            f"advertised.listeners={','.join(listeners)}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=SASL_SSL",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:SASL_SSL",
            "sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256,PLAIN",
            "sasl.mechanism.inter.broker.protocol=PLAIN",
            "sasl.mechanism.controller.protocol=PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms=PLAIN",
            f"listener.name.controller.plain.sasl.jaas.config={plain}",
            f"listener.name.sasl_ssl.plain.sasl.jaas.config={plain}",
            f"listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={scram}",
            f"listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config={scram}",
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={tls['broker']}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={tls['ca']}",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            f"super.users={';'.join(super_users)}",
            "allow.everyone.if.no.acl.found=false",
            f"log.dirs={data}",
            "num.partitions=1",
            f"default.replication.factor={replicas}",
            f"min.insync.replicas={min_isr}",
            "auto.create.topics.enable=true",
            "# No more replicas than nodes for the internal topics, or groups and transactions hang.",
            f"offsets.topic.replication.factor={replicas}",
            "offsets.topic.num.partitions=8",
            f"transaction.state.log.replication.factor={replicas}",
            f"transaction.state.log.min.isr={min_isr}",
            "transaction.state.log.num.partitions=8",
            f"share.coordinator.state.topic.replication.factor={replicas}",
            f"share.coordinator.state.topic.min.isr={min_isr}",
            "group.initial.rebalance.delay.ms=0",
            "# Light on a small machine: fewer threads, a 32 MB (not 128 MB) log-cleaner buffer.",
            "num.network.threads=2",
            "num.io.threads=4",
            "num.recovery.threads.per.data.dir=1",
            "log.cleaner.dedupe.buffer.size=33554432",
            "",
        ]
    )


def _java_argv(java: str, sd: Path, lib: Path, heap: str, main: list[str], node: str = KAFKA) -> list[str]:
    """The JVM options of kafka-server-start.sh (its heap fixed, G1 starting marking at 35 %): with a 512 MB
    heap that could grow, G1's concurrent marking took more CPU than the broker's request handlers."""
    return [
        java,
        f"-Xmx{heap}",
        f"-Xms{heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
        f"-Dkafka.logs.dir={sd / node / 'logs'}",
        "-cp",
        f"{lib}/*",
        *main,
    ]


def _format_kafka(java: str, sd: Path, lib: Path, cluster_id: str, node: str = KAFKA) -> None:
    """Format a node's KRaft log dir once (``meta.properties`` marks it done); every node of a cluster alike."""
    if (sd / node / "data" / "meta.properties").exists():
        return
    format_log = sd / node / "format.log"
    props = sd / node / "server.properties"
    main = [
        "kafka.tools.StorageTool",
        "format",
        "-t",
        cluster_id,
        "-c",
        str(props),
        "--ignore-formatted",
    ]
    with open(format_log, "wb") as out:
        done = subprocess.run(
            _java_argv(java, sd, lib, "256m", main, node),
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode != 0:
        raise ServiceError(f"formatting the Kafka log dir failed ({_failure_cause({format_log: 0})}); see {format_log}")


def _new_cluster_id() -> str:
    while True:
        cid = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _kafka_admin_config(sd: Path, state: dict[str, Any], node: str | None = None) -> dict[str, Any]:
    """The operator's client settings (the super user, over the SASL_SSL listener, which every mode has), to the
    whole cluster or to one `node` only."""
    env = _env_from_state(sd, {**state, "kafka_secure": True})
    properties = Settings.from_env(env).kafka_properties
    bootstrap = env["DJLINK_KAFKA_BOOTSTRAP"] if node is None else f"{HOST}:{state['ports'][f'{node}_sasl']}"
    return {**properties, "bootstrap.servers": bootstrap, "logger": log}


def _provision_kafka(sd: Path, state: dict[str, Any]) -> None:
    """The sites' SCRAM principals (their passwords from state.json) and their ACLs for the default prefix."""
    from confluent_kafka.admin import (
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialAlteration,
        UserScramCredentialUpsertion,
    )

    from foundation import acls
    from foundation.topics import Topics

    admin = AdminClient(_kafka_admin_config(sd, state))
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192)
    upserts: list[UserScramCredentialAlteration] = [
        UserScramCredentialUpsertion(user, info, state["kafka_users"][user].encode()) for user in SITES.values()
    ]
    try:
        for future in admin.alter_user_scram_credentials(upserts, request_timeout=30).values():
            future.result(timeout=30)
        topics = Topics(DEFAULT_PREFIX)
        for site, user in SITES.items():
            acls.apply(admin, acls.site_acls(topics, acls.Site(site), f"User:{user}"))
    except KafkaException as exc:
        raise ServiceError(f"could not make the Kafka principals and their ACLs: {exc.args[0]}") from None


def _kafka_probe(sd: Path, state: dict[str, Any], node: str = KAFKA) -> Callable[[], bool]:
    """A readiness probe: the node answers and the cluster's metadata lists it as an (unfenced) broker."""
    admin: list[AdminClient] = []
    port = state["ports"][f"{node}_sasl"]
    node_id = kafka_nodes(_broker_count(state)).index(node) + 1

    def probe() -> bool:
        if not _port_open(port):
            return False
        if not admin:
            admin.append(AdminClient(_kafka_admin_config(sd, state, node)))
        try:
            return node_id in admin[0].list_topics(timeout=1).brokers
        except KafkaException:  # not answering yet
            return False

    return probe


# --------------------------------------------------------------------------- schema registry


def _registry_jar(sd: Path, say: Callable[[str], None]) -> Path:
    """The runnable registry, built by Maven from devtools/registry when missing or out of date."""
    build = sd / "registry-build"
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in REGISTRY_SOURCES)).hexdigest()
    marker = build / ".sources.sha256"
    jars = list((build / "target").glob("*-runner.jar"))
    if marker.exists() and marker.read_text().strip() == digest and jars:
        return jars[0]
    mvn = _ensure_tool(sd, "mvn", "maven", say)
    say(f"building the schema registry (Apicurio Registry, from Maven Central) in {build}")
    shutil.rmtree(build, ignore_errors=True)
    (build / "src" / "main" / "resources").mkdir(parents=True)
    shutil.copy(REGISTRY_SOURCES[0], build / "pom.xml")
    shutil.copy(REGISTRY_SOURCES[1], build / "src" / "main" / "resources" / "application.properties")
    maven_log = sd / "registry-maven.log"
    with open(maven_log, "wb") as out:
        done = subprocess.run(
            [mvn, "-q", "-B", "package", "-DskipTests", "-Dcheckstyle.skip", "-Denforcer.skip"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=build,
            check=False,
        )
    jars = list((build / "target").glob("*-runner.jar"))
    if done.returncode != 0 or not jars:
        raise ServiceError(f"Maven could not build the schema registry (is Maven Central reachable?); see {maven_log}")
    marker.write_text(digest + "\n")
    return jars[0]


def _registry_probe(port: int) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health/ready", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    return probe


def registry_up(quiet: bool = False) -> str:
    """Start the local Confluent-compatible schema registry unless it runs; return its URL.

    Not one of the three services `up` starts: only the tests of the
    registry mode need it (it is built once, some 40 s, and takes ~250 MB).
    """

    def say(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    sd = state_dir()
    with _locked(sd):
        marker = str(sd / "registry-build")
        state_file = sd / REGISTRY / "registry.json"
        pid = _running_pid(sd, REGISTRY, marker)
        if pid is not None and state_file.exists():
            port = int(json.loads(state_file.read_text())["port"])
        else:
            jar = _registry_jar(sd, say)
            java = _ensure_tool(sd, "java", "default-jre-headless", say)
            [port] = _free_ports(1)
            (sd / REGISTRY).mkdir(exist_ok=True)
            log_path = sd / REGISTRY / "registry.log"
            say(f"starting the {REGISTRY_LABEL} on {HOST}:{port}")
            argv = [java, "-Xmx256m", f"-Dquarkus.http.host={HOST}", f"-Dquarkus.http.port={port}", "-jar", str(jar)]
            pid = _spawn(argv, log_path, jar.parent)
            _pid_file(sd, REGISTRY).write_text(f"{pid}\n")
            _write_atomic(state_file, json.dumps({"port": port}))
            _wait_ready(REGISTRY_LABEL, _registry_probe(port), pid, marker, {log_path: 0}, REGISTRY_START_TIMEOUT)
    return f"http://{HOST}:{port}/apis/ccompat/v7"


# --------------------------------------------------------------------------- status


def _markers(sd: Path) -> dict[str, str]:
    """Per service, a string its command line must contain (it is our process)."""
    markers = {db.name: f"--datadir={sd / db.name / 'data'}" for db in MARIADBS}
    for node in kafka_nodes(_broker_count(_load_state(sd))):
        markers[node] = str(sd / node / "server.properties")
    return markers


def _labels(sd: Path) -> dict[str, str]:
    count = _broker_count(_load_state(sd))
    return {**{db.name: db.label for db in MARIADBS}, **{n: _kafka_label(n, count) for n in kafka_nodes(count)}}


def _running(sd: Path) -> dict[str, int]:
    """Services whose pid file names a live process of ours, by name."""
    found = {name: _running_pid(sd, name, marker) for name, marker in _markers(sd).items()}
    return {name: pid for name, pid in found.items() if pid is not None}


def admin_connection(env: Mapping[str, str], side: str, **extra: Any) -> Any:
    """An autocommit connection to the SOURCE or DEST server with the credentials in `env` (DJLINK_* keys)."""
    return Settings.from_env(env).database(side).connect(**{"autocommit": True, **extra})


def binlog_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """python-mysql-replication's `connection_settings` for the source server in `env`."""
    return Settings.from_env(env).source.binlog_settings()


def load_env() -> dict[str, str] | None:
    """Where the services are (the ``services.json`` keys), or None unless all three run and listen."""
    sd = state_dir()
    path = sd / "services.json"
    if not path.exists() or len(_running(sd)) < len(_markers(sd)):
        return None
    env: dict[str, str] = json.loads(path.read_text())
    if not set(ENV_KEYS) <= set(env):
        return None
    ports = [int(env[f"{db.env_prefix}_PORT"]) for db in MARIADBS]
    ports += [int(address.rsplit(":", 1)[1]) for address in env["DJLINK_KAFKA_BOOTSTRAP"].split(",")]
    return env if all(_port_open(p) for p in ports) else None


def site_env(site: str) -> dict[str, str]:
    """The settings of one site's roles (`source` or `destination`): the services' env with that site's Kafka
    principal on the SASL_SSL listener (in either mode)."""
    if load_env() is None:
        raise ServiceError("services are not running; start them with `djlink services up`")
    if site not in SITES:
        raise ServiceError(f"no site {site!r}: choose one of {', '.join(SITES)}")
    sd = state_dir()
    return _env_from_state(sd, _load_state(sd), site)


def status() -> dict[str, str]:
    """One line per service: running (pid, address) or stopped."""
    sd = state_dir()
    state, running = _load_state(sd), _running(sd)
    lines = {}
    labels = _labels(sd)
    for name, label in labels.items():
        pid = running.get(name)
        port = state.get("ports", {}).get(name)
        lines[name] = f"{label}: running, pid {pid}, {HOST}:{port}" if pid else f"{label}: stopped"
    for node in kafka_nodes(_broker_count(state)):
        if running.get(node):
            plain = f"PLAINTEXT {HOST}:{state['ports'][node]}"
            if state.get("kafka_secure"):
                plain = "no PLAINTEXT listener (secure mode)"
            sasl = state["ports"][f"{node}_sasl"]
            lines[node] = f"{labels[node]}: running, pid {running[node]}, SASL_SSL {HOST}:{sasl}, {plain}"
    return lines


# --------------------------------------------------------------------------- up and down


def _assign_ports(state: dict[str, Any], running: dict[str, int]) -> None:
    """Keep each persisted port unless its service is stopped and the port is taken; pick new ones else."""
    ports: dict[str, int] = state.setdefault("ports", {})
    owners = {db.name: db.name for db in MARIADBS}
    for node in kafka_nodes(_broker_count(state)):
        owners |= {node: node, f"{node}_controller": node, f"{node}_sasl": node}
    stale = [
        key
        for key, owner in owners.items()
        if key not in ports or (owner not in running and not _port_free(ports[key]))
    ]
    for key, port in zip(stale, _free_ports(len(stale)), strict=True):
        ports[key] = port


def _prepare_state(sd: Path, running: dict[str, int]) -> dict[str, Any]:
    """Load state.json and fill in what a start needs: ports, root passwords, the Kafka cluster id."""
    state = _load_state(sd)
    passwords: dict[str, str] = state.setdefault("passwords", {})
    for db in MARIADBS:
        if db.name not in passwords and (sd / db.name / "data").exists():
            raise ServiceError(
                f"{db.label} has a datadir but no recorded root password in {sd / 'state.json'}; "
                "run `python -m devtools.services down --purge` to start afresh"
            )
        passwords.setdefault(db.name, secrets.token_urlsafe(18))
    state.setdefault("kafka_cluster_id", _new_cluster_id())
    users: dict[str, str] = state.setdefault("kafka_users", {})
    for user in (KAFKA_ADMIN, *SITES.values()):
        users.setdefault(user, secrets.token_urlsafe(18))
    _assign_ports(state, running)
    _save_state(sd, state)
    return state


def _start_mariadbs(sd: Path, dbs: list[_MariaDB], ports: dict[str, int], say: Callable[[str], None]) -> dict[str, int]:
    """Create missing datadirs and spawn ``mariadbd`` for each of ``dbs``; return their pids."""
    if not dbs:
        return {}
    mariadbd, install_db = _ensure_mariadb(sd, say)
    _ensure_certs(sd, say)
    pids = {}
    for db in dbs:
        (sd / db.name).mkdir(parents=True, exist_ok=True)
        _init_datadir(install_db, sd, db)
        say(f"starting {db.label} on {HOST}:{ports[db.name]}")
        argv = _mariadb_argv(mariadbd, sd, db, ports[db.name])
        pids[db.name] = _spawn(argv, sd / db.name / "console.log", sd / db.name)
        _pid_file(sd, db.name).write_text(f"{pids[db.name]}\n")
    return pids


def _start_kafka(sd: Path, state: dict[str, Any], say: Callable[[str], None], node: str = KAFKA) -> int:
    """Fetch the jars if needed, write the config, format once and spawn a Kafka node; return its pid."""
    java = _ensure_tool(sd, "java", "default-jre-headless", say)
    lib = _kafka_lib(sd, say)
    ports = state["ports"]
    count = _broker_count(state)
    props = sd / node / "server.properties"
    (sd / node / "logs").mkdir(parents=True, exist_ok=True)
    _write_atomic(props, _kafka_properties(sd, state, node))  # 0600: it holds the broker's own password
    _format_kafka(java, sd, lib, state["kafka_cluster_id"], node)
    say(f"starting {_kafka_label(node, count)} on {HOST}:{ports[node]}")
    heap = "1g" if count == 1 else "512m"  # three nodes beside both MariaDB servers on a small machine
    pid = _spawn(
        _java_argv(java, sd, lib, heap, ["kafka.Kafka", str(props)], node),
        sd / node / "stdout.log",
        sd / node,
    )
    _pid_file(sd, node).write_text(f"{pid}\n")
    return pid


def _log_paths(sd: Path, name: str) -> tuple[Path, ...]:
    """A service's logs, the one to read first (and to point the user to) first."""
    if name.startswith(KAFKA):
        return sd / name / "logs" / "server.log", sd / name / "stdout.log"
    return sd / name / "error.log", sd / name / "console.log"


def _readiness(sd: Path, name: str, state: dict[str, Any]) -> tuple[Callable[[], bool], float]:
    """How to tell that a service answers, and how long to wait for it."""
    port = state["ports"][name]
    if name.startswith(KAFKA):
        return _kafka_probe(sd, state, name), KAFKA_START_TIMEOUT
    password = state["passwords"][name]
    return (lambda: _mariadb_probe(port, password) != "down"), MARIADB_START_TIMEOUT


def up(quiet: bool = False, secure: bool = False, brokers: int | None = None) -> dict[str, str]:
    """Start whatever of the three services is not running, wait until all answer, return their env.

    `brokers`: how many Kafka nodes (None: as many as before, 1 at first); a new count starts Kafka's data afresh.

    Idempotent: services that already run and answer are left alone (the broker is restarted, keeping its data,
    when its configuration changes, e.g. into or out of `secure` mode: no PLAINTEXT listener, every client
    authenticated). Raises :class:`ServiceError` with a one-line message if something cannot start.
    """
    started_at = time.monotonic()

    def say(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    sd = state_dir()
    with _locked(sd):
        running = _running(sd)
        # A server started before the launcher offered TLS (the services' settings now tell clients to verify
        # it) is restarted, keeping its data and port.
        markers = _markers(sd)
        plain = {
            db.name: (running[db.name], markers[db.name])
            for db in MARIADBS
            if db.name in running and not _pid_alive(running[db.name], "--ssl-cert=")
        }
        if plain:
            say(f"restarting {', '.join(_labels(sd)[n] for n in plain)} to offer TLS")
            _stop(plain)
            for name in plain:
                running.pop(name)
        old = _broker_count(_load_state(sd))
        if brokers is not None and brokers != old:
            if not 1 <= brokers <= MAX_BROKERS:
                raise ServiceError(f"--brokers must be 1 to {MAX_BROKERS}, not {brokers}")
            if any((sd / n / "data").exists() for n in kafka_nodes(max(old, brokers))):
                say(f"switching the local Kafka from {old} to {brokers} broker(s): its topics start afresh")
            _stop({n: (running.pop(n), markers[n]) for n in kafka_nodes(old) if n in running})
            for node in kafka_nodes(max(old, brokers)):
                shutil.rmtree(sd / node / "data", ignore_errors=True)
            switched = _load_state(sd)
            switched["kafka_brokers"] = brokers
            _save_state(sd, switched)
        state = _prepare_state(sd, running)
        state["kafka_secure"] = secure
        _save_state(sd, state)
        _ensure_certs(sd, say)
        nodes = kafka_nodes(_broker_count(state))
        changed = [
            node
            for node in nodes
            if node in running
            and (
                not (props := sd / node / "server.properties").exists()
                or props.read_text() != _kafka_properties(sd, state, node)
            )
        ]
        if changed:
            why = "in secure mode" if secure else "with its new configuration"
            say(f"restarting Kafka ({len(nodes)} node(s)) {why}")
            _stop({n: (running.pop(n), markers[n]) for n in nodes if n in running})
        labels = _labels(sd)
        to_start = [name for name in labels if name not in running]
        logs = {name: _log_sizes(_log_paths(sd, name)) for name in labels}
        pids = dict(running)
        pids |= _start_mariadbs(sd, [db for db in MARIADBS if db.name in to_start], state["ports"], say)
        for node in nodes:
            if node in to_start:
                pids[node] = _start_kafka(sd, state, say, node)

        # All spawned first, so the waits overlap; a running service may still be starting.
        markers = _markers(sd)
        for name, label in labels.items():
            probe, timeout = _readiness(sd, name, state)
            _wait_ready(label, probe, pids[name], markers[name], logs[name], timeout)
        for db in MARIADBS:
            port, password = state["ports"][db.name], state["passwords"][db.name]
            if _mariadb_probe(port, password) == "unprovisioned":
                _provision_root(sd, db, password)
            if _mariadb_probe(port, password) != "ready":
                raise ServiceError(f"root cannot log in to the {db.label} over TCP; see {sd / db.name / 'error.log'}")
        _provision_kafka(sd, state)

        env = _env_from_state(sd, state)
        _write_env_files(sd, env)
    elapsed = time.monotonic() - started_at
    if to_start:
        say(f"services up in {elapsed:.1f}s (started: {', '.join(labels[n] for n in to_start)})")
    else:
        say(f"services already running (checked in {elapsed:.1f}s)")
    return env


def down(purge: bool = False) -> None:
    """Stop the three services (SIGTERM, then SIGKILL after a timeout); keep their data unless ``purge``.

    ``purge`` deletes the whole state dir except the Kafka jar cache.
    """
    sd = state_dir()
    if not sd.exists():
        return
    with _locked(sd):
        markers = _markers(sd)
        pids = {name: (pid, markers[name]) for name, pid in _running(sd).items()}
        registry = _running_pid(sd, REGISTRY, str(sd / "registry-build"))
        if registry is not None:
            pids[REGISTRY] = (registry, str(sd / "registry-build"))
            _pid_file(sd, REGISTRY).unlink(missing_ok=True)
        for name in _stop(pids):
            print(
                f"warning: {_labels(sd).get(name, REGISTRY_LABEL)} did not stop within {STOP_TIMEOUT:.0f}s; killed",
                file=sys.stderr,
            )
        for name in markers:
            _pid_file(sd, name).unlink(missing_ok=True)
        for name in ("services.env", "services.json"):
            (sd / name).unlink(missing_ok=True)
        if purge:
            for db in MARIADBS:
                _socket_path(sd, db).unlink(missing_ok=True)
            for entry in sd.iterdir():
                if entry.name in ("kafka-lib", "registry-build", ".lock"):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.services", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up_cmd = commands.add_parser("up", help="start what is not running; print export lines")
    up_cmd.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    up_cmd.add_argument(
        "--secure",
        action="store_true",
        help="Kafka only on its SASL_SSL listener (SCRAM principals per site, ACLs on); without it a PLAINTEXT "
        "listener serves unauthenticated clients as super users, for development",
    )
    up_cmd.add_argument(
        "--brokers",
        type=int,
        metavar="N",
        help="Kafka nodes (default: as many as last time, 1 at first); 3 is a cluster with replication factor 3 "
        "and min.insync.replicas 2. A new count starts Kafka's data afresh",
    )
    down_cmd = commands.add_parser("down", help="stop all three services")
    down_cmd.add_argument(
        "--purge",
        action="store_true",
        help="also delete data and logs (keeps the jar cache)",
    )
    commands.add_parser("status", help="what runs where; exit 3 unless all three run")
    env_cmd = commands.add_parser("env", help="print export lines for the running services")
    env_cmd.add_argument(
        "--site",
        choices=sorted(SITES),
        help="the settings of that site's roles: its own Kafka principal (SCRAM over SASL_SSL), limited by its ACLs",
    )
    commands.add_parser("registry", help="start the local schema registry (for registry mode); print its URL")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            print(_export_lines(up(quiet=args.quiet, secure=args.secure, brokers=args.brokers)), end="")
        elif args.command == "down":
            down(purge=args.purge)
            print(f"services stopped{' and state purged' if args.purge else ''} ({state_dir()})")
        elif args.command == "status":
            lines = status()
            print(f"state dir: {state_dir()}")
            print("\n".join(lines.values()))
            return 0 if all("running" in line for line in lines.values()) else 3
        elif args.command == "registry":
            print(registry_up())
        elif args.command == "env":
            env = site_env(args.site) if args.site else load_env()
            if env is None:
                raise ServiceError("services are not running; start them with `python -m devtools.services up`")
            print(_export_lines(env), end="")
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
