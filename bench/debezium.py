"""Capture against Debezium: djlink's capture and Debezium's MariaDB connector on one fixed binlog range.

    python -m bench.debezium                 # N = 50000 row changes
    python -m bench.debezium --rows 5000     # a quick run

1. Resolves Kafka Connect and Debezium's MariaDB connector plugin from Maven
   Central into bench/.debezium-cache/ (git-ignored; bench/debezium/pom.xml
   says which versions and why), once per change of the pom.
2. Writes bench.capture's workload (the same schemas, table, load and
   unrelated schema, by bench.capture's own functions) and records the binlog
   range: the source's `@@gtid_binlog_pos` (and binlog file and position)
   before it, the GTID position after it.
3. djlink: `python -m djlink run --role capture` from the start GTID, exactly
   as bench.capture runs it; counts the committed events on the table's change
   topic until all N arrived: events/s from "djlink: ready".
4. Debezium: Kafka Connect standalone (org.apache.kafka.connect.cli.ConnectStandalone,
   the JVM options of Kafka's connect-standalone.sh, Kafka's sample worker
   settings: JSON converter with schemas, offsets in a file, default producer
   settings) with the plugin on its plugin.path, and the MariaDB connector
   limited to the linked table. Connect has no setting for where a source
   connector starts, so it starts the same range as its users would: the
   connector is created STOPPED, its offset is set to the start GTID (and
   file/position) with Connect's offsets REST API (KIP-875), then it is resumed
   with `snapshot.mode=recovery` (the schema history is rebuilt from the tables,
   no data is read, streaming goes on from the offset). Counts the messages on
   `<prefix>.<db>.recording` until all N arrived: events/s from the connector's
   "Connected to binlog at" (the start of streaming).
5. Prints each side's events/s, CPU seconds per 10,000 events (the process's
   own from /proc: while streaming, and in all including start-up), start-up
   times and the ratio djlink/Debezium; kills the JVM, drops the schemas and
   the topics (unless --keep).

Both readers read the same range of the same source into the same broker, one
after the other (djlink first unless --debezium-first). Timing is printed, never
asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import IO, Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from bench.capture import (
    TABLE,
    CaptureResult,
    add_workload_options,
    create_schemas,
    generate,
    plan,
    prepare_capture,
    query_one,
    run_capture,
)
from bench.common import ROOT, cleanup, connect, cpu_seconds, say, services_env
from devtools.services import DEPENDENCY_PLUGIN
from foundation.config import Settings
from foundation.topics import Admin

POM = ROOT / "bench" / "debezium" / "pom.xml"
LOG4J = ROOT / "bench" / "debezium" / "log4j2.properties"
CACHE = ROOT / "bench" / ".debezium-cache"
CONNECTOR_CLASS = "io.debezium.connector.mariadb.MariaDbConnector"
STREAMING = "Connected to binlog at"  # Debezium's log line once its binlog client is connected
# What Kafka's bin/connect-standalone.sh and bin/kafka-run-class.sh give the JVM.
JVM_OPTIONS = [
    "-Xms256M",
    "-Xmx2G",
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:MaxInlineLevel=15",
    "-Djava.awt.headless=true",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.debezium",
        description="djlink's capture against Debezium's MariaDB connector (Kafka Connect standalone, JSON converter) "
        "on bench.capture's workload and one fixed binlog range. Prints figures; asserts nothing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--rows", type=int, default=50_000, help="row changes of the linked table (N)")
    add_workload_options(ap)
    ap.add_argument("--seed", type=int, default=1, help="random seed of the load (ids, order, payloads)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed for each phase")
    ap.add_argument("--debezium-first", action="store_true", help="run Debezium before djlink")
    ap.add_argument("--skip-djlink", action="store_true", help="measure only Debezium")
    ap.add_argument("--java", default=None, help="the java to run Connect with (default: $JAVA_HOME/bin/java, or java)")
    ap.add_argument("--connect-log", metavar="PATH", help="write the Connect worker's log to PATH")
    ap.add_argument("--capture-log", metavar="PATH", help="write the djlink capture's log to PATH")
    ap.add_argument("--keep", action="store_true", help="keep the schemas and topics afterwards")
    args = ap.parse_args(argv)
    if args.rows < 2 or args.batch < 1 or not 0 <= args.update_share <= 0.5 or not 0 <= args.unrelated_share < 0.9:
        ap.error("need --rows >= 2, --batch >= 1, 0 <= --update-share <= 0.5, 0 <= --unrelated-share < 0.9")
    return args


# -- the jars -----------------------------------------------------------------


def resolve(cache: Path = CACHE) -> Path:
    """`cache` with lib/ (Connect's classpath) and plugins/ (the connector's unpacked plugin archive), resolved
    by Maven from bench/debezium/pom.xml when missing or out of date."""
    pom_hash = hashlib.sha256(POM.read_bytes()).hexdigest()
    marker = cache / ".pom.sha256"
    if marker.exists() and marker.read_text().strip() == pom_hash:
        return cache
    mvn = shutil.which("mvn")
    if mvn is None:
        raise SystemExit("mvn not found: install Maven (apt-get install maven)")
    say(f"fetching Kafka Connect and Debezium with Maven into {cache}")
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    goals = [
        ("copy-dependencies", f"-DoutputDirectory={tmp / 'lib'}", "-DincludeScope=runtime", "-DexcludeTypes=tar.gz"),
        # Its markers (what it unpacked already) would go to bench/debezium/target/ otherwise.
        (
            "unpack-dependencies",
            f"-DoutputDirectory={tmp / 'plugins'}",
            "-DincludeTypes=tar.gz",
            f"-DmarkersDirectory={tmp / 'markers'}",
        ),
    ]
    log = tmp / "maven.log"
    with open(log, "wb") as out:
        for goal, *options in goals:
            done = subprocess.run(
                [mvn, "-q", "-B", "-f", str(POM), f"{DEPENDENCY_PLUGIN}:{goal}", *options],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
            if done.returncode != 0:
                raise SystemExit(f"Maven could not resolve {POM} (is Maven Central reachable?); see {log}")
    (tmp / ".pom.sha256").write_text(pom_hash + "\n")
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)
    return cache


def versions(cache: Path) -> str:
    """Which Debezium connector and which Kafka Connect the cache holds, from the jars' names."""
    connector = next(cache.glob("plugins/*/debezium-connector-mariadb-*.jar"), None)
    runtime = next(cache.glob("lib/connect-runtime-*.jar"), None)
    if connector is None or runtime is None:
        raise SystemExit(f"{cache} holds no Debezium connector or Connect runtime; delete it and run again")
    return (
        f"Debezium MariaDB connector {connector.stem.removeprefix('debezium-connector-mariadb-')}, "
        f"Kafka Connect {runtime.stem.removeprefix('connect-runtime-')}"
    )


def java_binary(explicit: str | None) -> str:
    if explicit:
        return explicit
    home = os.environ.get("JAVA_HOME")
    found = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not found:
        raise SystemExit("java not found: install a JRE 17 or newer, or pass --java")
    return found


# -- Kafka Connect ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def source_tls(env: dict[str, str], tmp: Path, java: str) -> dict[str, str]:
    """The connector's TLS settings for the source as djlink's capture has them (DJLINK_SOURCE_TLS...).

    `verify` becomes verify-ca, not verify-full: the connector's binlog client checks the name "localhost"
    against the certificate when it connects to 127.0.0.1 ("identity was not confirmed")."""
    tls = Settings.from_env(env).source.tls
    if tls.mode == "off":
        return {"database.ssl.mode": "disable"}
    if tls.mode != "verify" or tls.ca is None:
        return {"database.ssl.mode": "trust"}
    store, password = tmp / "truststore.p12", uuid.uuid4().hex
    keytool = Path(java).resolve().parent / "keytool"
    import_ca = ["-importcert", "-noprompt", "-alias", "ca", "-file", tls.ca, "-keystore", str(store)]
    subprocess.run(
        [str(keytool), *import_ca, "-storetype", "PKCS12", "-storepass", password],
        check=True,
        capture_output=True,
    )
    return {
        "database.ssl.mode": "verify-ca",
        "database.ssl.truststore": str(store),
        "database.ssl.truststore.password": password,
    }


def worker_properties(bootstrap: str, offsets: Path, plugins: Path, port: int) -> str:
    """Kafka's sample config/connect-standalone.properties, with this broker, folder and a loopback REST port."""
    return "\n".join(
        [
            f"bootstrap.servers={bootstrap}",
            "key.converter=org.apache.kafka.connect.json.JsonConverter",
            "value.converter=org.apache.kafka.connect.json.JsonConverter",
            "key.converter.schemas.enable=true",
            "value.converter.schemas.enable=true",
            f"offset.storage.file.filename={offsets}",
            "offset.flush.interval.ms=10000",
            f"plugin.path={plugins}",
            f"listeners=http://127.0.0.1:{port}",
            "rest.advertised.host.name=127.0.0.1",
            "",
        ]
    )


def connector_config(env: dict[str, str], prefix: str, db: str, server_id: int, tls: dict[str, str]) -> dict[str, str]:
    """The MariaDB connector on the linked table only; defaults elsewhere, as its documentation's example."""
    return {
        "connector.class": CONNECTOR_CLASS,
        "tasks.max": "1",
        "database.hostname": env["DJLINK_SOURCE_HOST"],
        "database.port": env["DJLINK_SOURCE_PORT"],
        "database.user": env["DJLINK_SOURCE_USER"],
        "database.password": env["DJLINK_SOURCE_PASSWORD"],
        "database.server.id": str(server_id),
        "topic.prefix": prefix,
        "database.include.list": db,
        "table.include.list": f"{db}.{TABLE}",
        "schema.history.internal.kafka.bootstrap.servers": env["DJLINK_KAFKA_BOOTSTRAP"],
        "schema.history.internal.kafka.topic": f"{prefix}.schema-history",
        # The offset (set before the start) says where to stream from; `recovery` rebuilds the schema history
        # from the tables as they are (unchanged since the range began) without reading any rows; `none`: no
        # global read lock on a server that others share.
        "snapshot.mode": "recovery",
        "snapshot.locking.mode": "none",
        "topic.creation.default.replication.factor": "-1",
        "topic.creation.default.partitions": "1",
        **tls,
    }


class Rest:
    """Kafka Connect's REST API on loopback."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
        return json.loads(text) if text else None

    def status(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.call("GET", f"/connectors/{name}/status", timeout=5))
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            return None


@dataclasses.dataclass
class DebeziumResult:
    events: int
    worker_startup: float  # seconds from JVM start to the worker serving the (stopped) connector
    connector_startup: float  # seconds from resume to "Connected to binlog at" (task start, schema recovery)
    from_streaming: float  # seconds from "Connected to binlog at" to the N-th event
    first_event: float  # seconds from streaming to the first event
    cpu_at_ready: float  # JVM CPU seconds when the worker served the stopped connector
    cpu_at_streaming: float  # ... at "Connected to binlog at"
    cpu_at_done: float  # ... when the N-th event arrived
    half: float  # seconds from streaming to the (N/2)-th event
    message_bytes: int  # keys and values of the N events, in all

    @property
    def startup(self) -> float:
        return self.worker_startup + self.connector_startup

    @property
    def rate(self) -> float:
        return self.events / self.from_streaming if self.from_streaming > 0 else 0.0

    @property
    def second_half_rate(self) -> float:
        """Events/s over the second half of the events (warmed up)."""
        seconds = self.from_streaming - self.half
        return (self.events - self.events // 2) / seconds if seconds > 0 else 0.0


class Log:
    """Copies a process's output into a file, noting when a line with `marker` first appears."""

    def __init__(self, stream: IO[str], file: IO[str], marker: str, pid: int) -> None:
        self.file = file
        self.marked: list[tuple[float, float]] = []  # (monotonic time, CPU seconds of `pid`)
        self._thread = threading.Thread(target=self._pump, args=(stream, marker, pid), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str], marker: str, pid: int) -> None:
        for line in stream:
            if marker in line and not self.marked:
                self.marked.append((time.monotonic(), cpu_seconds(pid)))
            self.file.write(line)

    def tail(self, chars: int = 4000) -> str:
        self.file.flush()
        self.file.seek(0)
        return self.file.read()[-chars:]


def run_debezium(
    env: dict[str, str],
    cache: Path,
    java: str,
    prefix: str,
    db: str,
    start: dict[str, Any],
    expected: int,
    timeout: float,
    log_path: str | None,
) -> DebeziumResult:
    """Run Connect standalone with the connector from `start` (gtids, file, pos); count its events on the table's
    topic until `expected` arrived. The JVM is always killed at the end."""
    topic = f"{prefix}.{db}.{TABLE}"
    # Made beforehand, as djlink's are by the link's registration, with the same settings; the counter reads it.
    Admin(Settings.from_env(env)).ensure([topic])
    name = f"bench-debezium-{uuid.uuid4().hex[:8]}"
    port = free_port()
    rest = Rest(port)
    with tempfile.TemporaryDirectory(prefix="bench-debezium-") as tmp_name, tempfile.TemporaryFile("w+") as log_file:
        tmp = Path(tmp_name)
        worker = tmp / "worker.properties"
        worker.write_text(worker_properties(env["DJLINK_KAFKA_BOOTSTRAP"], tmp / "offsets", cache / "plugins", port))
        server_id = 200_000 + uuid.uuid4().int % 100_000
        config = connector_config(env, prefix, db, server_id, source_tls(env, tmp, java))
        connector = tmp / "connector.json"
        connector.write_text(json.dumps({"name": name, "config": config, "initial_state": "STOPPED"}))
        counter = Consumer(
            {
                "bootstrap.servers": env["DJLINK_KAFKA_BOOTSTRAP"],
                "group.id": f"{prefix}-bench-counter",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 50,
            }
        )
        counter.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        argv = [java, *JVM_OPTIONS, f"-Dlog4j2.configurationFile={LOG4J}", "-cp", str(cache / "lib" / "*")]
        argv += ["org.apache.kafka.connect.cli.ConnectStandalone", str(worker), str(connector)]
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp)
        assert proc.stdout is not None
        log = Log(proc.stdout, log_file, STREAMING, proc.pid)
        try:

            def alive() -> None:
                if proc.poll() is not None:
                    raise RuntimeError(f"Kafka Connect exited with {proc.returncode}:\n{log.tail()}")
                if time.monotonic() - started > timeout:
                    raise TimeoutError(f"Debezium took more than {timeout:.0f} s; its log ends:\n{log.tail()}")

            # 1. The worker, with the connector created stopped.
            while (rest.status(name) or {}).get("connector", {}).get("state") != "STOPPED":
                alive()
                time.sleep(0.05)
            ready, cpu_ready = time.monotonic(), cpu_seconds(proc.pid)
            # 2. Its offset: the start of the range (KIP-875), then resume it.
            partition = {"server": prefix}
            answer = rest.call(
                "PATCH", f"/connectors/{name}/offsets", {"offsets": [{"partition": partition, "offset": start}]}
            )
            say(f"  Connect: {answer.get('message', answer)}")
            resumed = time.monotonic()
            rest.call("PUT", f"/connectors/{name}/resume")
            # 3. Count its events.
            count = size = 0
            first = half = done = cpu_done = 0.0
            next_check = time.monotonic() + 5
            next_report = time.monotonic() + 10
            while count < expected:
                alive()
                now = time.monotonic()
                if now >= next_check:
                    tasks = (rest.status(name) or {}).get("tasks", [])
                    failed = [t for t in tasks if t.get("state") == "FAILED"]
                    if failed:
                        raise RuntimeError(f"the Debezium task failed:\n{failed[0].get('trace', '')[:3000]}")
                    next_check = now + 5
                if now >= next_report:
                    say(f"  ... {count:,} Debezium events after {now - started:.0f} s")
                    next_report += 10
                for msg in counter.consume(10_000, 0.1):
                    if msg.error() is None and msg.value() is not None:
                        count += 1
                        size += len(msg.value() or b"") + len(msg.key() or b"")
                        if count == 1:
                            first = time.monotonic()
                        if count == expected // 2:
                            half = time.monotonic()
                        if count >= expected:
                            done, cpu_done = time.monotonic(), cpu_seconds(proc.pid)
                            break
        finally:
            counter.close()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if log_path:
                Path(log_path).write_text(log.tail(1 << 30))
    streaming, cpu_streaming = log.marked[0] if log.marked else (resumed, cpu_ready)
    return DebeziumResult(
        count,
        ready - started,
        streaming - resumed,
        done - streaming,
        first - streaming,
        cpu_ready,
        cpu_streaming,
        cpu_done,
        half - streaming,
        size,
    )


# -- main ---------------------------------------------------------------------


def per_10k(cpu: float, events: int) -> float:
    return cpu / events * 10_000 if events else 0.0


def report(c: CaptureResult | None, d: DebeziumResult) -> None:
    """Each side's rate, CPU per 10,000 events (while capturing; with start-up) and start-up; then the ratio."""
    say("")
    if c is not None:
        c_cpu = per_10k(c.cpu_at_done - c.cpu_at_ready, c.events)
        say(
            f"djlink: {c.events:,} committed events in {c.from_ready:.1f} s from ready = {c.rate:,.0f} events/s "
            f"(second half {c.second_half_rate:,.0f}); start-up {c.from_start - c.from_ready:.1f} s (process start to "
            f"ready); CPU {c_cpu:.2f} s per 10,000 events while capturing, {per_10k(c.cpu_at_done, c.events):.2f} s "
            f"with start-up ({c.cpu_at_ready:.1f} s)"
        )
    d_cpu = per_10k(d.cpu_at_done - d.cpu_at_streaming, d.events)
    say(
        f"Debezium: {d.events:,} events in {d.from_streaming:.1f} s from streaming = {d.rate:,.0f} events/s "
        f"(second half {d.second_half_rate:,.0f}; first {d.first_event:.2f} s after; "
        f"{d.message_bytes / max(d.events, 1):,.0f} bytes a message); start-up {d.startup:.1f} s (JVM start to "
        f"worker ready {d.worker_startup:.1f} s, resume to streaming {d.connector_startup:.1f} s); CPU {d_cpu:.2f} s "
        f"per 10,000 events while streaming, {per_10k(d.cpu_at_done, d.events):.2f} s with start-up "
        f"({d.cpu_at_streaming:.1f} s)"
    )
    if c is not None and d.rate > 0 and d.second_half_rate > 0:
        say(
            f"summary: djlink {c.rate:,.0f} events/s, Debezium {d.rate:,.0f} events/s: ratio {c.rate / d.rate:.2f} "
            f"(target >= 2; second halves {c.second_half_rate / d.second_half_rate:.2f}); CPU-s per 10,000 events "
            f"djlink {c_cpu:.2f}, Debezium {d_cpu:.2f}; start-up djlink {c.from_start - c.from_ready:.1f} s, "
            f"Debezium {d.startup:.1f} s"
        )


def binlog_start(env: dict[str, str]) -> dict[str, Any]:
    """The source's position now, as a Debezium MariaDB offset: file and position (required), then GTIDs."""
    conn = connect(env)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW MASTER STATUS")
            file, pos = cur.fetchone()[:2]
    finally:
        conn.close()
    # Read after the file position, so that the position is not past the GTID (Debezium streams from the GTIDs).
    return {"file": file, "pos": int(pos), "gtids": query_one(env, "SELECT @@gtid_binlog_pos") or ""}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = services_env()
    extra = sorted(k for k in env if k.startswith("DJLINK_KAFKA_") and k != "DJLINK_KAFKA_BOOTSTRAP")
    if extra:
        raise SystemExit(f"only a plain-text Kafka listener is supported here (the worker gets no {', '.join(extra)})")
    java = java_binary(args.java)
    cache = resolve()
    say(f"bench/debezium: {versions(cache)}, JSON converter (schemas on), Connect standalone; java {java}")
    tag = uuid.uuid4().hex[:8]
    db, other = f"bench_debezium_{tag}", f"bench_debezium_{tag}_unrelated"
    prefix = f"bench-debezium-{tag}"  # djlink's topics; Debezium's are <prefix>.debezium.*
    rng = random.Random(args.seed)
    n_other = round(args.rows * args.unrelated_share / (1 - args.unrelated_share))
    say(f"  N={args.rows:,} row changes of `{db}`.`{TABLE}` + {n_other:,} in `{other}` (not captured)")
    say(f"  source {env['DJLINK_SOURCE_HOST']}:{env['DJLINK_SOURCE_PORT']}, Kafka {env['DJLINK_KAFKA_BOOTSTRAP']}")
    say(f"  load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")

    with cleanup(env, [db, other], prefix, args.keep):
        create_schemas(env, [db, other])
        start = binlog_start(env)
        load = plan(db, args.rows, args, rng)
        unrelated = plan(other, n_other, args, rng)
        t0 = time.perf_counter()
        written = generate(env, [load, unrelated], args.workers, rng, args.timeout)
        end_gtid = query_one(env, "SELECT @@gtid_binlog_pos") or ""
        say(
            f"generation: {written:,} row changes in {time.perf_counter() - t0:.1f} s; binlog range "
            f"{start['gtids']} .. {end_gtid} (from {start['file']}:{start['pos']})"
        )

        def djlink() -> CaptureResult:
            topic, capture_env = prepare_capture(env, db, prefix, start["gtids"])
            say(f"djlink: `djlink run --role capture` from GTID {start['gtids']}")
            return run_capture(capture_env, topic, args.rows, None, args.timeout, ROOT, args.capture_log)

        def debezium() -> DebeziumResult:
            say(f"Debezium: Connect standalone, MariaDB connector from GTID {start['gtids']}")
            return run_debezium(
                env, cache, java, f"{prefix}.debezium", db, start, args.rows, args.timeout, args.connect_log
            )

        c: CaptureResult | None = None
        if args.debezium_first:
            d = debezium()
            c = None if args.skip_djlink else djlink()
        else:
            c = None if args.skip_djlink else djlink()
            d = debezium()

        report(c, d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
