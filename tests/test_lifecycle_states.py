"""The request's state machine (app/lifecycle.py): what it allows, and what it refuses."""

from __future__ import annotations

import threading
import time

import pytest

from app.lifecycle import (
    TRANSITIONS,
    IllegalTransition,
    Incarnation,
    Running,
    State,
    Verdict,
    check_transition,
)


def test_the_path_of_a_request_is_allowed() -> None:
    state = State.SUBMITTED
    for new in (State.HANDED_OFF, State.STREAMING, State.STREAMING, State.ANSWERED):
        state = check_transition(state, new)
    assert state is State.ANSWERED


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
