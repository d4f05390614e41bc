"""Settings of every djlink process, read from the environment.

One place names every variable, so the local launcher, docker-compose and the
tests configure the same keys. `DJLINK_*` variables configure the services;
the façade additionally reads `LINK_USER`/`LINK_PASS` as datajoint-link did.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pymysql

from foundation.tls import CR_SSL_CONNECTION_ERROR, Tls

_WITHOUT_TLS: set[tuple[str, int]] = set()  # servers found to offer no TLS, where `preferred` means plain text


class ConfigError(Exception):
    """A setting is missing or malformed."""


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str:
    value = env.get(name, allowed[0]).strip().lower()
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")
    return value


def _number(env: Mapping[str, str], name: str, default: str, kind: type = int, minimum: float = 1) -> Any:
    """A numeric setting, or a one-line ConfigError naming it."""
    text = env.get(name) or default
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number") from None
    if value < minimum:
        raise ConfigError(f"{name}={text!r} must be at least {minimum:g}")
    return value


def _stores(env: Mapping[str, str], name: str) -> dict[str, dict[str, Any]]:
    """A JSON object of DataJoint store specs ({name: dj.config['stores'][name]}), or a one-line ConfigError."""
    text = env.get(name) or "{}"
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{name} is not JSON ({exc}); give {{store: {{protocol, location, ...}}}}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(f"{name} must be a JSON object of store specs, as dj.config['stores'] holds them")
    return value


@dataclass(frozen=True)
class Database:
    """One MariaDB server and the credentials a role uses there: the one way anything here connects."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)  # never in a log line or an error
    tls: Tls = field(default_factory=Tls)

    def connect(self, utc: bool = False, **options: Any) -> pymysql.connections.Connection[Any]:
        """A PyMySQL connection, encrypted as `tls` says, in utf8mb4 unless `options` name another charset.

        `utc` sets the session's time zone to UTC (TIMESTAMP values as the binlog carries them); `options` go
        to PyMySQL (autocommit, cursorclass, ...)."""
        if utc:
            options.setdefault("init_command", "SET time_zone='+00:00'")
        options.setdefault("charset", "utf8mb4")
        plain = {**self._credentials(), **options}
        if self.tls.mode == "off":  # PyMySQL 2 encrypts whenever the server offers TLS, unless told not to
            return pymysql.connect(**plain, ssl_disabled=True)
        ctx = self.tls.context() if (self.host, self.port) not in _WITHOUT_TLS else None
        if ctx is None:
            return pymysql.connect(**plain)
        try:
            return pymysql.connect(**plain, ssl=ctx)
        except pymysql.err.OperationalError as exc:
            if self.tls.mode == "preferred" and exc.args and exc.args[0] == CR_SSL_CONNECTION_ERROR:
                _WITHOUT_TLS.add((self.host, self.port))  # said once: the server offers none
                return pymysql.connect(**plain)
            refused = self.tls.refused(exc, f"{self.host}:{self.port}")
            if refused is not None:
                raise refused from None
            raise

    def _credentials(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": self.user, "password": self.password}

    @classmethod
    def at(cls, address: str, user: str, password: str) -> Database:
        """The server at `host[:port]` (as DataJoint's `database.host` and datajoint-link's `@link` name it)."""
        host, _, port = address.rpartition(":") if address.count(":") == 1 else (address, "", "")
        try:
            return cls(host or address, int(port) if port else 3306, user, password)
        except ValueError:
            raise ConfigError(f"{address!r} is not host[:port]") from None

    def datajoint(self, use_tls: Any = None) -> Any:
        """A DataJoint connection to this server, `use_tls` as DataJoint's own `database.use_tls` takes it.

        None (DataJoint's default) tries TLS and falls back to plain text when the server offers none, as
        DataJoint means it to; DataJoint 0.14 itself no longer falls back with current PyMySQL.
        """
        import datajoint as dj  # only the façade needs DataJoint's connection

        address = f"{self.host}:{self.port}"
        if use_tls is not None:
            return dj.Connection(address, self.user, self.password, use_tls=use_tls)
        try:
            return dj.Connection(address, self.user, self.password, use_tls=True)
        except pymysql.err.OperationalError as exc:
            if exc.args and exc.args[0] == CR_SSL_CONNECTION_ERROR:
                return dj.Connection(address, self.user, self.password, use_tls=False)
            raise

    def binlog_settings(self, **options: Any) -> dict[str, Any]:
        """python-mysql-replication's `connection_settings` for this server, encrypted as `tls` says."""
        settings = {**self._credentials(), **options}
        if self.tls.mode == "preferred" and (self.host, self.port) not in _WITHOUT_TLS:
            self.connect().close()  # learns whether the server offers TLS (the reader cannot fall back itself)
        ctx = self.tls.context() if (self.host, self.port) not in _WITHOUT_TLS else None
        if ctx is not None:
            settings["ssl"] = ctx
        elif self.tls.mode == "off":
            settings["ssl_disabled"] = True
        return settings


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap: str
    topic_prefix: str
    source: Database
    destination: Database
    allowed_schemas: tuple[str, ...]
    capture_server_id: int
    capture_start_gtid: str | None
    snapshot_chunk_size: int
    timeout_s: float
    startup_timeout_s: float
    metrics_port: int | None
    snapshot_mode: str
    applier_batch_units: int
    source_stores: Any  # {store: DataJoint store spec}: where the applier reads the source's objects
    destination_stores: Any  # {store: DataJoint store spec}: where it writes the destination's
    schema_registry_url: str | None  # a Confluent-compatible registry: change events in its wire format
    applier_state_db: str  # the applier's database on the destination server: offsets, units, entity states
    applier_held_mb: int = 48  # DJLINK_APPLIER_HELD_MB: MiB of events read, not applicable yet (then it waits)
    agent_keys_per_transaction: int = 5000  # DJLINK_AGENT_KEYS_PER_TRANSACTION: helper rows a source transaction moves
    log_format: str = "text"  # DJLINK_LOG_FORMAT: text (for people) or json (one object per line, for collectors)
    topic_replication_factor: int = -1  # of the topics djlink creates; -1: the cluster's default.replication.factor
    topic_min_insync_replicas: int | None = None  # their min.insync.replicas; None: the cluster's default
    # librdkafka properties every Kafka client gets (DJLINK_KAFKA_<PROPERTY>): security.protocol, sasl.*, ssl.*
    kafka_properties: Mapping[str, str] = field(default_factory=dict, repr=False)
    # the schema registry client's (DJLINK_SCHEMA_REGISTRY_<PROPERTY>): basic.auth.user.info, ssl.*
    schema_registry_properties: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def db(side: str) -> Database:
            port = _number(env, f"DJLINK_{side}_PORT", "3306")
            return Database(
                env.get(f"DJLINK_{side}_HOST", "127.0.0.1"),
                port,
                env.get(f"DJLINK_{side}_USER", "root"),
                env.get(f"DJLINK_{side}_PASSWORD", ""),
                Tls.from_env(env, f"DJLINK_{side}"),
            )

        allowed = tuple(p.strip() for p in env.get("DJLINK_ALLOWED_SCHEMAS", "").split(",") if p.strip())
        return cls(
            kafka_bootstrap=env.get("DJLINK_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
            topic_prefix=_prefix(env.get("DJLINK_TOPIC_PREFIX", "djlink")),
            source=db("SOURCE"),
            destination=db("DEST"),
            allowed_schemas=allowed,
            capture_server_id=_number(env, "DJLINK_CAPTURE_SERVER_ID", "5401"),
            capture_start_gtid=env.get("DJLINK_CAPTURE_START_GTID") or None,
            snapshot_chunk_size=_number(env, "DJLINK_SNAPSHOT_CHUNK_SIZE", "500"),
            timeout_s=_number(env, "DJLINK_TIMEOUT", "60", float, 0.1),
            startup_timeout_s=_number(env, "DJLINK_STARTUP_TIMEOUT", "30", float, 0.1),
            metrics_port=_number(env, "DJLINK_METRICS_PORT", "0") if env.get("DJLINK_METRICS_PORT") else None,
            snapshot_mode=_choice(env, "DJLINK_SNAPSHOT_MODE", ("none", "initial")),
            applier_batch_units=_number(env, "DJLINK_APPLIER_BATCH_UNITS", "500"),
            source_stores=_stores(env, "DJLINK_SOURCE_STORES"),
            destination_stores=_stores(env, "DJLINK_DEST_STORES"),
            schema_registry_url=env.get("DJLINK_SCHEMA_REGISTRY_URL") or None,
            applier_state_db=_state_db(env.get("DJLINK_APPLIER_STATE_DB") or "djlink_applier"),
            applier_held_mb=_number(env, "DJLINK_APPLIER_HELD_MB", "48"),
            agent_keys_per_transaction=_number(env, "DJLINK_AGENT_KEYS_PER_TRANSACTION", "5000"),
            log_format=_choice(env, "DJLINK_LOG_FORMAT", ("text", "json")),
            topic_replication_factor=_replication_factor(env),
            topic_min_insync_replicas=_optional_number(env, "DJLINK_TOPIC_MIN_INSYNC_REPLICAS"),
            kafka_properties=client_properties(env, KAFKA_PREFIX, {"BOOTSTRAP"}),
            schema_registry_properties=client_properties(env, REGISTRY_PREFIX, {"URL"}),
        )

    def database(self, side: str) -> Database:
        """The source (`SOURCE`) or destination (`DEST`) server, as the DJLINK_<side>_* keys name them."""
        return {"SOURCE": self.source, "DEST": self.destination}[side]

    def schema_allowed(self, schema: str) -> bool:
        """Whether the source site's allow-list (DJLINK_ALLOWED_SCHEMAS) lets `schema` be shared."""
        return any(fnmatch.fnmatchcase(schema, pattern) for pattern in self.allowed_schemas)


def _prefix(value: str) -> str:
    """DJLINK_TOPIC_PREFIX: letters, digits, '-' and '_' (no '.', which separates it from the table names)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", value):
        raise ConfigError(
            f"DJLINK_TOPIC_PREFIX={value!r}: use 1 to 100 letters, digits, '-' or '_' (no '.', which separates "
            "the prefix from the schema and table names in topic names)"
        )
    return value


def _optional_number(env: Mapping[str, str], name: str) -> int | None:
    """A whole-number setting that may be left unset (None)."""
    return int(_number(env, name, "1")) if env.get(name) else None


def _replication_factor(env: Mapping[str, str]) -> int:
    """DJLINK_TOPIC_REPLICATION_FACTOR: -1 (the cluster's default) or a number of replicas."""
    if (env.get("DJLINK_TOPIC_REPLICATION_FACTOR") or "-1").strip() == "-1":
        return -1
    return int(_number(env, "DJLINK_TOPIC_REPLICATION_FACTOR", "-1"))


KAFKA_PREFIX = "DJLINK_KAFKA_"
REGISTRY_PREFIX = "DJLINK_SCHEMA_REGISTRY_"


def property_name(variable: str, prefix: str) -> str:
    """The client property a variable names: `DJLINK_KAFKA_SASL_MECHANISM` -> `sasl.mechanism` (`__` is `_`)."""
    return variable[len(prefix) :].lower().replace("__", "\0").replace("_", ".").replace("\0", "_")


def client_properties(env: Mapping[str, str], prefix: str, own: set[str]) -> dict[str, str]:
    """Every `<prefix><PROPERTY>` variable as a client property, but for djlink's own settings (`own`)."""
    return {
        property_name(name, prefix): value
        for name, value in sorted(env.items())
        if name.startswith(prefix) and name[len(prefix) :] not in own and value != ""
    }


def _state_db(name: str) -> str:
    """DJLINK_APPLIER_STATE_DB: a plain database name."""
    if not re.fullmatch(r"[A-Za-z0-9_$]{1,64}", name):
        raise ConfigError(
            f"DJLINK_APPLIER_STATE_DB must be a plain database name (letters, digits, _ and $), not {name!r}"
        )
    return name
