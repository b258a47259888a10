"""The cluster-wide count of conversations per principal (serve_app/principals.py), without Ray: two
holders (ingress replicas) share one limit, a release frees a place for either, a renewal replaces a
holder's record, and a holder that falls silent stops counting after the expiry."""

from __future__ import annotations

from serve_app.principals import ClusterCounts, PrincipalCounts


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_two_replicas_share_one_limit_per_principal():
    counts = PrincipalCounts()
    assert counts.take("replica-a", "token:ann", limit=2)
    assert counts.take("replica-b", "token:ann", limit=2)
    assert not counts.take("replica-a", "token:ann", limit=2)  # one limit, not one per replica
    assert not counts.take("replica-b", "token:ann", limit=2)
    assert counts.take("replica-b", "token:bob", limit=2)  # another principal is counted apart
    counts.release("replica-a", "token:ann")
    assert counts.take("replica-b", "token:ann", limit=2) and counts.held("token:ann") == 2
    assert counts.take("replica-a", "token:carl", limit=None)  # no limit: counted, never refused


def test_a_release_never_counts_below_zero():
    counts = PrincipalCounts()
    counts.release("replica-a", "token:ann")
    assert counts.take("replica-a", "token:ann", limit=1) and counts.held("token:ann") == 1


def test_renewal_replaces_a_holders_record_and_silence_expires_it():
    clock = Clock()
    counts = PrincipalCounts(expiry_s=30, clock=clock)
    assert counts.take("replica-a", "token:ann", limit=2)
    counts.renew("replica-b", {"token:ann": 1, "token:bob": 0})  # e.g. after the actor restarted
    assert counts.held("token:ann") == 2 and counts.held("token:bob") == 0
    clock.now = 20
    counts.renew("replica-b", {"token:ann": 1})
    clock.now = 31  # replica-a has said nothing for 31 s: gone
    assert counts.take("replica-b", "token:ann", limit=2) and counts.held("token:ann") == 2


class _Remote:
    """An actor method as Ray's handle has it (`.remote(...)`, awaitable), over a plain object's."""

    def __init__(self, method, down: list[bool]) -> None:
        self.method, self.down = method, down

    async def remote(self, *args):
        if self.down[0]:
            raise ConnectionError("the actor is restarting")
        return self.method(*args)


class Actor:
    def __init__(self, counts: PrincipalCounts) -> None:
        self.down = [False]
        for name in ("take", "release", "renew"):
            setattr(self, name, _Remote(getattr(counts, name), self.down))


async def test_a_replica_decides_alone_while_the_actor_is_down_and_renews_it_after():
    counts = PrincipalCounts()
    actor = Actor(counts)
    a, b = ClusterCounts("a", "app", actor), ClusterCounts("b", "app", actor)
    for replica in (a, b):
        assert await replica.take("token:ann", limit=3)
        replica.held["token:ann"] += 1  # what `Sessions` does when a place is given
    actor.down[0] = True
    assert await a.take("token:ann", limit=2)  # its own count (1) decides: never refused for bookkeeping
    assert not await a.take("token:ann", limit=1)
    await a.release("token:ann")  # lost for now; the renewal carries it
    actor.down[0] = False
    counts.renew("a", {})  # as if the actor restarted empty...
    counts.renew("b", {})
    await a.renew()  # ...each replica's renewal refills it
    await b.renew()
    assert counts.held("token:ann") == 2
    assert not await a.take("token:ann", limit=2)
