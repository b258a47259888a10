"""The open conversations of one ingress replica, whichever carrier holds them: the direct WebSocket or
the Lambda bridge, through the same `Sessions.open` and `Sessions.close`.

A session's life: `admit` (one of `max_conversations` places, refused at once when full, never queued;
and one of its principal's places) → the history lease (the newest connection to a conversation holds
it; an older one is taken over) → the `Conversation` starts, its events queued on the session's outbox
→ ... → `close`: the conversation stops, then the lease goes, then the places. `open` gives back what it
took when any step fails, and `close` runs once however often it is called, so neither a refusal nor an
error can leak a place. The carrier drains the outbox (the socket's emit loop, the bridge's pump) until
`None`, and calls `close` when its connection ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field

from csm.audio import SAMPLES_PER_MS
from serve_app import protocol as p
from serve_app.conversation import Conversation, Shared
from serve_app.history import LEASE_S, ConversationNotFound, HistoryStore
from serve_app.ingress_config import IngressConfig
from serve_app.ordering import Reorderer
from serve_app.principals import RENEW_S, ClusterCounts
from serve_app.services import Services

log = logging.getLogger(__name__)

CLOSE_TAKEN_OVER = 4001  # the page does not reconnect after it (it would take the conversation back)
BUSY = "the server is at capacity; try again shortly"
NOT_FOUND = "no conversation with that id is yours to resume; connect without conversation_id for a new one"
TAKEN_OVER = "this conversation was opened on another connection, which now has it"


class Refused(Exception):
    """No session: `code` is "server_busy", "limit_exceeded" (the principal's places) or
    "conversation_not_found"; the message says why, in words a client may see."""

    def __init__(self, code: p.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: p.ErrorCode = code


class _RateLimit:
    """Token bucket: `rate` events per second sustained, `burst` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.at = float(burst), time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class _Lease:
    """A conversation's history, held by one connection. Every LEASE_S / 3 it checks that it still holds
    it; once a newer connection took it over (here or on another replica), `lost` runs."""

    def __init__(self, store: HistoryStore, conversation_id: str, holder: str, history: list) -> None:
        self.store, self.conversation_id, self.holder, self.history = store, conversation_id, holder, history
        self._watch_task: asyncio.Task | None = None

    def watch(self, lost: Callable[[], None]) -> None:
        self._watch_task = asyncio.get_running_loop().create_task(self._watch(lost))

    async def release(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        await self.store.release(self.conversation_id, self.holder)

    async def _watch(self, lost: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(LEASE_S / 3)
            try:
                held = await self.store.holds(self.conversation_id, self.holder)
            except OSError:
                log.warning("conversation lease check failed", exc_info=True)
                continue
            if not held:
                lost()
                return


@dataclass(frozen=True)
class _Inbound:
    """What every client message must pass before it reaches the conversation."""

    events_per_second: float
    event_burst: int
    max_message_bytes: int
    max_audio_bytes: int  # in one `input_audio_buffer.append`


@dataclass(eq=False)
class Session:
    """One open conversation and its connection: the outbound queue, the inbound checks, how it closes."""

    conversation: Conversation
    principal: str
    outbox: asyncio.Queue[p.ServerEvent | None]
    inbound: _Inbound
    lease: _Lease
    release_place: Callable[[], None]
    rate: _RateLimit = field(init=False)
    order: Reorderer[p.ClientEvent | None] = field(init=False)
    close_code: int = 1000
    close_reason: str = ""
    closed: bool = False

    def __post_init__(self) -> None:
        self.rate = _RateLimit(self.inbound.events_per_second, self.inbound.event_burst)
        self.order = Reorderer(self._apply)

    @property
    def id(self) -> str:
        return self.conversation.id

    def take_over(self) -> None:
        """A newer connection has the conversation: say so, then the carrier ends this connection."""
        if self.closed or self.close_code == CLOSE_TAKEN_OVER:
            return
        self.close_code, self.close_reason = CLOSE_TAKEN_OVER, "taken over"
        self.outbox.put_nowait(p.error_event("conversation_taken_over", TAKEN_OVER))
        self.outbox.put_nowait(None)

    async def receive(self, raw: str | bytes) -> None:
        """One client message: rate-limited, parsed, handed to the conversation in the client's order
        (`x-seq`, when it numbers its events); bad ones become `error` at once."""
        try:
            if not self.rate.allow():
                rate = self.inbound.events_per_second
                raise p.ProtocolError("rate_limited", f"over {rate:g} events per second; event dropped")
            event = p.parse_client_event(
                raw, self.inbound.max_message_bytes, max_audio_bytes=self.inbound.max_audio_bytes
            )
        except p.ProtocolError as refused:
            self.conversation.report(refused)
            # The events after it need not wait for it (a message too large is not read at all).
            if refused.code != "message_too_large" and (seq := p.sequence_number(raw)) is not None:
                await self.order.push(seq, None)
            return
        await self.order.push(event.x_seq, event)

    async def _apply(self, event: p.ClientEvent | None) -> None:
        if event is not None:
            await self.conversation.handle(event)


class Sessions:
    """Admission and every open session of this replica (`active`), by conversation id (`live`)."""

    def __init__(
        self,
        cfg: IngressConfig,
        services: Services,
        shared: Shared,
        hello: Callable[[str], Awaitable[p.ServerInfo]],
        count: Callable[[int], None] = lambda n: None,
        refused: Callable[[], None] = lambda: None,
        cluster: ClusterCounts | None = None,
    ) -> None:
        """`hello`: a conversation's first event after `session.created`; `count` and `refused`: where
        the number of open sessions and each refusal are reported (the ingress's metrics); `cluster`: the
        count per principal this replica shares with the others (`serve_app.principals`, on Ray); without
        it each replica counts alone."""
        self.services, self.shared, self.store = services, shared, shared.store
        self._hello, self._count, self._refused = hello, count, refused
        self.slots = asyncio.Semaphore(cfg.max_conversations)
        self.per_principal_limit = cfg.max_conversations_per_token
        self.cluster = cluster if self.per_principal_limit is not None else None
        # This replica's places per principal (what it tells the cluster's count).
        self.per_principal: Counter[str] = self.cluster.held if self.cluster is not None else Counter()
        self._background: set[asyncio.Task] = set()
        self.inbound = _Inbound(
            cfg.events_per_second,
            cfg.event_burst,
            cfg.max_message_bytes,
            cfg.max_audio_ms_per_message * SAMPLES_PER_MS * 2,  # PCM16: two bytes a sample
        )
        self.active: set[Session] = set()
        self.live: dict[str, Session] = {}  # conversation id → the session that holds it here
        self._sweeper: asyncio.Task | None = None
        self._renewer: asyncio.Task | None = None

    async def admit(self, principal: str) -> Callable[[], None]:
        """A place for one conversation (or speech request) of `principal`, taken now or refused at once
        (`Refused`), never queued; returns what gives it back, once however often it is called."""
        if self.slots.locked():
            self._refused()
            raise Refused("server_busy", BUSY)
        await self.slots.acquire()  # not locked: returns at once, nothing runs between the check and this
        try:
            allowed = await self._take(principal)
        except BaseException:
            self.slots.release()
            raise
        if not allowed:
            self.slots.release()
            self._refused()
            limit = self.per_principal_limit
            raise Refused(
                "limit_exceeded", f"this token already holds {limit} open conversations; close one first"
            )
        self.per_principal[principal] += 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self._give_back(principal)
                if self.cluster is not None:
                    self._in_background(self.cluster.release(principal))

        return release

    async def _take(self, principal: str) -> bool:
        """Whether `principal` may hold one more: on this replica's count, or the cluster's."""
        limit = self.per_principal_limit
        if limit is None:
            return True
        if self.cluster is None:
            return self.per_principal[principal] < limit
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew())
        return await self.cluster.take(principal, limit)

    def _give_back(self, principal: str) -> None:
        self.slots.release()
        self.per_principal[principal] -= 1
        if self.per_principal[principal] <= 0:
            del self.per_principal[principal]

    def _in_background(self, work: Coroutine) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _renew(self) -> None:
        """Send this replica's holdings to the cluster's count every RENEW_S (see serve_app.principals)."""
        assert self.cluster is not None
        while True:
            await asyncio.sleep(RENEW_S)
            await self.cluster.renew()

    async def open(self, principal: str, requested: str | None) -> Session:
        """`principal`'s conversation `requested` (its history), or a new one, started and held by the
        returned session until `close`. Raises `Refused`; whatever it took is given back if it raises."""
        release_place = await self.admit(principal)
        try:
            lease = await self._claim(requested, principal)
            try:
                outbox: asyncio.Queue[p.ServerEvent | None] = asyncio.Queue()
                conversation = Conversation(
                    lease.conversation_id, self.services, self.shared, outbox.put_nowait, lease.history
                )
                conversation.start()
                outbox.put_nowait(await self._hello(lease.conversation_id))
            except BaseException:
                await lease.release()
                raise
        except BaseException:
            release_place()
            raise
        session = Session(conversation, principal, outbox, self.inbound, lease, release_place)
        lease.watch(session.take_over)
        self.active.add(session)
        self.live[session.id] = session
        self._count(len(self.active))
        return session

    async def close(self, session: Session) -> None:
        """End `session` (its carrier reads `None` next); the first call does it, later ones return."""
        if session.closed:
            return
        session.closed = True
        try:
            await session.order.close()  # what came out of order is applied, then nothing more
            await session.conversation.close()  # before the lease goes: nothing is written after it
        finally:
            session.outbox.put_nowait(None)
            self.active.discard(session)
            if self.live.get(session.id) is session:
                del self.live[session.id]
            self._count(len(self.active))
            try:
                await session.lease.release()
            finally:
                session.release_place()

    async def _claim(self, requested: str | None, principal: str) -> _Lease:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        try:
            if requested is None:
                conversation_id, history = await self.store.create(principal), []
            else:
                conversation_id, history = requested, await self.store.open(requested, principal)
        except ConversationNotFound:
            raise Refused("conversation_not_found", NOT_FOUND) from None
        holder = p.new_id("conn")
        await self.store.claim(conversation_id, holder)
        older = self.live.get(conversation_id)
        if older is not None:  # on this replica: ended now (on another, at its next lease check)
            older.take_over()
        return _Lease(self.store, conversation_id, holder, history)

    async def _sweep(self) -> None:
        """Delete conversations past their retention: now, then hourly (every replica does; it is cheap)."""
        while True:
            try:
                gone = await self.store.sweep()
                if gone:
                    log.info("history: %d conversations past their retention deleted", gone)
            except OSError:
                log.warning("history sweep failed", exc_info=True)
            await asyncio.sleep(3600)
