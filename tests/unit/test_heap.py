"""foundation.heap: freed memory handed back to the system, once enough is freed, at most once per interval."""

from __future__ import annotations

from foundation.heap import Trimmer


def test_a_trimmer_trims_once_enough_is_freed() -> None:
    calls: list[int] = []
    trim = Trimmer(every_s=0, after_bytes=100, trim=lambda: calls.append(1))
    trim.freed(60)
    trim()
    assert calls == []
    trim.freed(60)
    trim()
    assert calls == [1]
    trim.freed(60)  # counted from the last trim
    trim()
    assert calls == [1]


def test_a_trimmer_trims_at_most_once_per_interval() -> None:
    calls: list[int] = []
    trim = Trimmer(every_s=3600, after_bytes=1, trim=lambda: calls.append(1))
    for _ in range(3):
        trim.freed(10)
        trim()
    assert calls == [1]


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def test_trimming_returns_memory_freed_below_memory_still_held_to_the_system() -> None:
    """Every other 9 KiB block of 200 MiB freed: glibc keeps the holes resident until malloc_trim."""
    blocks = [bytes(9000) for _ in range(23_000)]
    del blocks[::2]
    before = _rss_mib()
    Trimmer(every_s=0, after_bytes=0)()
    assert _rss_mib() < before - 50, (before, _rss_mib())
    del blocks
