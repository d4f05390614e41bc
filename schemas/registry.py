"""A Confluent-compatible schema registry, when one is configured (DJLINK_SCHEMA_REGISTRY_URL).

Change events are then written in the Confluent wire format (a zero byte,
the schema id in 4 bytes big-endian, the Avro body), their schemas registered
under Confluent's topic-name strategy (`<topic>-key`, `<topic>-value`), so
any Confluent-compatible consumer or connector reads them. Without a registry
djlink writes Avro single-object encoding and publishes its schemas to a
compacted topic (see `schemas`); its own readers decode both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from confluent_kafka.schema_registry import Schema as RegisteredSchema
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

WIRE_MAGIC = b"\x00"


class RegistryError(Exception):
    """The registry refused or could not be reached; the message says which registry and why."""


def _plain(definition: Any, seen: set[str] | None = None) -> Any:
    """The schema JSON as other Avro implementations take it: without fastavro's bookkeeping keys
    (`__fastavro_parsed`, `__named_schemas`), each named type defined once and referenced by name after."""
    seen = set() if seen is None else seen
    if isinstance(definition, dict):
        name = definition.get("name") if definition.get("type") in ("record", "enum", "fixed") else None
        if name is not None:
            full = name if "." in name or not definition.get("namespace") else f"{definition['namespace']}.{name}"
            if full in seen:
                return full
            seen.add(full)
        return {k: _plain(v, seen) for k, v in definition.items() if not k.startswith("__")}
    if isinstance(definition, list):
        return [_plain(v, seen) for v in definition]
    return definition


def registry_at(url: str | None, properties: Mapping[str, str] | None = None) -> Registry | None:
    """The registry at `url` (DJLINK_SCHEMA_REGISTRY_URL), its client given `properties` (authentication, TLS);
    None when none is configured."""
    return Registry(url, properties) if url else None


class Registry:
    """Ids of our schemas by subject, and schemas by id: each asked of the registry once."""

    def __init__(self, url: str, properties: Mapping[str, str] | None = None) -> None:
        self.url = url
        self._client = SchemaRegistryClient({"url": url, **(properties or {})})
        self._ids: dict[tuple[str, bytes], int] = {}
        self._texts: dict[int, str] = {}

    def id_for(self, subject: str, fingerprint: bytes, definition: dict[str, Any]) -> int:
        """The registry's id of this schema under `subject` (registered the first time)."""
        key = (subject, fingerprint)
        if key not in self._ids:
            try:
                text = json.dumps(_plain(definition))
                self._ids[key] = self._client.register_schema(subject, RegisteredSchema(text, "AVRO"))
            except (SchemaRegistryError, OSError) as exc:
                raise RegistryError(f"schema registry {self.url} refused subject {subject}: {exc}") from exc
        return self._ids[key]

    def text(self, schema_id: int) -> str | None:
        """The schema JSON of an id, or None when the registry does not know it."""
        if schema_id not in self._texts:
            try:
                self._texts[schema_id] = str(self._client.get_schema(schema_id).schema_str)
            except SchemaRegistryError as exc:
                if exc.http_status_code == 404:
                    return None
                raise RegistryError(f"schema registry {self.url}: schema {schema_id}: {exc}") from exc
        return self._texts[schema_id]
