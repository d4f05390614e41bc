"""The `link` decorator and the source-side view it adds to the destination table.

Compatible with datajoint-link: `@link(host, source_schema, helper_schema,
helper_table, destination_schema)` on a class named after the source table
declares that table at the destination (Manual tier, parts included) and adds
`Table().source`, a read-only DataJoint view of the source whose restrictions
can be `pull()`ed. The pull itself crosses Kafka: this module sends primary
keys to the source agent and waits for the applier's acknowledgements.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import datajoint as dj
import pymysql
from tqdm.auto import tqdm

from foundation import keys as keycodec
from foundation.config import Database, Settings
from foundation.keys import KeyReason
from foundation.links import LinkSpec
from foundation.sql import chunks
from foundation.tls import Tls
from link.requests import Requests


class LinkError(Exception):
    """A link that cannot be made or a request the source site refused."""


@dataclass
class _Summary:
    """What a request did at the source site, entity by entity."""

    requested: int = 0
    skipped: int = 0
    refused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # '<key>: <reason>'; requesting again retries them
    rows: int = 0  # master and part rows written at the destination
    in_flight: list[str] = field(default_factory=list)
    message: str = ""
    _words = ("done", "skipped", "request")

    def _text(self, done: int) -> str:
        did, skipped, verb = self._words
        text = f"{done} {did}, {self.skipped} {skipped}, {len(self.refused)} refused"
        if self.failed:
            text += f", {len(self.failed)} failed ({self.failed[0]}{', ...' if len(self.failed) > 1 else ''})"
        if self.in_flight:
            text += f", {len(self.in_flight)} still in flight (they complete in the background; {verb} again to wait)"
        return text + (f": {self.message}" if self.message else "")


@dataclass
class PullSummary(_Summary):
    """What a pull did: pulled, already shared (skipped), refused with the reason, still in flight."""

    pulled: int = 0
    _words = ("pulled", "already shared", "pull")

    def __str__(self) -> str:
        return self._text(self.pulled)


@dataclass
class DeleteSummary(_Summary):
    """What a delete did: deleted (helper row gone, or deprecated when flagged), not shared (skipped), ..."""

    deleted: int = 0
    _words = ("deleted", "not shared", "delete")

    def __str__(self) -> str:
        return self._text(self.deleted)


def _sql_name(helper_table: str) -> str:
    """The helper table as given in the README (snake_case) or as a class name (CamelCase)."""
    return dj.utils.from_camel_case(helper_table) if any(ch.isupper() for ch in helper_table) else helper_table


def _definition(
    heading: Any,
    drop: set[str] = frozenset(),  # type: ignore[assignment]
    head: str = "",
    stores: dict[str, str] | None = None,
) -> str:
    """A DataJoint definition of a heading without its foreign keys (attributes inlined), in-store
    attributes (`blob@`, `attach@`, `filepath@`) moved to their destination store as `stores` says."""
    lines = [head] if head else []
    in_key = True
    for attr in heading.attributes.values():
        if attr.name in drop:
            continue
        if in_key and not attr.in_key:
            lines.append("---")
            in_key = False
        default = attr.default
        if default is not None and default.strip("\"'").lower().startswith("current_timestamp"):
            # MariaDB reports current_timestamp(), and DataJoint quotes it: declared so, it is a string.
            default = "CURRENT_TIMESTAMP"
        name = attr.name if default is None else f"{attr.name} = {default}"
        # MariaDB reports json as longtext (with a json_valid check); DataJoint cannot declare longtext itself.
        sql_type = "json" if attr.type == "longtext" else attr.type
        if attr.store:
            sql_type = f"{attr.type.split('@', 1)[0]}@{(stores or {}).get(attr.store, attr.store)}"
        kind = f"{sql_type}{' auto_increment' if attr.autoincrement else ''}"
        lines.append(f"{name} : {kind} # {attr.comment}")
    return "\n".join(lines)


class _Link:
    def __init__(
        self, host: str, source_schema: str, helper_schema: str, helper_table: str, destination_schema: str
    ) -> None:
        user, password = os.environ.get("LINK_USER"), os.environ.get("LINK_PASS")
        if not user or password is None:
            raise LinkError("set LINK_USER and LINK_PASS to the link user's credentials on the source server")
        self.settings = Settings.from_env()
        self.source_conn = Database.at(host, user, password).datajoint(use_tls=_source_tls(self.settings.source.tls))
        self.source_schema = source_schema
        self.helper_schema = helper_schema
        self.helper_table = _sql_name(helper_table)
        self.destination_schema = destination_schema
        self._requests: Requests | None = None

    @property
    def requests(self) -> Requests:
        if self._requests is None:
            self._requests = Requests(self.settings)
        return self._requests

    def source_class(self, name: str) -> type:
        context: dict[str, Any] = {}
        schema = dj.Schema(
            self.source_schema, context=context, connection=self.source_conn, create_schema=False, create_tables=False
        )
        schema.spawn_missing_classes(context=context)
        if name not in context:
            raise LinkError(
                f"no table {name} in source schema '{self.source_schema}' "
                "(the class name must match the source table's)"
            )
        cls: type = context[name]
        return cls

    def register(
        self, source_table: str, auto_pull: bool | dict[str, Any] | None = None, stores: dict[str, str] | None = None
    ) -> LinkSpec:
        spec = LinkSpec.new(
            self.source_schema, source_table, self.helper_schema, self.helper_table, self.destination_schema
        )
        spec = dataclasses.replace(spec, stores=tuple(sorted((stores or {}).items())))
        if auto_pull is not None:
            policy = {} if auto_pull is True else auto_pull
            text = json.dumps(keycodec.plain(policy) if isinstance(policy, dict) else False, sort_keys=True)
            spec = dataclasses.replace(spec, auto_pull=text)
        for reply in self.requests.ask("REGISTER", spec, [], self.settings.timeout_s):
            if reply["status"] == "REFUSED":
                raise LinkError(f"the source site refused the link: {reply['message']}")
            return spec
        raise LinkError(
            f"no answer from the source site's agent within {self.settings.timeout_s:.0f} s "
            f"(is `djlink run` running there, on Kafka {self.settings.kafka_bootstrap}?)"
        )

    def pull(
        self, spec: LinkSpec, keys: list[dict[str, Any]], display_progress: bool, timeout: float | None
    ) -> PullSummary:
        summary = PullSummary(requested=len(keys))
        if not keys:
            summary.message = "the restriction matches no source rows; nothing to pull"
            print(summary.message)
            return summary
        self._request("PULL", spec, keys, display_progress, timeout, summary)
        return summary

    def delete(
        self, spec: LinkSpec, keys: list[dict[str, Any]], display_progress: bool, timeout: float | None
    ) -> DeleteSummary:
        """Delete entities at the destination through the source site: returns once the agent recorded it."""
        summary = DeleteSummary(requested=len(keys))
        if not keys:
            summary.message = "the restriction matches no rows; nothing to delete"
            return summary
        self._request("DELETE", spec, keys, display_progress, timeout, summary)
        return summary

    def flagged(self, primary_key: list[str]) -> list[dict[str, Any]]:
        columns = ", ".join(f"`{c}`" for c in primary_key)
        rows = self.source_conn.query(
            f"SELECT {columns} FROM `{self.helper_schema}`.`{self.helper_table}` WHERE is_flagged='TRUE' "
            f"ORDER BY {columns}"
        ).fetchall()
        return [dict(zip(primary_key, row, strict=True)) for row in rows]

    def _request(
        self,
        kind: str,
        spec: LinkSpec,
        keys: list[dict[str, Any]],
        display_progress: bool,
        timeout: float | None,
        summary: PullSummary | DeleteSummary,
    ) -> None:
        """Send a pull or delete and follow its replies until every entity is done, refused or the time is up:
        as requests of at most MAX_REQUEST_KEYS entities (what the agent takes), one after the other."""
        everything = list(dict.fromkeys(keycodec.encode(k) for k in keys))
        bar = tqdm(total=len(everything), desc=kind.lower(), unit="entity", disable=not display_progress)
        progress = _Progress(bar)
        try:
            for texts in chunks(everything, keycodec.MAX_REQUEST_KEYS):
                self._one_request(kind, spec, list(texts), timeout, summary, progress)
        finally:
            bar.close()
        if isinstance(summary, PullSummary):
            summary.pulled = progress.done
        else:
            summary.deleted = progress.done

    def _one_request(
        self,
        kind: str,
        spec: LinkSpec,
        texts: list[str],
        timeout: float | None,
        summary: PullSummary | DeleteSummary,
        progress: _Progress,
    ) -> None:
        waiting: set[str] = set()
        bar = progress.bar
        accepted = False
        for reply in self.requests.ask(kind, spec, texts, timeout or self.settings.timeout_s):
            if reply["status"] == "REFUSED":
                raise LinkError(f"the source site refused the {kind.lower()}: {reply['message']}")
            refused = [KeyReason.from_avro(r) for r in reply["refused"]]
            refused_keys = {r.key for r in refused}
            if reply["status"] == "ACCEPTED":
                if accepted:  # a second one: the late registration reply of a pull whose link changed
                    continue
                accepted = True
                summary.refused += [str(r) for r in refused]
                summary.skipped += len(reply["done"])
                waiting = set(texts) - set(reply["done"]) - refused_keys
                bar.update(len(texts) - len(waiting))
            else:
                done = waiting.intersection(reply["done"])
                late = [r for r in refused if r.key in waiting]
                failed = [f for f in map(KeyReason.from_avro, reply.get("failed") or []) if f.key in waiting]
                waiting -= done | refused_keys | {f.key for f in failed}
                summary.refused += [str(r) for r in late]
                summary.failed += [str(f) for f in failed]
                progress.done += len(done)
                progress.rows += reply.get("rows") or 0
                summary.rows = progress.rows
                rate = progress.rows / max(time.monotonic() - progress.started, 1e-3)
                bar.set_postfix_str(f"{rate:,.0f} rows/s", refresh=False)
                bar.update(len(done) + len(late) + len(failed))
            if not waiting:
                break
        else:
            summary.in_flight += sorted(waiting) if waiting else texts
            if not waiting:
                summary.message = "no answer from the source site's agent (is `djlink run` running there?)"


@dataclass
class _Progress:
    """What the requests of one pull or delete have done so far, and its progress bar."""

    bar: Any
    done: int = 0
    rows: int = 0
    started: float = field(default_factory=time.monotonic)


def _source_tls(site: Tls) -> Any:
    """TLS of the façade's source connection, as DataJoint's `use_tls` takes it: the source site's setting
    (`site`, from DJLINK_SOURCE_TLS with its CA and client certificate) when given, else
    `dj.config["database.use_tls"]` (None by default: TLS when the server offers it)."""
    if os.environ.get("DJLINK_SOURCE_TLS"):
        return site.datajoint()
    return dj.config.get("database.use_tls")


def _parts_of(table_class: type) -> dict[str, Any]:
    return {
        name: member
        for name, member in vars(table_class).items()
        if isinstance(member, type) and issubclass(member, dj.Part)
    }


def _destination_class(name: str, doc: str | None, source_class: Any, stores: dict[str, str] | None) -> Any:
    """The destination table: the source's definition without foreign keys, Manual tier, with its parts."""
    master_heading = source_class.heading
    comment = master_heading.table_status.get("comment", "") if master_heading.table_status else ""
    body: dict[str, Any] = {
        "definition": _definition(master_heading, head=f"# {comment}" if comment else "", stores=stores),
        "__doc__": doc,
        "__module__": __name__,
    }
    master_key = set(master_heading.primary_key)
    for part_name, part_class in _parts_of(source_class).items():
        body[part_name] = type(
            part_name,
            (dj.Part,),
            {
                "definition": _definition(part_class.heading, drop=master_key, head="-> master", stores=stores),
                "__module__": __name__,
            },
        )
    return type(name, (dj.Manual,), body)


ER_DB_CREATE_EXISTS = 1007


def _destination_schema(name: str) -> dj.Schema:
    """The destination schema, created if missing, also when another process creates it at the same moment
    (DataJoint's CREATE DATABASE has no IF NOT EXISTS: two notebooks linking at once would fail)."""
    try:
        return dj.Schema(name)
    except pymysql.err.ProgrammingError as exc:
        if exc.args[0] != ER_DB_CREATE_EXISTS:
            raise
        return dj.Schema(name)


def _dependents(entities: Any) -> list[tuple[Any, int]]:
    """Rows of other destination tables that reference these entities or their parts: (restricted table, rows).

    The destination's own tables may depend on a linked table (an analysis
    computed from pulled rows); their foreign keys would refuse the delete.
    """
    own = [entities, *(part() & entities for part in _parts_of(type(entities)).values())]
    names = {t.full_table_name for t in own}
    found = []
    for table in own:
        for child, info in table.children(as_objects=True, foreign_key_info=True):
            if child.full_table_name in names:
                continue
            renamed = {c: p for c, p in info["attr_map"].items() if c != p}
            restricted = child & (table.proj(**renamed) if renamed else table.proj())
            count = len(restricted)
            if count:
                found.append((restricted, count))
    return found


def link(
    host: str,
    source_schema: str,
    helper_schema: str,
    helper_table: str,
    destination_schema: str,
    stores: dict[str, str] | None = None,
    auto_pull: bool | dict[str, Any] | None = None,
) -> Any:
    """Declare a class named after a source table as its linked copy at the destination.

    `host` is the source server ("host" or "host:port"); the link user's
    credentials come from LINK_USER / LINK_PASS, the destination's from
    `dj.config`, Kafka's from DJLINK_KAFKA_BOOTSTRAP.

    `auto_pull` (djlink only): True pulls every source row inserted from now
    on without anyone calling pull(); a dict of attribute values pulls only
    new rows having all of them (`{"subject": "mouse-7"}`); False turns the
    policy off; None (the default) leaves it as registered.

    `stores` maps source stores to destination stores, `{source_store:
    destination_store}` as the datajoint-link README says, for `blob@`,
    `attach@` and `filepath@` alike; a store not named keeps its name. The
    destination stores must be in `dj.config["stores"]`; the applier reads
    and writes objects with the stores its DJLINK_SOURCE_STORES and
    DJLINK_DEST_STORES give.
    """

    def decorate(cls: type) -> type:
        state = _Link(host, source_schema, helper_schema, helper_table, destination_schema)
        source_class: Any = state.source_class(cls.__name__)
        spec = state.register(source_class.table_name, auto_pull, stores)  # type: ignore[attr-defined]

        def pull(self: Any, *, display_progress: bool = False, timeout: float | None = None) -> PullSummary:
            """Pull the source rows of this restriction (with their parts) to the destination."""
            return state.pull(spec, list(self.fetch("KEY")), display_progress, timeout)

        primary_key = list(source_class.heading.primary_key)
        uuids = [a for a in primary_key if source_class.heading.attributes[a].uuid]

        def flagged(self: Any) -> list[dict[str, Any]]:
            """Primary keys of the entities flagged at the source, read from the helper table now.

            Read at the call, from the helper table itself: a flag set before
            the call is always listed. A restriction: `Table() & Table().source.flagged`.
            Values have the types DataJoint fetches (a `uuid` attribute as a UUID, not its 16 bytes).
            """
            keys = state.flagged(primary_key)
            for key in keys:
                for a in uuids:
                    key[a] = uuid.UUID(bytes=bytes(key[a]))
            return keys

        members = {"pull": pull, "flagged": property(flagged), "__module__": __name__}
        source_view = type(source_class.__name__, (source_class,), members)
        destination = _destination_class(cls.__name__, cls.__doc__, source_class, stores)
        destination.source = property(lambda self: source_view())  # type: ignore[attr-defined]

        def delete(self: Any, *, display_progress: bool = False, timeout: float | None = None) -> DeleteSummary:
            """Delete these entities (with their parts) at the destination, through the source site.

            Asks once under DataJoint's safemode; answering no changes nothing
            anywhere. Returns when the source agent has recorded the outcome:
            the helper row removed (Unshared), or `is_deprecated='TRUE'` for a
            flagged entity (Deprecated).
            """
            keys = [{k: key[k] for k in primary_key} for key in self.fetch("KEY")]
            if not keys:
                return DeleteSummary(message="the restriction matches no rows; nothing to delete")
            dependents = _dependents(self)
            question = f"Delete {len(keys)} {cls.__name__} entities (with their part rows) at the destination"
            if dependents:
                listed = ", ".join(f"{n} of {t.full_table_name}" for t, n in dependents)
                question += f", and the rows here that depend on them ({listed}, with what depends on those)"
            if dj.config["safemode"] and dj.utils.user_choice(question + "?", default="no") != "yes":
                return DeleteSummary(requested=len(keys), message="not deleted: nothing changed")
            for dependent, _ in dependents:  # as DataJoint's delete cascades; its foreign keys would refuse ours
                dependent.delete(safemode=False, force_parts=True)
            return state.delete(spec, keys, display_progress, timeout)

        destination.delete = delete  # type: ignore[attr-defined]
        destination._djlink = (state, spec)  # type: ignore[attr-defined]  # the link behind the class
        _destination_schema(destination_schema)(destination)
        return destination

    return decorate
