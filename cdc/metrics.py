"""What the capture reports about itself: throughput, lag behind the source, last committed position.

Prometheus metrics (served on DJLINK_METRICS_PORT when set) and a log line
every `LOG_INTERVAL_S`; `djlink status` reads the committed position from the
checkpoint topic, so it needs no access to the capture process.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Gauge, Info

from cdc.events import ChangeUnit
from cdc.offsets import Checkpoint

log = logging.getLogger(__name__)
LOG_INTERVAL_S = 30.0

EVENTS = Counter("djlink_capture_events", "Row change events committed to Kafka (snapshot reads included)")
UNITS = Counter("djlink_capture_units", "Units (source transactions and snapshot chunks) committed to Kafka")
LAG_MS = Gauge("djlink_capture_lag_ms", "Source commit time of the last committed streamed unit, ms behind now")
LAST_COMMIT = Gauge("djlink_capture_last_commit_timestamp_seconds", "When the capture last committed to Kafka")
POSITION = Info("djlink_capture_position", "Last committed binlog position")


class CaptureMetrics:
    def __init__(self) -> None:
        self._window_start = time.monotonic()
        self._window_events = 0
        self._last_log = time.monotonic()
        self.events_per_s = 0.0
        self.lag_ms = 0.0
        self.checkpoint: Checkpoint | None = None

    def committed(self, units: list[ChangeUnit], checkpoint: Checkpoint | None, caught_up: bool) -> None:
        """Record one Kafka transaction; `caught_up`: nothing else was waiting to be published."""
        now = time.time()
        events = sum(len(u.changes) for u in units)
        EVENTS.inc(events)
        UNITS.inc(len(units))
        LAST_COMMIT.set(now)
        streamed = [u for u in units if not u.snapshot]
        if streamed:
            self.lag_ms = max(0.0, now * 1000 - streamed[-1].position.ts_ms)
        elif caught_up:
            self.lag_ms = 0.0
        LAG_MS.set(self.lag_ms)
        if checkpoint is not None:
            self.checkpoint = checkpoint
            POSITION.info(
                {"gtid_position": checkpoint.gtid_position, "file": checkpoint.file, "pos": str(checkpoint.pos)}
            )
        self._window_events += events
        elapsed = time.monotonic() - self._window_start
        if elapsed >= 1.0:
            self.events_per_s = self._window_events / elapsed
            self._window_start, self._window_events = time.monotonic(), 0
        if time.monotonic() - self._last_log >= LOG_INTERVAL_S:
            self._last_log = time.monotonic()
            log.info(
                "capture: %.0f events/s, %.0f ms behind the source, at %s",
                self.events_per_s,
                self.lag_ms,
                self.checkpoint.gtid_position if self.checkpoint else "(no checkpoint)",
            )
