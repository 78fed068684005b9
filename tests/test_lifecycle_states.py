"""The request's state machine (app/lifecycle.py): what it allows, and what it refuses."""

from __future__ import annotations

import threading
import time

import pytest

from app.lifecycle import (
    TRANSITIONS,
    Cancels,
    IllegalTransition,
    Incarnation,
    Running,
    State,
    TaskMessage,
    Verdict,
    check_transition,
)
from tests.support import holds_for


def test_the_path_of_a_request_is_allowed() -> None:
    state = State.SUBMITTED
    for new in (State.WAITING, State.HANDED_OFF, State.STREAMING, State.STREAMING, State.ANSWERED):
        state = check_transition(state, new)
    assert state is State.ANSWERED


def test_a_request_that_waits_again_goes_back_to_the_line() -> None:
    state = State.SUBMITTED
    for new in (State.WAITING, State.HANDED_OFF, State.STREAMING, State.WAITING, State.HANDED_OFF):
        state = check_transition(state, new)
    assert check_transition(state, State.STREAMING) is State.STREAMING
    assert check_transition(State.WAITING, State.TIMED_OUT) is State.TIMED_OUT
    with pytest.raises(IllegalTransition):
        check_transition(State.TIMED_OUT, State.HANDED_OFF)


@pytest.mark.parametrize("end", [State.ANSWERED, State.CANCELLED, State.DROPPED, State.HANDED_BACK])
def test_an_ended_request_goes_nowhere(end: State) -> None:
    assert TRANSITIONS[end] == frozenset()
    with pytest.raises(IllegalTransition, match=f"from {end} to streaming"):
        check_transition(end, State.STREAMING)


def test_a_submitted_request_cannot_skip_its_hand_off() -> None:
    with pytest.raises(IllegalTransition):
        check_transition(State.SUBMITTED, State.STREAMING)


def test_a_task_message_that_comes_back_supersedes_the_copy_still_running() -> None:
    """Its first copy's task message is gone with its connection (it cannot be
    acknowledged any more): that copy stops at its next chunk, and the copy
    that came back answers; it is never dropped while the first runs on."""
    runs = Running(keep=60)
    first = Incarnation("u1", "r1", 0.0)
    assert runs.begin(first) is Verdict.ANSWER
    stopped = threading.Event()

    def running_copy() -> None:  # what tasks/chat.py does between two chunks
        while not runs.superseded(first):
            time.sleep(0.01)
        runs.end(first, finished=False)
        stopped.set()

    threading.Thread(target=running_copy, daemon=True).start()
    assert runs.begin(Incarnation("u1", "r1", 0.0), wait=5) is Verdict.ANSWER
    assert stopped.is_set()
    assert not runs.superseded(first)  # the copy that took over goes on


def test_a_task_message_that_comes_back_is_adopted_by_its_stream_still_running() -> None:
    """The stream goes on under the message that came back (tasks/chat.py
    carries on), and that message is acknowledged when the stream ends."""
    runs = Running(keep=60)
    first = Incarnation("u1", "r1", 0.0)
    mine = TaskMessage()
    assert runs.begin(first, message=mine) is Verdict.ANSWER
    back = TaskMessage()
    assert runs.begin(Incarnation("u1", "r1", 0.0), message=back) is Verdict.ADOPT
    assert runs.newer(first, mine)
    assert runs.copy_for(first, mine, wait=0) is back
    assert not runs.newer(first, back)
    outcome: list[str] = []
    follower = threading.Thread(
        target=lambda: outcome.append(runs.follow(first, back, lambda: True))
    )
    follower.start()
    holds_for(lambda: not outcome, 0.3, "it did not wait while the stream ran")
    runs.end(first, finished=True)
    follower.join(5)
    assert outcome == ["answered"]


@pytest.mark.parametrize(
    ("end", "outcome"),
    [
        ({"finished": False}, "handed_back"),
        ({"finished": False, "outcome": "cancelled"}, "cancelled"),
    ],
)
def test_an_adopted_message_ends_as_its_stream_did(end: dict[str, object], outcome: str) -> None:
    runs = Running(keep=60)
    first = Incarnation("u1", "r1", 0.0)
    assert runs.begin(first, message=TaskMessage()) is Verdict.ANSWER
    back = TaskMessage()
    assert runs.begin(Incarnation("u1", "r1", 0.0), message=back) is Verdict.ADOPT
    runs.end(first, **end)  # type: ignore[arg-type]
    assert runs.follow(first, back, lambda: True) == outcome


def test_an_adopted_message_on_a_lost_connection_or_replaced_lets_go() -> None:
    runs = Running(keep=60)
    first = Incarnation("u1", "r1", 0.0)
    assert runs.begin(first, message=TaskMessage()) is Verdict.ANSWER
    back = TaskMessage()
    assert runs.begin(Incarnation("u1", "r1", 0.0), message=back) is Verdict.ADOPT
    assert runs.follow(first, back, lambda: False) == "lost"
    again = TaskMessage()
    assert runs.begin(Incarnation("u1", "r1", 0.0), message=again) is Verdict.ADOPT
    assert runs.follow(first, back, lambda: True) == "replaced"


def test_a_stream_whose_message_did_not_come_back_in_time_is_not_adopted_after() -> None:
    """It went to another worker, which answers it again: this stream stops,
    having written nothing since the loss, and a copy that comes here late
    waits for it to stop, as before."""
    runs = Running(keep=60)
    first = Incarnation("u1", "r1", 0.0)
    mine = TaskMessage()
    assert runs.begin(first, message=mine) is Verdict.ANSWER
    assert runs.copy_for(first, mine, wait=0.1) is None
    late = Incarnation("u1", "r1", 0.0)
    assert runs.begin(late, message=TaskMessage(), wait=0.3) is Verdict.BUSY
    assert runs.superseded(first)
    runs.end(first, finished=False)
    assert runs.begin(late, message=TaskMessage()) is Verdict.ANSWER


def test_a_stream_stops_waiting_for_its_message_once_another_worker_took_it() -> None:
    """Another worker said it answers the task message (tasks/cancel.py,
    Notices, ``taken``): the stream waiting for it stops at once, not after its
    whole wait, and is closed to adoption as after a wait in vain."""
    runs = Running(keep=60)
    cancels = Cancels(keep=60)
    first = Incarnation("u1", "r1", 0.0)
    mine = TaskMessage()
    assert runs.begin(first, message=mine) is Verdict.ANSWER
    threading.Timer(0.2, cancels.take, ("u1", "r1")).start()
    began = time.monotonic()
    assert runs.copy_for(first, mine, wait=30, elsewhere=lambda: cancels.taken(first)) is None
    assert time.monotonic() - began < 5
    assert runs.begin(Incarnation("u1", "r1", 0.0), message=TaskMessage(), wait=0.1) is (
        Verdict.BUSY
    )
    assert not cancels.taken(Incarnation("u1", "r2", 0.0))  # another incarnation of the uid
    assert not cancels.cancelled(first)  # taken elsewhere is no cancel


def test_a_copy_that_does_not_stop_gives_the_task_back_instead_of_dropping_it() -> None:
    runs = Running(keep=60)
    first = Incarnation("u1", "r1", 0.0)
    assert runs.begin(first) is Verdict.ANSWER
    assert runs.begin(Incarnation("u1", "r1", 0.0), wait=0.3) is Verdict.BUSY
    assert runs.superseded(first)
    runs.end(first, finished=True)
    assert runs.begin(Incarnation("u1", "r1", 0.0), wait=0.3) is Verdict.ANSWERED


def test_an_answer_finished_before_a_connection_was_lost_is_answered_again() -> None:
    """Its last messages were written, not confirmed: a broker restart may have
    taken them. Its task message, back because its ack went with the same
    connection, is answered again (marked restart), not dropped."""
    lost = 0
    runs = Running(keep=60, losses=lambda: lost)
    first = Incarnation("u1", "r1", 0.0)
    assert runs.begin(first) is Verdict.ANSWER
    runs.end(first, finished=True)
    assert runs.begin(Incarnation("u1", "r1", 0.0)) is Verdict.ANSWERED  # nothing lost since
    lost = 1
    again = Incarnation("u1", "r1", 0.0)
    assert runs.begin(again) is Verdict.ANSWER
    runs.end(again, finished=True)
    assert runs.begin(Incarnation("u1", "r1", 0.0)) is Verdict.ANSWERED
    # A loss after a copy began counts, even one before it ended.
    third = Incarnation("u2", "r2", 0.0)
    assert runs.begin(third) is Verdict.ANSWER
    began = lost
    lost = 2
    runs.end(third, finished=True, lost=began)
    assert runs.begin(Incarnation("u2", "r2", 0.0)) is Verdict.ANSWER
