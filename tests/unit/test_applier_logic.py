"""Pure logic of the applier: where a restart may resume, which errors are retried, dead-letter records. No services."""

from __future__ import annotations

import random
import threading
from typing import Any

import pymysql
import pytest

import schemas
from consumers.applier import Applier
from consumers.applier.destination import Destination
from consumers.applier.gathering import (
    Event,
    Offset,
    PendingUnit,
    UnitOffsets,
    changed,
    cutoff,
    read_past,
    safe_offsets,
)
from foundation.config import ConfigError, Settings
from foundation.dberrors import describe, is_transient, waiting_out

T, R, C = "p.transaction", "p.db.master", "p.db.master__part"


def unit(end: int | None, *events: tuple[str, int], finished: bool = False) -> UnitOffsets:
    offsets = tuple((topic, 0, offset) for topic, offset in events) + (((T, 0, end),) if end is not None else ())
    return UnitOffsets(end, offsets, finished)


def test_nothing_unfinished_resumes_after_everything_consumed() -> None:
    consumed = {(T, 0): 13, (R, 0): 8}
    assert safe_offsets(consumed, []) == consumed
    assert safe_offsets(consumed, [unit(10, (R, 4), finished=True)]) == consumed
    assert cutoff([unit(10, finished=True)]) is None


def test_an_unfinished_unit_holds_every_partition_at_its_first_message() -> None:
    consumed = {(T, 0): 13, (R, 0): 8, (C, 0): 20}
    gathering = unit(11, (R, 5), (R, 6), (C, 15))
    assert safe_offsets(consumed, [gathering]) == {(T, 0): 11, (R, 0): 5, (C, 0): 15}


def test_a_unit_finished_after_an_unfinished_one_is_read_again_whole() -> None:
    # V (END at 10) still waits for its part event (not consumed yet, C is behind); U (END at 12, its master
    # event at R:7) was applied meanwhile. A per-partition floor would resume R at 8 and T at 10: U's END read
    # again without its event, and U would never complete. The cut keeps U whole after it.
    v = unit(10)
    u = unit(12, (R, 7), finished=True)
    consumed = {(T, 0): 13, (R, 0): 8, (C, 0): 5}
    assert safe_offsets(consumed, [v, u]) == {(T, 0): 10, (R, 0): 7, (C, 0): 5}


def test_units_finished_before_the_first_unfinished_one_do_not_hold() -> None:
    done = unit(8, (R, 3), finished=True)
    gathering = unit(10, (R, 6))
    assert safe_offsets({(T, 0): 11, (R, 0): 7}, [done, gathering]) == {(T, 0): 10, (R, 0): 6}


def test_a_stray_given_up_holds_no_partition_back() -> None:
    # Events of a unit whose END never came (R:4), given up; V waits at R:6 with its END at 10.
    stray = unit(None, (R, 4), finished=True)
    waiting = unit(10, (R, 6))
    assert safe_offsets({(T, 0): 11, (R, 0): 8}, [stray, waiting]) == {(T, 0): 10, (R, 0): 6}


def test_a_unit_without_its_end_yet_comes_after_every_unit_with_one() -> None:
    done = unit(12, (R, 3), finished=True)
    early = unit(None, (R, 9))
    assert cutoff([done, early]) == float("inf")
    assert safe_offsets({(T, 0): 13, (R, 0): 10}, [done, early]) == {(T, 0): 13, (R, 0): 9}


def test_the_cut_never_splits_a_unit_nor_passes_an_unfinished_one() -> None:
    """Random runs: units produced in order over three partitions, consumed in any interleaving."""
    for seed in range(300):
        rng = random.Random(seed)
        # Produce: each unit has events on some of R and C, then its END on T; offsets per partition grow.
        next_offset = {R: 0, C: 0, T: 0}
        produced: list[list[tuple[str, int]]] = []
        for _ in range(rng.randint(1, 12)):
            messages = []
            for topic in (R, C):
                for _ in range(rng.choice([0, 0, 1, 2])):
                    messages.append((topic, next_offset[topic]))
                    next_offset[topic] += rng.choice([1, 1, 2])  # tombstones and markers take offsets too
            messages.append((T, next_offset[T]))
            next_offset[T] += 2  # BEGIN before, END here
            produced.append(messages)
        # Consume each partition up to a random point.
        consumed_to = {topic: rng.randint(0, next_offset[topic]) for topic in (R, C, T)}

        def seen(m: tuple[str, int], to: dict[str, int] = consumed_to) -> bool:
            return m[1] < to[m[0]]

        units = []
        for i, messages in enumerate(produced):
            have = [m for m in messages if seen(m)]
            if not have:
                continue
            complete = len(have) == len(messages)
            end = messages[-1][1] if seen(messages[-1]) else None
            offsets = tuple((t, 0, o) for t, o in have)
            units.append((i, UnitOffsets(end, offsets, complete and rng.random() < 0.7), messages))
        consumed = {(topic, 0): offset for topic, offset in consumed_to.items()}
        cut = safe_offsets(consumed, [u for _, u, _ in units])
        for i, u, messages in units:
            behind = [m for m in messages if m[1] < cut[(m[0], 0)]]
            assert not behind or len(behind) == len(messages), (seed, i, messages, cut)  # never split
            assert u.finished or not behind, (seed, i, cut)  # never past an unfinished unit
        for i, messages in enumerate(produced):  # units not seen at all are wholly ahead
            if not any(seen(m) for m in messages):
                assert all(m[1] >= cut[(m[0], 0)] for m in messages), (seed, i)


def test_only_changed_offsets_are_written() -> None:
    assert changed({(T, 0): 5, (R, 0): 7}, {(T, 0): 5, (R, 0): 6}) == {(R, 0): 7}


def test_pending_unit_is_complete_when_its_end_counts_are_met() -> None:
    pending = PendingUnit()
    assert not pending.complete(frozenset({"db.master"}))
    pending.end = {"data_collections": [{"data_collection": "db.master", "event_count": 1}]}
    pending.end_offset = Offset(T, 0, 4)
    assert not pending.complete(frozenset({"db.master"}))
    assert pending.complete(frozenset({"db.other"}))  # counts of tables not applied do not matter
    pending.add(Offset(R, 0, 2), Event("db.master", {}, {}, b"k", b"v", 0))
    assert pending.complete(frozenset({"db.master"}))
    pending.end["data_collections"][0]["event_count"] = 2
    pending.add(Offset(R, 0, 2), Event("db.master", {}, {}, b"k", b"v", 0))  # read again (a rewind): counts once
    assert not pending.complete(frozenset({"db.master"}))
    pending.end["data_collections"][0]["event_count"] = 1
    assert pending.where(finished=True) == UnitOffsets(4, ((R, 0, 2), (T, 0, 4)), True)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (pymysql.err.OperationalError(2006, "MySQL server has gone away"), True),
        (pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query"), True),
        (pymysql.err.OperationalError(1213, "Deadlock found"), True),
        (pymysql.err.InterfaceError(0, ""), True),
        (pymysql.err.OperationalError(1054, "Unknown column 'x' in 'field list'"), False),
        (pymysql.err.ProgrammingError(1146, "Table 'd.t' doesn't exist"), False),
        (pymysql.err.IntegrityError(1452, "Cannot add or update a child row"), False),
        (pymysql.err.DataError(1406, "Data too long for column 'name'"), False),
        (pymysql.err.OperationalError(4025, "CONSTRAINT `c` failed"), False),
        (ValueError("not a database error"), False),
    ],
)
def test_connection_errors_are_retried_and_data_errors_are_not(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_database_errors_are_described_by_code_and_message() -> None:
    error = pymysql.err.ProgrammingError(1146, "Table 'd.t' doesn't exist")
    assert describe(error) == "(1146) Table 'd.t' doesn't exist"


def test_waiting_out_runs_again_after_transient_errors_only() -> None:
    failures = [pymysql.err.OperationalError(2003, "cannot connect"), ConnectionResetError("reset")]
    warned: list[float] = []
    rolled_back: list[bool] = []

    def attempt() -> str:
        if failures:
            raise failures.pop(0)
        return "read"

    stop = threading.Event()
    stop.wait = lambda timeout=None: False  # type: ignore[method-assign]  # no real pause in a unit test
    assert waiting_out(attempt, stop, lambda e, p: warned.append(p), lambda: rolled_back.append(True)) == "read"
    assert warned == [0.5, 1.0] and rolled_back == [True, True]

    def data_error() -> None:
        raise pymysql.err.IntegrityError(1062, "duplicate")

    with pytest.raises(pymysql.err.IntegrityError):
        waiting_out(data_error, stop, lambda e, p: warned.append(p))
    stop.set()
    failures.append(pymysql.err.OperationalError(2013, "lost"))
    with pytest.raises(pymysql.err.OperationalError):
        waiting_out(attempt, stop, lambda e, p: warned.append(p))
    assert warned == [0.5, 1.0]


def test_the_state_database_name_comes_from_the_environment_and_is_checked() -> None:
    assert Settings.from_env({}).applier_state_db == "djlink_applier"
    assert Settings.from_env({"DJLINK_APPLIER_STATE_DB": "site_state"}).applier_state_db == "site_state"
    with pytest.raises(ConfigError, match="DJLINK_APPLIER_STATE_DB"):
        Settings.from_env({"DJLINK_APPLIER_STATE_DB": "x`; drop database y"})


def test_dead_letter_records_keep_the_original_bytes() -> None:
    codec = schemas.Codec()
    record = {
        "topic": R,
        "partition": 0,
        "offset": 7,
        "key": b"\x00\xff",
        "value": None,
        "reason": "not an Avro single-object encoded value",
        "stage": "decode",
        "unit_id": None,
        "ts_ms": 1,
    }
    assert codec.decode(codec.encode(schemas.FIXED["dead_letter"], record)) == record


class FlakyConnection:
    """Fails the first `failures` transactions with `error`, then works; records what happened."""

    def __init__(self, error: BaseException, failures: int) -> None:
        self.error, self.failures = error, failures
        self.log: list[str] = []

    def ping(self, reconnect: bool = False) -> None:
        self.log.append("ping")

    def cursor(self) -> Any:
        conn = self

        class Cursor:
            def __enter__(self) -> Cursor:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            def execute(self, sql: str) -> None:
                if conn.failures:
                    conn.failures -= 1
                    raise conn.error
                conn.log.append(sql)

        return Cursor()

    def commit(self) -> None:
        self.log.append("commit")

    def rollback(self) -> None:
        self.log.append("rollback")


def destination_with(conn: FlakyConnection) -> Destination:
    destination = Destination(Settings.from_env({}).destination, threading.Event())
    destination._db = conn
    return destination


def test_a_lost_connection_reconnects_and_runs_the_transaction_again() -> None:
    conn = FlakyConnection(pymysql.err.OperationalError(2013, "Lost connection"), failures=2)
    assert destination_with(conn).transact(lambda cur: cur.execute("INSERT") or "done") == "done"
    # No round trip before a transaction; after each failure the connection is checked (and made anew) first.
    assert conn.log == ["rollback", "ping", "rollback", "ping", "INSERT", "commit"]


def test_a_transaction_after_a_good_one_goes_straight_to_work() -> None:
    conn = FlakyConnection(pymysql.err.OperationalError(2013, "Lost connection"), failures=1)
    destination = destination_with(conn)
    destination.transact(lambda cur: cur.execute("INSERT"))
    destination.transact(lambda cur: cur.execute("UPDATE"))
    assert conn.log == ["rollback", "ping", "INSERT", "commit", "UPDATE", "commit"]


def test_a_data_error_rolls_back_and_is_raised() -> None:
    conn = FlakyConnection(pymysql.err.ProgrammingError(1146, "Table 'd.t' doesn't exist"), failures=1)
    with pytest.raises(pymysql.err.ProgrammingError):
        destination_with(conn).transact(lambda cur: cur.execute("INSERT"))
    assert conn.log == ["rollback"]


def test_retrying_stops_when_the_applier_is_told_to_stop() -> None:
    conn = FlakyConnection(pymysql.err.OperationalError(2003, "Can't connect"), failures=1000)
    destination = destination_with(conn)
    destination._stop.set()
    with pytest.raises(pymysql.err.OperationalError):
        destination.transact(lambda cur: cur.execute("INSERT"))


def test_missing_events_are_given_up_only_once_their_partitions_are_read_past_the_unit() -> None:
    a, b = ("db.t", 0), ("db.t", 1)
    ends = {a: 100, b: 50}  # high watermarks
    # Catching up a backlog: nothing read after the unit's END (ts 1000) on b, and b not read to its end.
    assert not read_past([a, b], 1000, {a: 1001, b: 990}, {a: 10, b: 20}, ends.__getitem__)
    # b read past the unit (a message produced after its END), or b read to its end: the events are missing.
    assert read_past([a, b], 1000, {a: 1001, b: 1002}, {a: 10, b: 20}, ends.__getitem__)
    assert read_past([a, b], 1000, {a: 1001, b: 990}, {a: 10, b: 50}, ends.__getitem__)
    # A partition never read, its watermark unknown: not past.
    assert not read_past([a], 1000, {}, {}, lambda p: -1001)
    # A message with the END's own timestamp is not past it (events and END may share a millisecond).
    assert not read_past([b], 1000, {b: 1000}, {b: 20}, ends.__getitem__)


class LostCommitStore:
    """The applier's state tables in memory, as far as `Applier._commit` uses them; what a transaction wrote
    becomes visible when the connection commits."""

    def __init__(self) -> None:
        self.claimed: dict[str, bytes | None] = {}
        self.staged: dict[str, bytes | None] = {}

    def finished_among(self, cur: Any, unit_ids: list[str]) -> dict[str, Any]:
        from consumers.applier.state_store import Finished

        return {u: Finished("applied", self.claimed[u]) for u in unit_ids if u in self.claimed}

    def claim_many(self, cur: Any, units: list[tuple[str, str | None, bytes | None]]) -> None:
        self.staged.update({u: ack for u, _, ack in units})

    def save_entities(self, cur: Any, states: Any, flags: Any) -> None:
        pass

    save_positions = save_tracked = save_offsets = lambda self, cur, rows: None


class LostCommitConnection:
    """A destination connection whose first COMMIT succeeds but whose answer never arrives."""

    def __init__(self, store: LostCommitStore) -> None:
        self.store, self.commits = store, 0

    def ping(self, reconnect: bool) -> None:
        pass

    def cursor(self) -> Any:
        import contextlib

        return contextlib.nullcontext(object())

    def commit(self) -> None:
        self.commits += 1
        self.store.claimed.update(self.store.staged)
        self.store.staged = {}
        if self.commits == 1:
            raise pymysql.err.OperationalError(2013, "Lost connection to server during query")

    def rollback(self) -> None:
        self.store.staged = {}


def test_a_commit_whose_answer_was_lost_still_updates_what_the_applier_remembers() -> None:
    """The retry finds the units claimed: by this very commit, so their entity states, flags and acks must
    reach memory; otherwise the applier would carry on from states the database no longer has."""
    from consumers.applier.planning import Plan
    from consumers.integrity import EntityKey, EntityState, HelperRow, Process

    applier = Applier(Settings.from_env({}))
    store = LostCommitStore()
    applier._store = store  # type: ignore[assignment]
    applier._destination._db = LostCommitConnection(store)
    key = EntityKey("link-1", '{"id":1}')
    end = {"request_id": "r"}
    ack = {"link_id": "link-1", "unit_id": "snapshot:1", "request_id": "r", "keys": [key.key], "rows": 1}
    plan = Plan("snapshot:1", PendingUnit(end=end), "link-1", None, ack=ack)
    plan.states[key] = EntityState(HelperRow(Process.PULL, is_flagged=True), at_destination=True)
    plan.flags[key] = 1234

    applier._commit([plan], {})

    assert list(store.claimed) == ["snapshot:1"]
    sent = store.claimed["snapshot:1"]
    assert sent is not None and schemas.Codec().decode(sent)["keys"] == [key.key]
    assert applier._states.of([key], lambda keys: {})[key].at_destination and applier._states.reads == 0
    assert list(applier._flags.owed()) == [key]
    assert applier._acks.owed() == {"snapshot:1": (applier.topics.acks, "link-1", sent)}
    assert (applier.units_applied, applier.units_skipped) == (1, 0)


def test_a_topic_prefix_that_would_blur_topic_names_is_one_clear_error() -> None:
    for bad in ("lab.a", "", "with space", "a/b"):
        with pytest.raises(ConfigError, match="DJLINK_TOPIC_PREFIX"):
            Settings.from_env({"DJLINK_TOPIC_PREFIX": bad})
    assert Settings.from_env({"DJLINK_TOPIC_PREFIX": "lab-a_2"}).topic_prefix == "lab-a_2"


class Pausing:
    """What a consumer was told to pause and resume (a Reader needs nothing else of it here)."""

    def __init__(self) -> None:
        self.paused: set[tuple[str, int]] = set()
        self.calls = 0

    def pause(self, partitions: list[Any]) -> None:
        self.paused |= {(p.topic, p.partition) for p in partitions}
        self.calls += 1

    def resume(self, partitions: list[Any]) -> None:
        self.paused -= {(p.topic, p.partition) for p in partitions}
        self.calls += 1


def test_an_applier_holding_too_much_reads_only_what_the_unit_everything_waits_for_needs() -> None:
    """A pull's first unit (its helper rows, one source transaction) still misses events while its snapshot
    chunks come in behind it: past DJLINK_APPLIER_HELD_MB only the topics it misses, and the transaction
    topic, are read; once it is applied (nothing held), every topic again."""
    from consumers.applier.reading import Reader
    from consumers.applier.routing import Routes
    from foundation.links import LinkSpec
    from foundation.topics import Topics

    applier = Applier(Settings.from_env({"DJLINK_APPLIER_HELD_MB": "1", "DJLINK_TOPIC_PREFIX": "p"}))
    topics = Topics("p")
    link = LinkSpec.new("src", "rec", "hlp", "out", "dst")
    consumer = Pausing()
    reader = Reader(consumer, topics, schemas.Codec(), applier._gathering, None)  # type: ignore[arg-type]
    reader.routes = Routes.of({link.link_id: link}, topics)
    helper_topic, master_topic = topics.table("hlp", "out"), topics.table("src", "rec")
    reader._assigned = {(topics.transaction, 0), (helper_topic, 0), (master_topic, 0)}
    applier._reader = reader
    first = applier._gathering.unit("0-1-5")
    first.add(Offset(helper_topic, 0, 0), Event("hlp.out", {}, {}, b"k", b"h" * 1000, 0))
    applier._gathering.end(
        "0-1-5",
        {"data_collections": [{"data_collection": "hlp.out", "event_count": 2}]},
        Offset(topics.transaction, 0, 0),
        0,
    )
    chunk = applier._gathering.unit("snapshot:1")
    chunk.add(Offset(master_topic, 0, 0), Event("src.rec", {}, {}, b"k", b"m" * 2_000_000, 0))
    applier._bound_reading()
    assert consumer.paused == {(master_topic, 0)}
    applier._bound_reading()
    assert consumer.calls == 1  # told once
    applier._gathering.finish("0-1-5")
    applier._gathering.finish("snapshot:1")
    applier._bound_reading()
    assert consumer.paused == set() and consumer.calls == 2


def test_snapshot_chunks_hold_about_chunk_bytes_of_rows() -> None:
    from cdc.events import ChangeUnit, Position, RowChange
    from cdc.snapshot import CHUNK_BYTES, SnapshotSource

    def chunk(entities: int, blob: int) -> ChangeUnit:
        rows = [RowChange("d", "t", "r", None, {"id": i, "blob": b"x" * blob}) for i in range(entities)]
        return ChangeUnit("snapshot:x", Position("f", 4, None, 0, 1), True, rows)

    source = SnapshotSource(None, None, 1, chunk_size=500)  # type: ignore[arg-type]
    assert source._next_count(chunk(20, 1024 * 1024), 20) == CHUNK_BYTES // (1024 * 1024 + 8)  # 15 of 1 MiB
    assert source._next_count(chunk(20, 10_000), 20) == 500  # small entities: the configured size
    assert source._next_count(chunk(1, 64 * 1024 * 1024), 1) == 1  # never none
