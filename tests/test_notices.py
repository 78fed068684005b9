"""What workers say of task messages that went with a lost connection
(tasks/cancel.py, ``Notices``), and what a listener makes of it. The whole
exchange between two workers is in tests/test_carry_on.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

from app.lifecycle import Incarnation
from config import load_settings
from tasks.cancel import NOTICE_FOR, CancelListener, Notices, this_process

SETTINGS = load_settings({})
MINE = Incarnation("u1", "r1", 0.0)


def test_holding_is_said_until_it_ends_then_how_it_ended() -> None:
    notices = Notices(SETTINGS)
    notices.say("holding", "u1", "r1")
    notices.say("taken", "u2", "r2")
    assert notices.due(0.0) == {"holding": [("u1", "r1")], "taken": [("u2", "r2")]}
    # Long after: what is said for NOTICE_FOR is forgotten, holding is not.
    assert notices.due(1e9) == {"holding": [("u1", "r1")]}
    notices.release(MINE, "answered")
    assert notices.due(0.0) == {"ended": [("u1", "r1", "answered")]}
    assert notices.due(1e9 + NOTICE_FOR) == {}


def listener_hearing(*notices: dict[str, object]) -> CancelListener:
    listener = CancelListener(SETTINGS)
    for notice in notices:
        listener.on_message(SimpleNamespace(body=json.dumps(notice)))  # type: ignore[arg-type]
    return listener


def test_a_listener_hears_what_another_worker_says() -> None:
    cancels = listener_hearing(
        {
            "by": "elsewhere/1",
            "holding": [["u1", "r1"]],
            "following": [["u2", "r2"]],
            "taken": [["u3", "r3"]],
            "ended": [["u4", "r4", "handed_back"]],
            "at": 0,
        }
    ).cancels
    assert cancels.holding_heard_at(MINE) is not None
    assert cancels.followed(Incarnation("u2", "r2", 0.0))
    assert cancels.taken(Incarnation("u3", "r3", 0.0))
    assert cancels.ended(Incarnation("u4", "r4", 0.0)) == "handed_back"
    # None of it is a cancel, and it is about those incarnations only.
    assert not cancels.cancelled(MINE)
    assert cancels.holding_heard_at(Incarnation("u1", "r9", 0.0)) is None


def test_a_listener_ignores_its_own_process_and_what_is_malformed() -> None:
    cancels = listener_hearing(
        {"by": this_process(), "holding": [["u1", "r1"]], "at": 0},
        {"by": "elsewhere/1", "holding": [["u1"], "u1", ["u1", 2]], "ended": [["u1", "r1"]]},
        {"by": "elsewhere/1", "taken": "u1"},
    ).cancels
    assert cancels.holding_heard_at(MINE) is None
    assert cancels.ended(MINE) is None
    assert not cancels.taken(MINE)
