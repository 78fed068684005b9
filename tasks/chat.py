"""The task: call the LLM and stream its answer onto the response queue.

The task message is acknowledged late and given back when its worker dies,
so every accepted request is answered at least once. A stream a second worker
takes over starts again from ``seq`` 0 with the header ``restart: true``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from celery import Task
from celery.exceptions import Reject

from app.broker import Lane, dead_letter
from app.errors import DuplicateRequest
from app.protocol import Publish, ResponseStream
from app.request import ChatRequest
from config import Settings
from tasks import cancel, llm
from tasks.admission import Admission, NotAdmitted, claim_in_background

logger = logging.getLogger(__name__)


class Seen:
    """The uids this process is answering, or answered within the dedup window.

    A second copy of a task (a duplicate that slipped through the claim, or a
    redelivered task whose input message was also redelivered and handed off
    again) is dropped rather than answered twice.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self._running: set[str] = set()
        self._answered: OrderedDict[str, float] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def begin(self, uid: str, window: float) -> bool:
        """Whether this copy of ``uid`` is to be answered."""
        now = time.monotonic()
        with self._lock:
            while self._answered and (
                len(self._answered) > self._limit
                or next(iter(self._answered.values())) < now - window
            ):
                self._answered.popitem(last=False)
            if uid in self._running or uid in self._answered:
                return False
            self._running.add(uid)
            return True

    def end(self, uid: str, *, answered: bool) -> None:
        with self._lock:
            self._running.discard(uid)
            if answered:
                self._answered[uid] = time.monotonic()


_seen = Seen()


class PublishFailed(Exception):
    """The broker would not take a response message, even after retries."""


def _publisher(lane: Lane, admission: Admission) -> Publish:
    """Publishes through ``lane``, once ``admission`` says the uid is this task's."""
    admitted = False

    def publish(body: str, routing_key: str, properties: dict[str, Any]) -> None:
        nonlocal admitted
        try:
            if not admitted:
                if not admission.admitted():
                    raise NotAdmitted()
                admitted = True
            lane.publish(body, routing_key, properties)
        except NotAdmitted:
            raise
        except Exception as exc:
            raise PublishFailed(str(exc)) from exc

    return publish


def stream_chat(
    task: Task, payload: dict[str, Any], restart: bool = False, token: str = ""
) -> None:
    """Answer one request; registered as ``chatqueue.stream_chat``.

    ``restart`` comes from a hand-off of a redelivered input message: an
    earlier worker may have begun the answer, so this one starts it again.
    ``token`` is the secret of a claim the web front made at submission.
    """
    settings: Settings = task.app.settings
    request = ChatRequest.from_task(payload)
    uid = request.uid
    restart = restart or bool((task.request.delivery_info or {}).get("redelivered"))
    if not _seen.begin(uid, settings.dedup_window):
        if restart:
            logger.warning("uid=%s: already answered or being answered here; copy dropped", uid)
        else:
            _drop_duplicate(task, request)
        return
    answered = False
    try:
        admission = claim_in_background(task.app.pools, settings, uid, restart=restart, token=token)
        stream = ResponseStream(
            _publisher(task.app.pools.lanes.next(), admission),
            request.reply_to or settings.response_queue(uid),
            uid,
            restart=restart,
        )
        if restart:
            logger.warning("uid=%s: redelivered; the answer starts again", uid)
        answer(stream, request, settings)
        answered = True
    except NotAdmitted:
        _drop_duplicate(task, request)
    except PublishFailed as exc:
        # The broker is unreachable: give the request back to be answered later.
        logger.error("uid=%s: cannot publish the answer (%s); requeued", uid, exc)
        raise Reject(exc, requeue=True) from exc
    finally:
        _seen.end(uid, answered=answered)


def _drop_duplicate(task: Task, request: ChatRequest) -> None:
    """Dead-letter a copy of a uid that another request has (its first copy is answered)."""
    settings: Settings = task.app.settings
    error = DuplicateRequest(
        f"uid {request.uid} was already accepted in the last {settings.dedup_window} s; "
        "this copy is dropped"
    )
    error.uid = request.uid
    logger.warning("uid=%s: rejected (%s): %s", request.uid, error.code, error.message)
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


def answer(stream: ResponseStream, request: ChatRequest, settings: Settings) -> None:
    """Stream the LLM's answer, or an error object, then ``[DONE]``."""
    uid = request.uid
    cancels = cancel.listener(settings)
    if cancels.cancelled(uid):
        logger.info("uid=%s: cancelled before it started", uid)
        return
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
                        if cancels.cancelled(uid):
                            # Leaving the block closes the HTTP stream: the
                            # LLM stops generating.
                            logger.info("uid=%s: cancelled after %d chunks", uid, stream.seq)
                            return
                        stream.chunk(payload)
                        tokens = tokens or not _no_token(chunk)
            else:
                stream.completion(llm.complete(client, request))
        except (PublishFailed, NotAdmitted):
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
            return
        stream.done()
        logger.info(
            "uid=%s: answered in %.2f s (%d messages)", uid, time.monotonic() - started, stream.seq
        )
        return


def _no_token(chunk: dict[str, Any]) -> bool:
    """A chunk that only opens the answer: no content, no tool call, no end."""
    choices = chunk.get("choices") or []
    return all(
        isinstance(c, dict)
        and not (c.get("delta") or {}).get("content")
        and not (c.get("delta") or {}).get("tool_calls")
        and c.get("finish_reason") is None
        for c in choices
    )
