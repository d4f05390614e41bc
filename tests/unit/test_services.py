"""The local launcher's failures a user can hit, each one clear line; no servers are started here.

apt-get is replaced by a script on PATH that fails as an unreachable mirror makes it fail; everything
else (the CLI, the state dir, the lock, the port choice, the log reading) is the launcher's own code.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from devtools import services


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty state dir of its own, so that nothing here touches the running services."""
    sd = tmp_path / "state"
    monkeypatch.setenv("DJLINK_STATE_DIR", str(sd))
    return sd


@pytest.fixture
def unreachable_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An apt-get that fails as it does when no package mirror answers; returns its call log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "apt-calls"
    script = bin_dir / "apt-get"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        'echo "W: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease  Could not resolve"\n'
        'echo "E: Some index files failed to download."\n'
        "exit 100\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path('/usr/bin')}:{Path('/bin')}")
    monkeypatch.setattr(services.os, "geteuid", lambda: 0)  # as root: the launcher tries to install
    return calls


def missing(*names: str) -> object:
    real = services._find_exe
    return lambda name: None if name in names else real(name)


def test_missing_mariadb_with_apt_unreachable_is_one_line_and_nothing_starts(
    state: Path, unreachable_apt: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(services, "_find_exe", missing("mariadbd"))
    assert services.main(["up", "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("error: apt-get update failed (is the package mirror reachable?); see ")
    assert err.strip().endswith(str(state / "apt.log"))
    assert "Could not resolve" in (state / "apt.log").read_text()  # the details are where the line says
    assert unreachable_apt.read_text().splitlines() == ["update"]  # no install tried after the update failed
    assert services._running(state) == {}
    assert not (state / "services.json").exists()


def test_missing_java_without_root_says_which_package_to_install(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "_find_exe", missing("java"))
    monkeypatch.setattr(services.os, "geteuid", lambda: 1000)
    state.mkdir()
    with pytest.raises(services.ServiceError) as caught:
        services._start_kafka(state, {"ports": {}}, lambda message: None)
    assert str(caught.value) == "java not found; install it with: apt-get install -y default-jre-headless"
    assert "\n" not in str(caught.value)


def test_missing_java_as_root_with_apt_unreachable_says_so(
    state: Path, unreachable_apt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(services, "_find_exe", missing("java"))
    said: list[str] = []
    state.mkdir()
    with pytest.raises(services.ServiceError, match=r"^apt-get update failed \(is the package mirror reachable\?\)"):
        services._start_kafka(state, {"ports": {}}, said.append)
    assert said == ["java not found: running apt-get update && apt-get install -y default-jre-headless"]


def test_a_port_taken_while_its_service_was_stopped_is_replaced_and_a_running_ones_kept() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((services.HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        stopped = {"ports": {"source": port, "dest": port, "kafka": port, "kafka_controller": port, "kafka_sasl": port}}
        services._assign_ports(stopped, running={})
        new = stopped["ports"]
        assert port not in new.values()
        assert len(set(new.values())) == 5  # five distinct free ports
        assert all(services._port_free(p) for p in new.values())

        # A service that runs holds its own port: it is kept, as is a free one of a stopped service.
        free = new["dest"]
        ports = {"source": port, "dest": free, "kafka": port, "kafka_controller": port, "kafka_sasl": port}
        running = {"ports": dict(ports)}
        services._assign_ports(running, running={"source": 1, "kafka": 2})
        assert running["ports"] == ports


def test_a_server_that_dies_at_start_is_explained_by_the_error_line_of_its_log(tmp_path: Path) -> None:
    log = tmp_path / "error.log"
    log.write_text("[ERROR] an old error from an earlier start\n")
    offsets = services._log_sizes((log,))
    marker = f"djlink-test-{tmp_path.name}"
    # What mariadbd writes when its port was taken between choosing and binding it, then it exits.
    script = (
        'echo "2026-11-27  6:00:00 0 [Note] Starting MariaDB"; '
        "echo \"2026-11-27  6:00:00 0 [ERROR] Can't start server: Bind on TCP/IP port. Got error: 98: "
        'Address already in use"; '
        'echo "2026-11-27  6:00:00 0 [ERROR] Aborting"; exit 1'
    )
    pid = services._spawn(["/bin/sh", "-c", script, marker], log, tmp_path)
    with pytest.raises(services.ServiceError) as caught:
        services._wait_ready("source MariaDB", lambda: False, pid, marker, offsets, timeout=30)
    assert str(caught.value) == (
        "source MariaDB exited during start (2026-11-27  6:00:00 0 [ERROR] Can't start server: Bind on TCP/IP "
        f"port. Got error: 98: Address already in use); see {log}"
    )


def _kafka_state(secure: bool) -> dict[str, Any]:
    ports = {"kafka": 9092, "kafka_sasl": 9093, "kafka_controller": 9094}
    users = {"admin": "admin-secret", "djlink-source": "s", "djlink-dest": "d"}
    return {"ports": ports, "kafka_users": users, "kafka_secure": secure}


def _properties(text: str) -> dict[str, str]:
    lines = [ln.split("=", 1) for ln in text.splitlines() if ln and not ln.startswith("#")]
    return {k: v for k, v in lines}


def test_the_broker_always_authorizes_and_in_secure_mode_has_no_plaintext_listener(tmp_path: Path) -> None:
    development = _properties(services._kafka_properties(tmp_path, _kafka_state(secure=False)))
    secure = _properties(services._kafka_properties(tmp_path, _kafka_state(secure=True)))
    for props in (development, secure):
        assert props["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
        assert props["allow.everyone.if.no.acl.found"] == "false"
        assert "SASL_SSL://127.0.0.1:9093" in props["listeners"]
        assert props["listener.security.protocol.map"].endswith("CONTROLLER:SASL_SSL")
    assert "PLAINTEXT://127.0.0.1:9092" in development["listeners"]
    assert "User:ANONYMOUS" in development["super.users"]
    # Secure mode: no way in without credentials, and nobody anonymous is trusted.
    assert "PLAINTEXT://" not in secure["listeners"] and "PLAINTEXT://" not in secure["advertised.listeners"]
    assert secure["super.users"] == "User:admin"


def test_each_site_gets_its_own_principal_and_the_operator_the_super_user(tmp_path: Path) -> None:
    state = {
        **_kafka_state(secure=True),
        "ports": {"source": 1, "dest": 2, "kafka": 9092, "kafka_sasl": 9093, "kafka_controller": 9094},
        "passwords": {"source": "rs", "dest": "rd"},
    }
    operator = services._env_from_state(tmp_path, state)
    source = services._env_from_state(tmp_path, state, "source")
    dest = services._env_from_state(tmp_path, state, "destination")
    assert operator["DJLINK_KAFKA_SASL_USERNAME"] == "admin" and operator["DJLINK_KAFKA_SASL_MECHANISM"] == "PLAIN"
    assert (source["DJLINK_KAFKA_SASL_USERNAME"], source["DJLINK_KAFKA_SASL_PASSWORD"]) == ("djlink-source", "s")
    assert (dest["DJLINK_KAFKA_SASL_USERNAME"], dest["DJLINK_KAFKA_SASL_PASSWORD"]) == ("djlink-dest", "d")
    assert {e["DJLINK_KAFKA_BOOTSTRAP"] for e in (operator, source, dest)} == {"127.0.0.1:9093"}
    plain = services._env_from_state(tmp_path, {**state, "kafka_secure": False})
    assert plain["DJLINK_KAFKA_BOOTSTRAP"] == "127.0.0.1:9092" and "DJLINK_KAFKA_SASL_USERNAME" not in plain


def test_a_three_broker_cluster_is_three_voters_each_with_its_own_ports_and_data_and_replicates_by_three(
    tmp_path: Path,
) -> None:
    state = _kafka_state(secure=False)
    state["kafka_brokers"] = 3
    state["ports"] = {
        **{f"{n}{suffix}": 9000 + 10 * i + j for i, n in enumerate(services.kafka_nodes(3)) for j, suffix in
           enumerate(("", "_sasl", "_controller"))},
    }  # fmt: skip
    nodes = {n: _properties(services._kafka_properties(tmp_path, state, n)) for n in services.kafka_nodes(3)}
    assert list(nodes) == ["kafka", "kafka-2", "kafka-3"]
    assert [p["node.id"] for p in nodes.values()] == ["1", "2", "3"]
    voters = "1@127.0.0.1:9002,2@127.0.0.1:9012,3@127.0.0.1:9022"
    assert {p["controller.quorum.voters"] for p in nodes.values()} == {voters}
    assert nodes["kafka-2"]["listeners"] == (
        "PLAINTEXT://127.0.0.1:9010,SASL_SSL://127.0.0.1:9011,CONTROLLER://127.0.0.1:9012"
    )
    assert nodes["kafka-3"]["log.dirs"] == str(tmp_path / "kafka-3" / "data")
    for p in nodes.values():
        assert p["default.replication.factor"] == p["offsets.topic.replication.factor"] == "3"
        assert p["transaction.state.log.replication.factor"] == "3"
        assert p["min.insync.replicas"] == p["transaction.state.log.min.isr"] == "2"
    env = services._env_from_state(tmp_path, {**state, "passwords": {"source": "a", "dest": "b"},
                                              "ports": {**state["ports"], "source": 1, "dest": 2}})  # fmt: skip
    assert env["DJLINK_KAFKA_BOOTSTRAP"] == "127.0.0.1:9000,127.0.0.1:9010,127.0.0.1:9020"
    one = _properties(services._kafka_properties(tmp_path, _kafka_state(secure=False)))
    assert one["node.id"] == "1" and one["default.replication.factor"] == one["min.insync.replicas"] == "1"
