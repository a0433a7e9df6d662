"""Counters: exact under threads, whatever the number of unfolded events."""

from __future__ import annotations

import threading

from replicated_core.counters import Counters


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
