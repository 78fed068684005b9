"""Resuming an SSE stream: a client whose connection dropped reads again with
``Last-Event-ID`` and gets the rest of its answer, once; no web restart,
graceful or not, deletes an answer that was not delivered."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from devllm.testing import DevLLM
from tests.support import (
    EventStream,
    Web,
    WebFactory,
    about,
    chat,
    expected,
    read_in_background,
    stream,
    submit,
    wait_until,
)
from web.responses import Resume
from web.router import Delivery

TOKENS = 60


def long_chat(prompt: str, delay: float = 0.05) -> dict[str, Any]:
    return chat(prompt, model=f"m;delay={delay};tokens={TOKENS}")


def resumed(web: Web, uid: str, first: EventStream, **kwargs: Any) -> EventStream:
    """Read ``uid`` again as ``EventSource`` does, after the last event ``first`` had."""
    last = first.events[-1].id
    assert last is not None
    return stream(web, uid, headers={"Last-Event-ID": last}, timeout=60, **kwargs)


def assert_whole(prompt: str, first: EventStream, rest: EventStream) -> None:
    """``rest`` goes on from ``first``: every id once, in order, the whole answer."""
    assert rest.status == 200, rest.body
    assert rest.events[-1].data == "[DONE]"
    ids = [e.id for e in first.events + rest.events]
    assert ids == [str(n) for n in range(len(ids))], ids
    assert first.content + rest.content == expected(prompt, TOKENS)


def cancelled_so_far(llm: DevLLM) -> int:
    """The LLM's count of cancelled streams, once no stream of an earlier test
    runs (one that is cancelled later would be counted as this test's)."""
    wait_until(lambda: llm.stats()["active_streams"] == 0, 30, "a stream of another test runs on")
    return int(llm.stats()["streams_cancelled"])


@pytest.mark.slow  # over 8 s
def test_a_dropped_stream_resumes_with_last_event_id(start_web: WebFactory, llm: DevLLM) -> None:
    web = start_web("resume", WEB_RESUME_GRACE="5")
    cancelled = cancelled_so_far(llm)
    prompt = "read me in two parts"
    uid = submit(web, long_chat(prompt))
    first = stream(web, uid, until=lambda s: len(s.events) >= 10)  # then hang up
    assert len(first.events) == 10 and first.events[-1].data != "[DONE]"
    # The client is away until the web front saw it leave (less than the grace).
    wait_until(
        lambda: f"uid={uid}: client left after" in web.output(),
        10,
        about("the web front never saw the client leave", web),
    )
    rest = resumed(web, uid, first)
    assert_whole(prompt, first, rest)
    assert llm.stats()["streams_cancelled"] == cancelled
    # Delivered: read once.
    assert stream(web, uid).status == 404


def test_a_resume_waits_for_the_reader_it_replaces(start_web: WebFactory) -> None:
    """A client back before its old reader noticed it left (another network,
    the old connection silent; a web process in its graceful shutdown) finds
    that reader still consuming: its GET with Last-Event-ID waits for it to
    go and gets the rest, not a 409 (EventSource stops at a 409)."""
    web = start_web("busy-resume")
    prompt, tokens = "a client on a new network", 16
    # Slow enough that what the old connection takes unread while it hangs
    # stays within the messages a reader leaves unacknowledged (RESUME_WINDOW).
    uid = submit(web, chat(prompt, model=f"m;delay=0.3;tokens={tokens}"))
    holding, release, sent = threading.Event(), threading.Event(), threading.Event()
    old: list[EventStream] = []

    def hold_then_close(sse: EventStream) -> bool:
        if len(sse.events) < 3:
            return False
        holding.set()
        release.wait(30)  # the old connection stays open, unread, then closes
        return True

    reader = threading.Thread(
        target=lambda: old.append(stream(web, uid, until=hold_then_close, timeout=60))
    )
    reader.start()
    assert holding.wait(30)
    with ThreadPoolExecutor(1) as pool:
        resuming = pool.submit(
            stream, web, uid, headers={"Last-Event-ID": "2"}, timeout=60, on_sent=sent.set
        )
        assert sent.wait(30)
        # The resume comes while the old reader consumes; it tries again every
        # BUSY_PAUSE (0.5 s): one of its tries, at least, finds the old one there.
        time.sleep(0.5)
        released = time.monotonic()
        release.set()
        rest = resuming.result(60)
    reader.join(30)
    assert rest.status == 200, rest.body
    assert rest.events[0].at > released  # nothing while the old reader consumed
    first = old[0].events[:3]
    ids = [e.id for e in first + rest.events]
    assert ids == [str(n) for n in range(len(ids))], ids
    assert "".join(e.content for e in first) + rest.content == expected(prompt, tokens)


@pytest.mark.slow  # over 8 s
def test_a_client_that_does_not_come_back_is_cancelled_after_the_grace(
    start_web: WebFactory, llm: DevLLM
) -> None:
    web = start_web("abandon", WEB_RESUME_GRACE="2")
    cancelled = cancelled_so_far(llm)
    uid = submit(web, long_chat("nobody comes back", delay=0.2))
    first = stream(web, uid, until=lambda s: len(s.events) >= 3)
    left = time.monotonic()
    wait_until(
        lambda: llm.stats()["streams_cancelled"] > cancelled,
        15,
        about("the answer was never cancelled", web),
    )
    # Within the grace the answer waited (its LLM call went on): the cancel
    # came 2 s after the client left, not before (seen within 0.05 s).
    assert time.monotonic() - left >= 2
    assert f"uid={uid}: its client did not come back" in web.output()
    assert resumed(web, uid, first).status == 404


def test_a_resumed_reader_keeps_the_answer_from_the_grace(
    start_web: WebFactory, llm: DevLLM
) -> None:
    """The first reader's web process deletes the queue after the grace only if
    nobody reads it: a reader that came back (here on another web process) is
    not cut off."""
    first_web = start_web("grace-a", WEB_RESUME_GRACE="1")
    second_web = start_web("grace-b")
    cancelled = cancelled_so_far(llm)
    prompt = "a reader that moved"
    uid = submit(first_web, long_chat(prompt, delay=0.1))  # about 6 s of answer
    first = stream(first_web, uid, until=lambda s: len(s.events) >= 5)
    rest = resumed(second_web, uid, first)  # reads past the first one's grace
    assert_whole(prompt, first, rest)
    assert llm.stats()["streams_cancelled"] == cancelled


@pytest.mark.slow  # it reloads the web front and kills its worker process
def test_web_restarts_do_not_lose_a_stream(start_web: WebFactory, llm: DevLLM) -> None:
    """A graceful reload (HUP, what a deploy does) cuts a stream after the
    graceful timeout, and a killed worker process cuts it at once: neither
    cancels nor deletes the answer, and ``EventSource`` reconnects to the new
    worker process and goes on."""
    web = start_web("deploy", GUNICORN_CMD_ARGS="--graceful-timeout 1")
    cancelled = cancelled_so_far(llm)
    for how in ("HUP to the master", "kill -9 of the worker"):
        prompt = f"a stream across a {how}"
        uid = submit(web, long_chat(prompt, delay=0.1))
        started, first, reader = read_in_background(web, uid)
        assert started.wait(30), "the stream never started"
        old = web.worker_pids()
        if how.startswith("HUP"):
            os.kill(web.process.pid, signal.SIGHUP)
        else:
            os.kill(old[0], signal.SIGKILL)
        reader.join(30)
        assert first and first[0].events[-1].data != "[DONE]", f"{how}: not cut"
        wait_until(
            lambda: web.worker_pids() and web.worker_pids() != old,  # noqa: B023
            30,
            about(f"{how}: no new worker process", web),
        )
        rest = resumed(web, uid, first[0])
        assert_whole(prompt, first[0], rest)
    assert llm.stats()["streams_cancelled"] == cancelled


def skipped(resume: Resume, messages: list[tuple[int, str, bool]]) -> list[int]:
    """The seqs of ``messages`` (seq, rid, restart), in queue order, that ``resume`` skips."""
    return [
        seq
        for seq, rid, restart in messages
        if resume.seen(Delivery(body="{}", kind="chunk", seq=seq, rid=rid, restart=restart))
    ]


def test_resume_skips_only_the_run_the_client_read() -> None:
    """What a resumed read skips, queue by queue: the unacknowledged window
    of the run the client read (up to its last id), never a run that a worker
    started again, even with the same rid (a redelivered task message)."""
    window = [(n, "r1", False) for n in range(13, 21)]
    # The client saw up to 20: the window goes, what follows comes.
    assert skipped(Resume(20), [*window, (21, "r1", False)]) == list(range(13, 21))
    # Its connection lost some: it saw up to 16.
    assert skipped(Resume(16), window) == list(range(13, 17))
    # The worker started the answer again after the window (the same hand-off
    # redelivered, so the same rid): the restart is not skipped.
    restarted = [(n, "r1", True) for n in range(3)]
    assert skipped(Resume(20, "r1", False), [*window, *restarted]) == list(range(13, 21))
    # A restart of a restart: seq goes back.
    again = [(n, "r1", True) for n in range(5, 9)] + restarted
    assert skipped(Resume(8, "r1", True), again) == [5, 6, 7, 8]
    # Another incarnation of the uid (a reader that knows the rid it read).
    assert skipped(Resume(20, "r1", False), [(0, "r2", False), (1, "r2", False)]) == []
