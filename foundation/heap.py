"""Memory freed by a role handed back to the system, so that its resident size follows what it holds.

CPython passes objects larger than 512 bytes (row values, blobs, SQL text) to
the C library's malloc. glibc returns freed memory to the system only from the
top of its heaps; memory freed below a block still in use stays resident, so
a role that held a large batch once keeps that resident size long after.
`malloc_trim(0)` releases every free page of every heap (about 25 ms for a
270 MiB heap here). Elsewhere (another C library) it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable

__all__ = ["Trimmer"]


def _malloc_trim() -> Callable[[], None]:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = libc.malloc_trim if libc is not None else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    def run() -> None:
        trim(0)

    return run


class Trimmer:
    """`malloc_trim` when called once `after_bytes` have been freed (as told by `freed`), at most once per
    `every_s` seconds: after a large pull's batches, not in the middle of steady mirroring of small rows, whose
    latency a trim would add to."""

    def __init__(
        self, every_s: float = 1.0, after_bytes: int = 32 << 20, trim: Callable[[], None] | None = None
    ) -> None:
        self._trim = trim or _malloc_trim()
        self._every_s, self._after_bytes = every_s, after_bytes
        self._last = 0.0
        self._freed = 0

    def freed(self, nbytes: int) -> None:
        """About `nbytes` were freed, or will be once the caller lets go of them."""
        self._freed += nbytes

    def __call__(self) -> None:
        """Trim, if enough has been freed since the last trim and that was long enough ago."""
        now = time.monotonic()
        if self._freed >= self._after_bytes and now - self._last >= self._every_s:
            self._last, self._freed = now, 0
            self._trim()
