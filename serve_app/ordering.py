"""A connection's client events back in the order the client sent them, when they may arrive out of it.

API Gateway may invoke `$default` concurrently for one connection, so two events of one person (two audio
chunks, or an append and its commit) can reach the ingress in either order. A client that numbers its
events (`x-seq`: 1, 2, 3, ... per connection; the page and the tests' client do) gets them applied in that
order: an early one waits, within a bounded window, for the ones before it. A number that does not come
within the window is a gap: counted and stepped over, never waited on again; if it turns up later it is
applied then ("late"), and a number seen twice is dropped ("duplicate"). Events without a number keep
arrival order. A plain object, so the rules are tested without a server (tests/test_ordering.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

WINDOW_S = 1.0  # how long an early event waits for the ones before it
MAX_PENDING = 256  # early events held at most (about 10 s of 40 ms audio chunks); past it, a gap


@dataclass
class OrderStats:
    reordered: int = 0  # events that waited for an earlier one
    gaps: int = 0  # numbers stepped over after the window
    late: int = 0  # stepped-over numbers that came afterwards (applied then)
    duplicates: int = 0  # numbers seen again (dropped)


class Reorderer(Generic[T]):
    """Calls `deliver` once per event, one at a time, in the client's order; see the module docstring."""

    def __init__(
        self,
        deliver: Callable[[T], Awaitable[None]],
        window_s: float = WINDOW_S,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self._deliver = deliver
        self.window_s, self.max_pending = window_s, max_pending
        self.stats = OrderStats()
        self._next = 1
        self._pending: dict[int, T] = {}
        self._skipped: set[int] = set()
        self._lock = asyncio.Lock()  # deliveries never overlap, so their order is the order of the calls
        self._timer: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        return len(self._pending)

    async def push(self, seq: int | None, item: T) -> None:
        """Take one event; returns once every event it releases has been delivered (or it waits)."""
        if seq is None:
            async with self._lock:
                await self._deliver(item)
            return
        if seq < self._next or seq in self._pending:
            if seq in self._skipped:
                self._skipped.discard(seq)
                self.stats.late += 1
                async with self._lock:
                    await self._deliver(item)
            else:
                self.stats.duplicates += 1
            return
        if seq != self._next:
            self.stats.reordered += 1
        self._pending[seq] = item
        if len(self._pending) > self.max_pending:
            self._step_over_gap()
        await self._drain()

    async def close(self) -> None:
        """Deliver what still waits, in order, stepping over the gaps (the connection is ending)."""
        while self._pending:
            self._step_over_gap()
            await self._drain()
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer

    async def _drain(self) -> None:
        async with self._lock:
            while self._next in self._pending:
                item = self._pending.pop(self._next)
                self._next += 1
                await self._deliver(item)
        if self._pending and self._timer is None:
            self._timer = asyncio.create_task(self._wait_for_gap(self._next))

    async def _wait_for_gap(self, missing: int) -> None:
        try:
            await asyncio.sleep(self.window_s)
        finally:
            self._timer = None
        if self._next == missing and self._pending:
            self._step_over_gap()
        try:
            await self._drain()
        except Exception:  # no caller waits on this delivery: its failure is only logged
            log.exception("delivering events after a gap failed")

    def _step_over_gap(self) -> None:
        first = min(self._pending)
        if first > self._next:
            missing = range(self._next, first)
            self._skipped.update(missing)
            self.stats.gaps += len(missing)
            log.warning(
                "client events %d..%d did not come within %.1f s: stepped over",
                missing[0],
                first - 1,
                self.window_s,
            )
            self._next = first
