"""app/waiting.py: the order of the waiting requests, and the positions it tells."""

from __future__ import annotations

import itertools
import random

from app.waiting import Entry, Line, tier_rank

_uids = itertools.count()


def entry(tenant: str = "a", tier: str = "default", at: float | None = None) -> Entry:
    n = next(_uids)
    return Entry(
        uid=f"u{n}",
        rid="r",
        tier=tier_rank(tier),
        tenant=tenant,
        at=float(n) if at is None else at,
        deadline=1e12,
    )


def drain(line: Line) -> list[Entry]:
    out = []
    while (e := line.pop()) is not None:
        out.append(e)
    return out


def test_one_tenant_one_tier_is_first_in_first_out() -> None:
    line = Line()
    entries = [entry() for _ in range(5)]
    for e in entries:
        line.add(e)
    assert drain(line) == entries
    assert len(line) == 0


def test_tiers_go_priority_then_default_then_flex() -> None:
    line = Line()
    flex, default, auto, priority = (
        entry(tier="flex"),
        entry(),
        entry(tier="auto"),
        entry(tier="priority"),
    )
    for e in (flex, default, auto, priority):
        line.add(e)
    assert drain(line) == [priority, default, auto, flex]


def test_tenants_take_turns_within_a_tier() -> None:
    line = Line()
    a = [entry("a") for _ in range(60)]
    for e in a:
        line.add(e)
    b = [entry("b") for _ in range(4)]
    for e in b:
        line.add(e)
    order = drain(line)
    # b's requests start second, fourth, sixth and eighth: one of a's before each.
    assert [order.index(e) for e in b] == [1, 3, 5, 7]


def test_a_request_that_waits_again_keeps_its_place_by_arrival() -> None:
    line = Line()
    first, second = entry(at=10.0), entry(at=20.0)
    line.add(second)
    line.add(first)
    assert drain(line) == [first, second]


def test_positions_are_the_starts_before_each_request() -> None:
    rng = random.Random(7)
    line = Line()
    for _ in range(200):
        line.add(entry(rng.choice("abcde"), rng.choice(["priority", "default", "flex"])))
    told = dict(line.positions())
    assert sorted(told.values()) == list(range(1, 201))
    for started, e in enumerate(drain(line), 1):
        assert told[e] == started


def test_remove_takes_a_request_out_of_the_order() -> None:
    line = Line()
    a, b, c = entry("a"), entry("b"), entry("a")
    for e in (a, b, c):
        line.add(e)
    assert line.remove(b)
    assert not line.remove(b)
    assert dict(line.positions()) == {a: 1, c: 2}
    assert line.by_tenant() == {"a": 2}
    assert line.by_tier() == {"priority": 0, "default": 2, "flex": 0}
