"""The task: call the LLM and stream its answer onto the response queue.

The task message is acknowledged late and given back when its worker dies,
so every accepted request is answered at least once. A stream a second worker
takes over starts again from ``seq`` 0 with the header ``restart: true``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent
from celery import Task
from celery.exceptions import Reject
from gevent import GreenletExit

from app import metrics
from app.broker import Lane, Sender, dead_letter
from app.errors import DuplicateRequest
from app.lifecycle import Incarnation, Running, State, Verdict, check_transition
from app.protocol import ResponseStream, opens_only
from app.request import ChatRequest
from app.shutdown import HandBack, Orphaned, losses, task_link, warm_shutdown
from config import Settings
from tasks import cancel, llm

logger = logging.getLogger(__name__)

# Chunks a stream forwards before it lets the process's other greenlets run.
# An LLM that streams faster than the worker reads leaves data waiting at every
# read, which then never yields: the cancel listener, the lanes and Celery's
# loop waited for the stream (a cancel took 7.7 s to be seen at 5,000 chunks/s).
YIELD_EVERY = 64

# The incarnations this process streams, and those it finished in the last
# RESPONSE_QUEUE_TTL (made with the first task, from its settings).
_running: Running | None = None


def running(settings: Settings) -> Running:
    global _running  # noqa: PLW0603 - one per process, made on first use
    if _running is None:
        _running = Running(keep=settings.response_queue_ttl, losses=lambda: losses.count)
    return _running


class PublishFailed(Exception):
    """The broker would not take a response message, even after retries."""


class _Publisher:
    """A stream's messages, handed to its lane (:class:`~app.broker.Sender`);
    a message the broker would not take, even after retries, is PublishFailed."""

    def __init__(self, lane: Lane, since: int) -> None:
        self._sender = Sender(lane, since)

    def __call__(self, body: str, routing_key: str, properties: dict[str, Any]) -> None:
        with _publish_failures():
            self._sender(body, routing_key, properties)

    def settle(self) -> None:
        """Wait until every message is written (the task message is
        acknowledged after them)."""
        with _publish_failures():
            self._sender.settle()

    def drain(self) -> None:
        """Wait until every message is written or dropped, whatever became of them.

        Celery kills the tasks of a connection it lost
        (``worker_cancel_long_running_tasks_on_connection_loss``: ``gevent.kill``
        raises GreenletExit where the task waits), often while a stream that
        saw the loss first waits here, its lane reconnecting. The wait goes on:
        the stream is ending already, and another copy of it must not begin
        before its messages are out. Let through, the kill skipped the end of
        the incarnation, and every later copy was given back to come again,
        to the end of the soak's run 21 (55 answers that never ended).
        """
        while True:
            try:
                self._sender.settle()
            except GreenletExit:
                logger.debug("a stream killed while its messages drain: it ends after them")
                continue
            except Exception:  # told already, or the stream is over
                pass
            return


@contextmanager
def _publish_failures() -> Iterator[None]:
    try:
        yield
    except Orphaned:
        raise
    except Exception as exc:
        raise PublishFailed(str(exc)) from exc


def stream_chat(task: Task, payload: dict[str, Any], rid: str = "", at: float = 0.0) -> None:
    """Answer one incarnation of a request; registered as ``chatqueue.stream_chat``.

    ``rid`` and ``at`` name the hand-off (see :mod:`app.lifecycle`). A task
    message that comes back (its worker died mid-answer) starts the answer
    again, marked ``restart``.
    """
    settings: Settings = task.app.settings
    lost = losses.count  # a connection lost after this takes the task message with it
    link = task_link.came_on(task.request.delivery_info)
    request = ChatRequest.from_task(payload)
    uid = request.uid
    incarnation = Incarnation(uid, rid or str(task.request.id), at)
    restart = bool((task.request.delivery_info or {}).get("redelivered"))
    runs = running(settings)
    state = State.HANDED_OFF
    verdict = runs.begin(incarnation, cancel.listener(settings).cancels)
    if verdict is Verdict.ANSWERED:
        check_transition(state, State.DROPPED)
        logger.warning("uid=%s: rid %s was answered already; copy dropped", uid, rid)
        return
    if verdict is Verdict.DUPLICATE:
        check_transition(state, State.DROPPED)
        _drop_duplicate(task, request)
        return
    if verdict is Verdict.BUSY:
        # Its copy here has not stopped yet: unacknowledged, the task message
        # comes back, and is answered once that copy is gone.
        check_transition(state, State.HANDED_BACK)
        logger.warning("uid=%s: rid %s still runs here; given back to come again", uid, rid)
        raise Reject("a superseded copy still runs", requeue=True)
    state = check_transition(state, State.STREAMING)
    finished = False
    publisher = _Publisher(task.app.pools.lanes.next(), lost)
    stream = ResponseStream(
        publisher,
        request.reply_to or settings.response_queue(uid),
        uid,
        restart=restart,
        rid=incarnation.rid,
    )
    figures = metrics.Answering(0.0 if restart else at)
    outcome = ""  # requeued: counted when it is answered
    try:
        if restart:
            logger.warning("uid=%s: redelivered; the answer starts again", uid)
            metrics.restarted("redelivered")
        finished = answer(stream, request, incarnation, settings, figures, lost=lost, link=link)
        publisher.settle()
        outcome = ("error" if stream.error_code else "answered") if finished else "cancelled"
        check_transition(state, State.ANSWERED if finished else State.CANCELLED)
    except PublishFailed as exc:
        # The broker is unreachable: give the request back to be answered later.
        logger.error("uid=%s: cannot publish the answer (%s); requeued", uid, exc)
        raise Reject(exc, requeue=True) from exc
    except HandBack as exc:
        # Unacknowledged, the task message goes back to the queue, and another
        # worker answers it again from the start, marked restart.
        check_transition(state, State.HANDED_BACK)
        why = (
            "its connection to RabbitMQ was lost: the task message was given back"
            if isinstance(exc, Orphaned)
            else "warm shutdown, grace over"
        )
        logger.warning("uid=%s: handed back after %d messages (%s)", uid, stream.seq, why)
        raise Reject(why, requeue=True) from exc
    finally:
        # Its messages written (or dropped) before another copy of it may
        # start, on another lane, whose messages must come after them.
        publisher.drain()  # never raises
        runs.end(incarnation, finished=finished, lost=lost)
        figures.end(outcome, stream)


def _stop_if_due(lost: int, link: Any, incarnation: Incarnation, runs: Running) -> None:
    """Raise :class:`HandBack` when the grace of a warm shutdown is over, and
    :class:`Orphaned` when a connection was lost since the count ``lost``,
    the task message's connection ``link`` is gone (:class:`TaskLink`), or
    the task message came back to this process (:meth:`Running.superseded`)."""
    if warm_shutdown.due():
        raise HandBack
    if losses.since(lost) or not task_link.alive(link) or runs.superseded(incarnation):
        raise Orphaned


def _drop_duplicate(task: Task, request: ChatRequest) -> None:
    """Dead-letter a request whose uid another request is streaming in this process."""
    settings: Settings = task.app.settings
    error = DuplicateRequest(
        f"uid {request.uid} is being answered for another request; this one is dropped"
    )
    error.uid = request.uid
    logger.warning("uid=%s: rejected (%s): %s", request.uid, error.code, error.message)
    metrics.dead_lettered(error.code)
    try:
        with task.app.pools.confirmed.acquire(block=True) as producer:
            dead_letter(
                producer,
                settings,
                json.dumps(request.to_task()),
                error,
                content_type="application/json",
                content_encoding="utf-8",
            )
    except Exception as exc:  # the copy is dropped all the same
        logger.warning("uid=%s: could not dead-letter a duplicate: %r", request.uid, exc)


def answer(
    stream: ResponseStream,
    request: ChatRequest,
    incarnation: Incarnation,
    settings: Settings,
    figures: metrics.Answering,
    *,
    lost: int,
    link: Any = None,
) -> bool:
    """Stream the LLM's answer, or an error object, then ``[DONE]``; False if cancelled.

    ``figures`` takes the LLM's time to its first payload and the tokens;
    ``lost``, the count of :data:`~app.shutdown.losses` when the task began,
    and ``link``, the connection its message came on: a connection lost since
    ends the stream (:class:`~app.shutdown.Orphaned`)."""
    uid = request.uid
    cancels = cancel.listener(settings).cancels
    runs = running(settings)
    if cancels.cancelled(incarnation):
        logger.info("uid=%s: cancelled before it started", uid)
        return False
    _stop_if_due(lost, link, incarnation, runs)
    client = llm.client(settings)
    started = time.monotonic()
    for attempt in range(settings.llm_max_retries + 1):
        opened = False  # the LLM answered 200 and its stream began
        tokens = False  # a chunk with more than the opening role went out
        try:
            if request.stream:
                with llm.stream(client, request) as payloads:
                    opened = True
                    for payload, chunk in payloads:
                        if figures.llm_first is None:
                            figures.llm_first = time.monotonic()
                        if cancels.cancelled(incarnation):
                            # Leaving the block closes the HTTP stream: the
                            # LLM stops generating.
                            logger.info("uid=%s: cancelled after %d chunks", uid, stream.seq)
                            cancels.forget(incarnation)
                            return False
                        # Leaving the block closes the HTTP stream.
                        _stop_if_due(lost, link, incarnation, runs)
                        stream.chunk(payload)
                        if stream.seq % YIELD_EVERY == 0:
                            gevent.sleep(0)
                        if _carries_token(chunk):
                            tokens = True
                            figures.tokens += 1
                        elif not tokens:
                            tokens = not opens_only(chunk)
            else:
                completion = llm.complete(client, request)
                figures.llm_first = time.monotonic()
                stream.completion(completion)
        except (PublishFailed, HandBack):
            raise
        except Exception as exc:
            # The SDK already retried what failed before the stream opened; a
            # stream that broke before its first token is tried again here,
            # and its answer starts over (``restart``, seq 0) if its opening
            # chunk went out.
            if opened and not tokens and attempt < settings.llm_max_retries and llm.retryable(exc):
                delay = min(0.5 * 2**attempt, 8.0)
                logger.warning(
                    "uid=%s: LLM failed before the first token (%r); retry in %.1f s",
                    uid,
                    exc,
                    delay,
                )
                metrics.retried_stream(restarts=stream.started)
                time.sleep(delay)
                if stream.started:
                    stream.again()
                continue
            error, status = llm.describe(exc, started=stream.started)
            logger.warning(
                "uid=%s: LLM failed after %d messages: %s",
                uid,
                stream.seq,
                error["error"]["message"],
            )
            stream.fail(error, status)
            return True
        stream.done()
        logger.info(
            "uid=%s: answered in %.2f s (%d messages)", uid, time.monotonic() - started, stream.seq
        )
        return True
    return True  # pragma: no cover - the loop always returns


def _carries_token(chunk: dict[str, Any]) -> bool:
    """A chunk with content or a tool call (one token, from most LLM servers)."""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls")):
            return True
    return False
