"""The order of the requests that wait for an upstream, and each one's place.

Requests wait in RabbitMQ (``<ns>.waiting``); the dispatcher (app/dispatcher.py)
holds them unacknowledged and keeps, for each upstream, a :class:`Line` that
says which goes next:

1. the tier: ``priority`` before ``default`` (also ``auto``, or none) before
   ``flex``; a lower tier starts only when no higher one waits (a ``flex``
   request that waits too long ends by its ``queue_timeout``);
2. within a tier, round-robin between tenants (the API key, else the
   username): a tenant with 1,000 requests waiting delays another tenant's
   single request by one start, not by 1,000;
3. within a tenant, arrival.

A request's position is the number of requests that start before it if
nothing new arrives, plus one (1 = next): :meth:`Line.positions` counts it
from the same rules, so it is exact while nothing new arrives.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

TIERS = ("priority", "default", "flex")
TIER_OF = {"priority": 0, "default": 1, "auto": 1, "flex": 2}


def tier_rank(name: str | None) -> int:
    """The rank of a ``service_tier`` (0 goes first); ``default`` for none."""
    return TIER_OF.get(name or "default", 1)


@dataclass(eq=False)
class Entry:
    """One waiting request, as the dispatcher holds it."""

    uid: str
    rid: str
    tier: int
    tenant: str
    at: float  # when it was accepted (wall clock)
    deadline: float  # when it stops waiting (wall clock)
    tag: int = 0  # its delivery tag on the dispatcher's channel
    message: Any = None  # the task message, sent on as it is
    reply: str = ""  # the queue its answer goes to
    updates: bool = False  # it is told its place
    upstream: str = ""
    told: int | None = None  # the position it was last told
    told_at: float = 0.0  # when (monotonic)
    gone: bool = field(default=False, repr=False)  # removed (started, cancelled, timed out)


class Line:
    """The waiting requests of one upstream, in the order they start."""

    def __init__(self) -> None:
        # One rotation of tenants per tier; a tenant's deque is in arrival order.
        self._tiers: list[OrderedDict[str, deque[Entry]]] = [OrderedDict() for _ in TIERS]
        self._count = 0
        self.version = 0  # changes with every change of the order
        self.asking = 0  # waiting requests that are told their place

    def __len__(self) -> int:
        return self._count

    def add(self, entry: Entry) -> None:
        tenants = self._tiers[entry.tier]
        queue = tenants.get(entry.tenant)
        if queue is None:
            queue = tenants[entry.tenant] = deque()  # joins the rotation at its end
        # Arrival order, also for a request that comes back to wait again.
        if queue and queue[-1].at > entry.at:
            items = sorted([*queue, entry], key=lambda e: e.at)
            queue.clear()
            queue.extend(items)
        else:
            queue.append(entry)
        self._changed(entry, +1)

    def _changed(self, entry: Entry, count: int) -> None:
        self._count += count
        self.version += 1
        if entry.updates:
            self.asking += count

    def peek(self) -> Entry | None:
        for tenants in self._tiers:
            for queue in tenants.values():
                return queue[0]
        return None

    def pop(self) -> Entry | None:
        """The next to start; its tenant moves to the end of its tier's rotation."""
        for tenants in self._tiers:
            if not tenants:
                continue
            tenant, queue = next(iter(tenants.items()))
            entry = queue.popleft()
            if queue:
                tenants.move_to_end(tenant)
            else:
                del tenants[tenant]
            self._changed(entry, -1)
            entry.gone = True
            return entry
        return None

    def remove(self, entry: Entry) -> bool:
        """Take ``entry`` out (cancelled, timed out); whether it was here."""
        tenants = self._tiers[entry.tier]
        queue = tenants.get(entry.tenant)
        if queue is None or entry not in queue:
            return False
        queue.remove(entry)
        if not queue:
            del tenants[entry.tenant]
        self._changed(entry, -1)
        entry.gone = True
        return True

    def entries(self) -> Iterator[Entry]:
        for tenants in self._tiers:
            for queue in tenants.values():
                yield from queue

    def positions(self) -> Iterator[tuple[Entry, int]]:
        """Each waiting request with its position (1 = next).

        Within a tier, rounds of the rotation take one request of each tenant
        that still has one, in rotation order: the ``k``-th request (from 0)
        of a tenant starts after ``min(len, k + 1)`` requests of each tenant
        before it in the rotation, ``min(len, k)`` of each after it, and its
        own ``k`` before it.
        """
        ahead = 0  # every request of the higher tiers
        for tenants in self._tiers:
            sizes = [len(q) for q in tenants.values()]
            for i, queue in enumerate(tenants.values()):
                before, after = sizes[:i], sizes[i + 1 :]
                for k, entry in enumerate(queue):
                    others = sum(min(n, k + 1) for n in before) + sum(min(n, k) for n in after)
                    yield entry, ahead + others + k + 1
            ahead += sum(sizes)

    def by_tier(self) -> dict[str, int]:
        return {
            name: sum(len(q) for q in t.values())
            for name, t in zip(TIERS, self._tiers, strict=True)
        }

    def by_tenant(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for tenants in self._tiers:
            for tenant, queue in tenants.items():
                counts[tenant] = counts.get(tenant, 0) + len(queue)
        return counts
