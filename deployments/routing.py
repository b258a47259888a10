"""Request routers: a conversation's `CSMGenerator` calls go to the replica that holds its KV cache
(`ConversationRouter`), a bridged connection's calls go to the one ingress replica that holds it
(`ConnectionRouter`), and the stream deployments' calls go by Serve's default policy (`StreamRouter`).
All of them that route by multiplexed id forget finished requests (`PrunedRequests`, at the end).

Why a custom `RequestRouter` and not multiplexed ids (which the codec deployments use, `streams.py`): a
multiplexed id reaches the routers through the controller (the replica records the ids it loaded, the
controller broadcasts every replica's id set to every handle), so the second reply of a new conversation
may be routed before its holder is known, each new conversation costs a broadcast that grows with the
number held, Serve's per-replica LRU of ids would be a second eviction policy beside the engine's parked
slots, and a busy holder gives way to the replica with the fewest ids rather than the least loaded one.
The router here remembers, in the caller's own process, which replica accepted each conversation's last
call (`on_request_routed`), so the next one goes there with no extra traffic, and it reads the id from
the request itself (`SpeechRequest.conversation_id`), so the caller passes nothing. The memory is per
calling process: a conversation's calls all come from the ingress replica holding its socket; after a
reconnect to another one, its first reply goes to the least loaded replica (a full prefill) and is
remembered from then on.

Policy, per call: the holder while it is alive and has fewer requests in flight than its engine's slots
(a full engine refuses, `EngineFull`, before Serve's `max_ongoing_requests` would: the replica tells its
`max_slots` in its `record_replica_metadata`, else the `busy_at` router kwarg, else that limit applies);
otherwise, and for calls with no conversation (`info`) or none remembered, the least loaded replica, ties
going to the one holding the fewest conversations (the most room for a new one's cache). A holder that
died took its cache with it: the next reply goes elsewhere, prefills everything, and that replica is the
holder from then on. When every replica is busy the least loaded one still gets the call, which then
fails at once with `EngineFull` (server busy), as without this router.

Serve's base `RequestRouter` hands the replica it picks to the very request it picked it for (no
`FIFOMixin`: that would give the holder of one conversation to whichever request is first in the queue).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

# Conversations remembered per calling process (least recently routed forgotten first): a forgotten one
# only costs a full prefill on its next reply.
MAX_CONVERSATIONS = 65536

__all__ = [
    "ConnectionRouter",
    "ConversationRouter",
    "PrunedRequests",
    "StreamRouter",
    "conversation_of",
    "owner",
    "router_config",
    "stream_router_config",
]


def router_config(busy_at: int | None = None) -> RequestRouterConfig:
    """The `request_router_config` of `CSMGenerator` (`busy_at`: its engine's slots, where known before
    its replicas start)."""
    return RequestRouterConfig(
        request_router_class=ConversationRouter, request_router_kwargs={"busy_at": busy_at}
    )


def conversation_of(request: PendingRequest | None) -> str | None:
    """The conversation a call belongs to: the `conversation_id` of its first argument that has a
    non-empty one (`generate(SpeechRequest)`), else None (`info()`, a reply outside any conversation)."""
    if request is None:
        return None
    for value in (*request.args, *request.kwargs.values()):
        conversation = getattr(value, "conversation_id", None)
        if isinstance(conversation, str) and conversation:
            return conversation
    return None


class ConversationRouter(RequestRouter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.busy_at: int | None = None
        self.max_conversations = MAX_CONVERSATIONS
        self._holders: OrderedDict[str, ReplicaID] = OrderedDict()  # conversation → replica, LRU order
        self._held: Counter[ReplicaID] = Counter()  # replica → conversations it holds

    def initialize_state(
        self, busy_at: int | None = None, max_conversations: int = MAX_CONVERSATIONS
    ) -> None:
        """`request_router_kwargs`: `busy_at`, the requests in flight at which a holder is passed over, for
        replicas that do not tell their `max_slots` (default: their `max_ongoing_requests`)."""
        self.busy_at = busy_at
        self.max_conversations = max_conversations

    def holder(self, conversation: str) -> ReplicaID | None:
        """The replica that accepted `conversation`'s last call (it may have died since)."""
        return self._holders.get(conversation)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """Ranks for Serve to try in order: [holder] if it has room, then every replica, least loaded
        first. Serve takes the least loaded one of a rank that accepts, else the next rank, else retries."""
        conversation = conversation_of(pending_request)
        holder_id = self._holders.get(conversation) if conversation is not None else None
        holder = next((r for r in candidate_replicas if r.replica_id == holder_id), None)
        if holder is not None:
            load = self.replica_queue_len_cache.get(holder.replica_id)
            if load is None or load >= self._busy_at(holder):  # unknown, or maybe busy: ask it now
                load = await self._ask(holder)
            if load is not None and load < self._busy_at(holder):
                return [[holder], self._least_loaded_first(candidate_replicas)]
        unknown = [r for r in candidate_replicas if self.replica_queue_len_cache.get(r.replica_id) is None]
        await asyncio.gather(*(self._ask(r) for r in unknown))
        pool = self._least_loaded_first([r for r in candidate_replicas if r.replica_id in self.curr_replicas])
        return [pool] if pool else []

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        conversation = conversation_of(pending_request)
        if conversation is not None:
            self._remember(conversation, replica_id)

    def _remember(self, conversation: str, replica_id: ReplicaID) -> None:
        self._forget(conversation)
        self._holders[conversation] = replica_id
        self._held[replica_id] += 1
        while len(self._holders) > self.max_conversations:
            self._forget(next(iter(self._holders)))

    def _forget(self, conversation: str) -> None:
        replica_id = self._holders.pop(conversation, None)
        if replica_id is not None:
            self._held[replica_id] -= 1
            if self._held[replica_id] <= 0:
                del self._held[replica_id]

    def _busy_at(self, replica: RunningReplica) -> int:
        limit = replica.max_ongoing_requests
        slots = replica.replica_metadata.get("max_slots", self.busy_at)
        return limit if slots is None else min(slots, limit)

    def _least_loaded_first(self, replicas: Sequence[RunningReplica]) -> list[RunningReplica]:
        """By requests in flight (unknown last), then conversations held, then id (a stable order)."""

        def key(r: RunningReplica) -> tuple[float, int, str]:
            load = self.replica_queue_len_cache.get(r.replica_id)
            return (math.inf if load is None else load, self._held[r.replica_id], r.replica_id.unique_id)

        return sorted(replicas, key=key)

    async def _ask(self, replica: RunningReplica) -> int | None:
        """Requests in flight on `replica`, asked now (and cached for Serve's own choice); None if it
        does not answer in time. A replica found dead is dropped from routing. The deadline is Serve's
        longest (1 s by default), not its first (0.1 s): only a replica whose cached load expired is
        asked, a busy CPU replica can be slow to answer, and a wrong "no answer" costs a whole prefill."""
        deadline_s = self.max_queue_len_response_deadline_s
        try:
            load = await asyncio.wait_for(replica.get_queue_len(deadline_s=deadline_s), deadline_s)
        except ActorDiedError:
            self.on_replica_actor_died(replica.replica_id)
            return None
        except ActorUnavailableError:
            self.on_replica_actor_unavailable(replica.replica_id)
            return None
        except (TimeoutError, RayActorError):
            return None
        self.replica_queue_len_cache.update(replica.replica_id, load)
        return load


def owner(connection: str, replicas: Sequence[str]) -> str | None:
    """The replica (by unique id) that holds `connection`: the highest hash of the pair (rendezvous
    hashing), so every router that sees the same replicas agrees, with no state, and a replica that comes
    or goes moves only the connections it gains or held."""

    def score(replica: str) -> bytes:
        return hashlib.blake2b(f"{connection}\0{replica}".encode(), digest_size=8).digest()

    return max(replicas, key=score, default=None)


class PrunedRequests:
    """Mixin for a router whose calls carry multiplexed ids, many of them used for a while and then never
    again (a turn's or a reply's stream, a bridged connection). Serve 2.60 indexes pending requests by
    multiplexed id (`_pending_requests_by_model_id`) and drops an id's finished ones only when a later
    request with the same id is routed, so each id's last request, arguments included, stayed in the
    calling process for good: every turn's audio buffer in the ingress (the soak's growth, ~4 MB/min at 8
    people), every bridged event in the proxies. Before each routing decision this drops the finished
    requests of every id, and the ids left with none; what stays is what is still being routed."""

    def prune_finished_requests(self) -> int:
        """Forget finished requests in the by-id index; how many were dropped."""
        index = getattr(self, "_pending_requests_by_model_id", None)
        if not index:  # absent (another Serve version) or empty
            return 0
        dropped = 0
        for model_id, queue in list(index.items()):
            live = [request for request in queue if not request.future.done()]
            dropped += len(queue) - len(live)
            if live:
                queue.clear()
                queue.extend(live)
            else:
                del index[model_id]
        return dropped


class StreamRouter(PrunedRequests, PowerOfTwoChoicesRequestRouter):
    """Serve's default router (power of two choices, preferring the replica that holds the call's
    multiplexed id), for the deployments that keep per-stream state (`AudioTokenizer`, `AudioDecoder`,
    `SpeechRecognizer`: a stream id per turn or reply), with finished requests forgotten."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        self.prune_finished_requests()
        return await super().choose_replicas(candidate_replicas, pending_request)


def stream_router_config() -> RequestRouterConfig:
    """The `request_router_config` of the stream deployments."""
    return RequestRouterConfig(request_router_class=StreamRouter)


class ConnectionRouter(PrunedRequests, RequestRouter):
    """The ingress's router. A bridged call names its API Gateway connection (the Lambda's
    `serve_multiplexed_model_id` header) and must reach the replica holding that connection's session,
    from whichever proxy it comes through: `owner` of the connection among the running replicas, decided
    from the id alone. Serve's own multiplexed routing cannot promise that: a replica's ids reach the
    proxies through the controller, so the calls right after `$connect` could land anywhere (measured:
    with two replicas the third connection's first events went to the other one, 404). While the owner
    is at `max_ongoing_requests` the call waits for it, as it must. When the replicas change, the
    connections whose owner changed get 404 and API Gateway's socket is closed; the page reconnects and
    resumes its conversation. Everything else (the socket, the page, health) goes to the less loaded of
    two replicas picked at random, Serve's default policy."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        self.prune_finished_requests()
        connection = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if connection:
            by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
            held_by = owner(connection, sorted(by_id))
            return [[by_id[held_by]]] if held_by is not None else []
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
