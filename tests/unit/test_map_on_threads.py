"""hooks.pool.map_on_threads: the worker threads of Partner Center writes and Dataverse's
concurrent calls (issue 16), with ThreadPoolExecutor.map's results and errors."""

from __future__ import annotations

import threading
import time

import pytest

from cosell_sync.hooks.pool import map_on_threads


def test_results_in_the_items_order():
    def work(n: int) -> int:
        time.sleep(0.001 * (n % 3))
        return n * n

    assert map_on_threads(work, list(range(50)), 8) == [n * n for n in range(50)]
    assert map_on_threads(work, [], 8) == []


def test_at_most_the_workers_at_once_and_each_item_once():
    lock, now, peak, seen = threading.Lock(), [0], [0], []

    def work(n: int) -> None:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
            seen.append(n)
        time.sleep(0.01)
        with lock:
            now[0] -= 1

    map_on_threads(work, list(range(40)), 5)
    assert peak[0] == 5
    assert sorted(seen) == list(range(40))


def test_every_item_is_worked_then_the_first_error_in_order_is_raised():
    done: list[int] = []

    def work(n: int) -> int:
        if n in (30, 7):
            time.sleep(0.02 if n == 7 else 0)  # the later item fails first
            raise ValueError(f"item {n}")
        done.append(n)
        return n

    with pytest.raises(ValueError, match="item 7"):
        map_on_threads(work, list(range(40)), 4)
    assert sorted(done) == [n for n in range(40) if n not in (7, 30)]
