"""The request's state machine (app/lifecycle.py): what it allows, and what it refuses."""

from __future__ import annotations

import pytest

from app.lifecycle import TRANSITIONS, IllegalTransition, State, check_transition


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
