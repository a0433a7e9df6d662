"""Counters: exact under threads, whatever the number of unfolded events."""

from __future__ import annotations

import sys
import threading

from replicated_core.counters import Counters, Durations


def test_counts_are_exact_across_threads_and_folds():
    counters = Counters()
    read, write = ("requests_total", "requests_to_replica"), ("requests_total", "writes")
    seen: list[dict[str, int]] = []

    def work() -> None:
        for i in range(5_000):
            counters.add_event(read if i % 4 else write)
            if i % 1_000 == 0:
                seen.append(counters.snapshot())  # reading while others count

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counters.add("retries")
    assert counters.snapshot() == {
        "requests_total": 20_000,
        "requests_to_replica": 15_000,
        "writes": 5_000,
        "retries": 1,
    }
    assert all(0 < s["requests_total"] <= 20_000 for s in seen)


def test_a_few_events_are_counted_before_any_fold():
    counters = Counters()
    counters.add("fallbacks")
    counters.add("fallbacks", "sticky_hits")
    assert counters.snapshot() == {"fallbacks": 2, "sticky_hits": 1}


def test_a_snapshot_counts_every_event_added_before_it():
    """Other threads append while a snapshot folds: what they add then waits for the
    next fold, but nothing added before the snapshot began may. (The race is narrow:
    the threads switch as often as Python allows, in a few rounds.)"""
    short: list[tuple[int, int]] = []

    def work(counters: Counters, number: int) -> None:
        name = f"thread{number}"
        for added in range(1, 20_001):
            counters.add_event((name,))
            if added % 50 == 0:
                counted = counters.snapshot()[name]
                if counted != added:
                    short.append((added, counted))

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(3):
            counters = Counters()
            threads = [threading.Thread(target=work, args=(counters, n)) for n in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        sys.setswitchinterval(switch)
    assert short == []


def test_durations_keep_samples_for_a_drain_only_when_asked() -> None:
    """Before keep_samples() nothing is kept (the histogram alone); after it, each
    duration once, for the multiprocess mirror."""
    durations = Durations((0.01, 0.1))
    durations.observe(0.005)
    assert durations.drain() == []
    durations.keep_samples()
    durations.observe(0.05)
    durations.observe(2.0)
    assert durations.drain() == [0.05, 2.0]
    assert durations.drain() == []
    counts, total = durations.snapshot()
    assert counts == [1, 1, 1]
    assert abs(total - 2.055) < 1e-9
