"""app.process.per_process: one value per process, made again in a forked child."""

from __future__ import annotations

import gc
import json
import os
import threading
import weakref
from collections.abc import Callable

import pytest

from app.process import per_process

# Seconds a forked child gets for its work before the test gives up on it.
CHILD_LIMIT = 10.0


class Made:
    """A value that records the process and the arguments it was made with."""

    def __init__(self, *args: object) -> None:
        self.pid = os.getpid()
        self.args = args


def in_child(work: Callable[[], dict[str, object]]) -> dict[str, object]:
    """``work()`` in a forked child, its result as JSON through a pipe.

    A child that does not answer in CHILD_LIMIT seconds is killed, and the
    test fails: a child left waiting on a lock it inherited held would hang.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 1
        try:
            os.close(read)
            os.write(write, json.dumps(work()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    done = threading.Event()

    def kill() -> None:
        if not done.is_set():
            os.kill(pid, 9)

    killer = threading.Timer(CHILD_LIMIT, kill)
    killer.start()
    try:
        with os.fdopen(read, "rb") as pipe:
            answer = pipe.read()
        _, status = os.waitpid(pid, 0)
    finally:
        done.set()
        killer.cancel()
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed or hung"
    result: dict[str, object] = json.loads(answer)
    return result


def test_made_once_with_the_first_calls_arguments() -> None:
    made = per_process(Made)
    first = made("a")
    assert made("b") is first
    assert first.args == ("a",)


def test_many_threads_at_once_make_it_once() -> None:
    calls = []
    entered = threading.Event()
    release = threading.Event()

    def make() -> Made:
        calls.append(1)
        entered.set()
        release.wait(5)  # every other thread asks while this one makes it
        return Made()

    made = per_process(make)
    start = threading.Barrier(20)
    seen: list[Made] = []

    def ask() -> None:
        start.wait()
        seen.append(made())

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for thread in threads:
        thread.start()
    assert entered.wait(5)
    release.set()
    for thread in threads:
        thread.join(5)
    assert len(calls) == 1
    assert len(seen) == 20
    assert all(value is seen[0] for value in seen)


def test_a_forked_child_makes_its_own_and_the_parents_is_left_alone() -> None:
    made = per_process(Made)
    parent = made("parent")

    def child() -> dict[str, object]:
        mine = made("child")
        return {
            "pid": os.getpid(),
            "made_pid": mine.pid,
            "args": list(mine.args),
            "same_again": made("again") is mine,
        }

    seen = in_child(child)
    assert seen["pid"] != os.getpid()
    assert seen["made_pid"] == seen["pid"]
    assert seen["args"] == ["child"]
    assert seen["same_again"] is True
    assert made() is parent
    assert parent.pid == os.getpid()


def test_a_fork_while_another_thread_makes_it_leaves_the_child_free() -> None:
    entered = threading.Event()
    release = threading.Event()

    def make() -> Made:
        if os.getpid() == parent_pid:
            entered.set()
            release.wait(CHILD_LIMIT + 5)  # holds the lock across the fork
        return Made()

    parent_pid = os.getpid()
    made = per_process(make)
    maker = threading.Thread(target=made)
    maker.start()
    try:
        assert entered.wait(5)
        seen = in_child(lambda: {"made_pid": made().pid, "pid": os.getpid()})
    finally:
        release.set()
        maker.join(5)
    assert seen["made_pid"] == seen["pid"] != parent_pid
    assert made().pid == parent_pid


def test_the_fork_hook_does_not_keep_a_dropped_value_alive() -> None:
    made = per_process(Made)
    value = weakref.ref(made())
    assert value() is not None
    del made
    gc.collect()
    assert value() is None


def test_a_failed_make_is_tried_again_at_the_next_call() -> None:
    tries = []

    def make() -> Made:
        tries.append(1)
        if len(tries) == 1:
            raise ConnectionError("not yet")
        return Made()

    made = per_process(make)
    with pytest.raises(ConnectionError):
        made()
    assert made().pid == os.getpid()
    assert len(tries) == 2
