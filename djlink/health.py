"""The metrics and health endpoint of a `djlink run` process (DJLINK_METRICS_PORT, on 127.0.0.1).

- `/metrics`: Prometheus metrics of every role the process runs (`djlink_capture_*`, `djlink_agent_*`,
  `djlink_applier_*`);
- `/healthz`: 200 while the process runs (it answers at all);
- `/readyz`: 200 once every role is connected and consuming, 503 before that and after one has failed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


class JsonLines(logging.Formatter):
    """One JSON object per log record (DJLINK_LOG_FORMAT=json): ts, level, logger, thread, message[, error]."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(log_format: str, verbose: bool) -> None:
    """The process's log: human-readable lines, or JSON lines; DEBUG with `verbose`."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines() if log_format == "json" else logging.Formatter("%(asctime)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)


class Readiness:
    """Whether every role of the process is ready (set by the role runner)."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._failed = threading.Event()
        self.reason = "starting"

    def ready(self) -> None:
        self.reason = "ready"
        self._ready.set()

    def failed(self, reason: str) -> None:
        self.reason = f"failed: {reason}"
        self._failed.set()

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and not self._failed.is_set()


def serve(port: int, readiness: Readiness) -> ThreadingHTTPServer:
    """Serve the three paths on 127.0.0.1:`port` in a daemon thread; return the server."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._answer(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                self._answer(200, b"alive\n")
            elif self.path == "/readyz":
                ok = readiness.is_ready
                self._answer(200 if ok else 503, f"{readiness.reason}\n".encode())
            else:
                self._answer(404, b"not found: /metrics, /healthz, /readyz\n")

        def _answer(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would fill the role's log

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
