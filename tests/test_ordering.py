"""The reordering rules for concurrently delivered client events (serve_app/ordering.py), without a
server: numbered events come out in the client's order, a gap is stepped over after the window and
counted, a late or repeated number neither blocks nor doubles anything, unnumbered events keep arrival
order."""

from __future__ import annotations

import asyncio
import random

from serve_app.ordering import Reorderer


def collector() -> tuple[list[int], Reorderer[int]]:
    out: list[int] = []

    async def deliver(item: int) -> None:
        await asyncio.sleep(0)  # a delivery that yields, as the ingress's does
        out.append(item)

    return out, Reorderer(deliver, window_s=0.05)


async def until(condition, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_events_delivered_concurrently_come_out_in_the_clients_order():
    out, order = collector()
    rng = random.Random(7)

    async def arrive(seq: int) -> None:
        await asyncio.sleep(rng.random() * 0.02)
        await order.push(seq, seq)

    await asyncio.gather(*(arrive(seq) for seq in range(1, 61)))
    await until(lambda: len(out) == 60)
    assert out == list(range(1, 61))
    assert order.stats.reordered > 0 and order.stats.gaps == 0 and order.waiting == 0


async def test_a_gap_is_stepped_over_after_the_window_and_a_late_event_still_applies():
    out, order = collector()
    await order.push(1, 1)
    await order.push(3, 3)
    await order.push(4, 4)
    assert out == [1] and order.waiting == 2  # 3 and 4 wait for 2
    await until(lambda: len(out) == 3)
    assert out == [1, 3, 4] and order.stats.gaps == 1
    await order.push(2, 2)  # it came after all: applied, not waited for
    await order.push(3, 3)  # a repeat: dropped
    await order.push(5, 5)
    assert out == [1, 3, 4, 2, 5]
    assert (order.stats.late, order.stats.duplicates, order.stats.gaps) == (1, 1, 1)


async def test_unnumbered_events_keep_arrival_order():
    out, order = collector()
    for item in (10, 30, 20):
        await order.push(None, item)
    assert out == [10, 30, 20] and order.stats.reordered == 0


async def test_too_many_early_events_step_over_the_gap_at_once():
    out: list[int] = []

    async def deliver(item: int) -> None:
        out.append(item)

    order = Reorderer(deliver, window_s=3600, max_pending=4)  # the window would never end in this test
    for seq in range(2, 7):
        await order.push(seq, seq)
    assert out == [2, 3, 4, 5, 6] and order.stats.gaps == 1


async def test_closing_delivers_what_waits_in_order():
    out: list[int] = []

    async def deliver(item: int) -> None:
        out.append(item)

    order = Reorderer(deliver, window_s=3600)
    await order.push(5, 5)
    await order.push(3, 3)
    await order.close()
    assert out == [3, 5] and order.stats.gaps == 3  # 1, 2 and 4 never came
