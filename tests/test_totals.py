"""The sums of :class:`app.totals.Totals` over snapshots of real recorders, as
processes come, stop, fall silent and speak again."""

from __future__ import annotations

from typing import Any

from app.metrics import Recorder
from app.totals import STALE_INTERVALS, Totals

INTERVAL = 5.0


def sums(totals: Totals, now: float) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in totals.collect(now)
        for s in family.samples
    }


def snapshot(recorder: Recorder, *, final: bool = False) -> dict[str, Any]:
    return recorder.snapshot("worker", INTERVAL, final=final)


ACCEPTED = ("chatqueue_requests_accepted_total", ())
STREAMS = ("chatqueue_streams_in_flight", ())
WORKERS = ("chatqueue_processes", (("role", "worker"),))


def test_counters_are_summed_and_outlive_their_process() -> None:
    a, b, totals = Recorder(), Recorder(), Totals()
    a.accepted.inc(3)
    b.accepted.inc(4)
    a.streams.inc(2)
    b.streams.inc(1)
    a.ttft_added.observe(0.002)
    b.ttft_added.observe(0.003)
    totals.add(snapshot(a), now=0)
    totals.add(snapshot(b), now=0)
    now = sums(totals, now=1)
    assert now[ACCEPTED] == 7
    assert now[STREAMS] == 3
    assert now[WORKERS] == 2
    assert now[("chatqueue_ttft_added_seconds_count", ())] == 2
    assert now[("chatqueue_ttft_added_seconds_bucket", (("le", "0.0025"),))] == 1
    assert now[("chatqueue_ttft_added_seconds_bucket", (("le", "+Inf"),))] == 2

    # a stops: its last snapshot says so; its counts stay, its gauges go.
    a.accepted.inc()
    totals.add(snapshot(a, final=True), now=2)
    now = sums(totals, now=2)
    assert now[ACCEPTED] == 8
    assert now[STREAMS] == 1
    assert now[WORKERS] == 1


def test_a_silent_process_leaves_the_gauges_and_comes_back_without_counting_twice() -> None:
    a, b, totals = Recorder(), Recorder(), Totals()
    a.accepted.inc(3)
    a.streams.inc(2)
    b.accepted.inc(1)
    totals.add(snapshot(a), now=0)
    totals.add(snapshot(b), now=0)
    later = STALE_INTERVALS * INTERVAL + 1
    totals.add(snapshot(b), now=later)  # b still speaks; a fell silent
    now = sums(totals, now=later)
    assert now[ACCEPTED] == 4  # a's counts are kept
    assert now[STREAMS] == 0  # but not its streams
    assert now[WORKERS] == 1

    a.accepted.inc(2)
    totals.add(snapshot(a), now=later + 1)  # a was only cut off for a while
    now = sums(totals, now=later + 1)
    assert now[ACCEPTED] == 6
    assert now[STREAMS] == 2
    assert now[WORKERS] == 2


def test_a_restarted_process_is_a_new_one() -> None:
    first, totals = Recorder(), Totals()
    first.accepted.inc(5)
    totals.add(snapshot(first), now=0)
    again = Recorder()  # same host and maybe pid, a new start id
    again.accepted.inc(1)
    totals.add(snapshot(again), now=1)
    assert first.process != again.process
    assert sums(totals, now=1)[ACCEPTED] == 6
