"""The role runner: the capture, the source agent and the applier, each in a thread of one process.

`djlink run` (djlink.cli) and the demo start roles through `run_roles`; the
first role to fail stops the others and its error is raised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from foundation.config import Settings


class Role(StrEnum):
    """The roles a site runs: capture and agent at the source, applier at the destination."""

    capture = "capture"
    agent = "agent"
    applier = "applier"


def service(role: Role, settings: Settings) -> Any:
    """The role's service object (imported when asked for: a site runs only what it owns)."""
    if role is Role.capture:
        from cdc.coordinator import Capture

        return Capture(settings)
    if role is Role.agent:
        from consumers.agent import SourceAgent

        return SourceAgent(settings)
    from consumers.applier import Applier

    return Applier(settings)


def run_roles(
    roles: list[Role],
    settings: Settings,
    stop: threading.Event,
    on_ready: Callable[[], None],
    on_failure: Callable[[str], None] | None = None,
) -> None:
    """Run each role in a thread until `stop` is set or one of them fails (then raise its error).

    `on_ready` is called once every role is ready; `on_failure` with the role's name when one fails."""
    failures: list[BaseException] = []
    ready = threading.Semaphore(0)
    # Made here, one after another: imported by the roles' threads at once, confluent-kafka's modules (which
    # import each other) could be met half initialized ("cannot import name ... partially initialized module").
    services = {role: service(role, settings) for role in roles}

    def body(role: Role) -> None:
        try:
            services[role].run(stop, ready.release)
        except BaseException as exc:
            failures.append(exc)
            if on_failure is not None:
                on_failure(f"{role.value}: {type(exc).__name__}")
            stop.set()
            ready.release()

    threads = [threading.Thread(target=body, args=(r,), name=r.value, daemon=True) for r in roles]
    for t in threads:
        t.start()
    for _ in roles:
        ready.acquire()
    if not failures:
        on_ready()
    for t in threads:
        while t.is_alive():
            t.join(0.5)
    if failures:
        raise failures[0]
