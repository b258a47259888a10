"""How many conversations each principal holds across every ingress replica, so that
`max_conversations_per_token` is one limit for the cluster, not one per replica.

`PrincipalCounts` is a plain object; on Ray it lives in one small named actor (`shared_counts`), which every
ingress replica asks once per conversation opened (`take`) and closed (`release`): never per event. Only
when a limit is configured (`max_conversations_per_token`): without one no actor is made or asked. Each
replica also sends its own holdings every `RENEW_S` (`renew`), which replaces what the actor remembers of
it; so a restarted actor is whole again within one period, and a replica that died stops counting once it
has been silent for `EXPIRY_S`. A conversation's event rate limit needs none of this: a conversation lives
on one replica.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

ACTOR_NAME = "csm-principal-counts"
RENEW_S = 10.0
EXPIRY_S = 3 * RENEW_S


class PrincipalCounts:
    """Open conversations per principal, kept per holder (an ingress replica); see the module docstring."""

    def __init__(self, expiry_s: float = EXPIRY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.expiry_s = expiry_s
        self._clock = clock
        self._held: dict[str, Counter[str]] = {}
        self._seen: dict[str, float] = {}

    def take(self, holder: str, principal: str, limit: int | None) -> bool:
        """One more conversation for `principal` on `holder`, unless the principal holds `limit` already."""
        self._expire()
        if limit is not None and self.held(principal) >= limit:
            return False
        self._held.setdefault(holder, Counter())[principal] += 1
        self._seen[holder] = self._clock()
        return True

    def release(self, holder: str, principal: str) -> None:
        counts = self._held.get(holder)
        if counts is None or counts[principal] <= 0:
            return  # renewed or expired since: nothing of it is counted any more
        counts[principal] -= 1
        if counts[principal] == 0:
            del counts[principal]

    def renew(self, holder: str, counts: Mapping[str, int]) -> None:
        """`holder` says what it holds now: that replaces what was recorded of it."""
        self._held[holder] = Counter({p: n for p, n in counts.items() if n > 0})
        self._seen[holder] = self._clock()
        self._expire()

    def held(self, principal: str) -> int:
        return sum(counts[principal] for counts in self._held.values())

    def _expire(self) -> None:
        now = self._clock()
        for holder in [h for h, at in self._seen.items() if now - at > self.expiry_s]:
            del self._seen[holder]
            self._held.pop(holder, None)


class ClusterCounts:
    """One ingress replica's side of the shared counts of `scope` (its Serve app: every replica of one
    ingress deployment shares one count). `held` is what this replica holds (its `Sessions` counts in
    it); `take` and `release` ask the actor, `renew` sends `held`. If the actor cannot answer (it is
    restarting), the replica decides alone from `held`, and says so in the log: a person is never refused
    because bookkeeping is down. Cost: one actor call per conversation opened and one per closed (about a
    millisecond on one node), one per replica every RENEW_S; none per event."""

    def __init__(self, holder: str, scope: str, actor=None) -> None:
        self.holder = holder
        self.held: Counter[str] = Counter()
        self._actor = actor if actor is not None else shared_counts(scope)

    async def take(self, principal: str, limit: int | None) -> bool:
        try:
            return await self._actor.take.remote(self.holder, principal, limit)
        except Exception as e:  # the actor is restarting: this replica's own count decides
            log.warning("principal counts unavailable (%s): deciding on this replica's count", e)
            return limit is None or self.held.get(principal, 0) < limit

    async def release(self, principal: str) -> None:
        try:
            await self._actor.release.remote(self.holder, principal)
        except Exception as e:  # the next renewal carries it
            log.warning("principal counts unavailable (%s): the release goes with the next renewal", e)

    async def renew(self) -> None:
        try:
            await self._actor.renew.remote(self.holder, dict(self.held))
        except Exception as e:
            log.warning("principal counts unavailable (%s): renewing next period", e)


def shared_counts(scope: str):
    """The `PrincipalCounts` actor of `scope`, created by whichever replica asks first. Detached, so it
    outlives any one replica; restarted if it dies (the renewals refill it)."""
    import ray

    return (
        ray.remote(PrincipalCounts)
        .options(
            name=f"{ACTOR_NAME}:{scope}",
            namespace="csm",
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            max_restarts=-1,
        )
        .remote()
    )
