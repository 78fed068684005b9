"""Whether a task may answer its uid: the claim, made while the LLM starts.

A uid is answered once within ``DEDUP_WINDOW``: the first task to claim it
(see :func:`app.broker.claim_uid`; the broker decides, across any number of
workers) answers, a later copy is a duplicate. The claim costs a queue
declaration and a confirmed publish, a few milliseconds that would otherwise
come before the first token; so it is made on a thread of its own (a greenlet
under the gevent pool) while the task already calls the LLM, and the task
waits for the verdict only before its first message goes out.

A claim that is taken is still this task's own when:

* the task is a copy of an answer that began before (``restart``: its task
  message was redelivered, or its input message was, after a hand-off);
* the request came through the web front, which claimed the uid when it was
  submitted, and carries the claim's secret token (``token``).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from typing import Any

import gevent
from gevent import monkey

from app.broker import BROKER_ERRORS, claim_uid, read_claim
from config import Settings


class NotAdmitted(Exception):
    """The uid is another request's: this copy is a duplicate."""


class Admission:
    """The verdict on one task's uid, reached in the background."""

    def __init__(self, decide: Callable[[], bool], name: str) -> None:
        self._admitted: bool | None = None
        self._error: BaseException | None = None
        self._runner: Any
        if monkey.is_module_patched("threading"):
            # A greenlet runs once the task waits for the LLM, not before:
            # the LLM's request goes out first.
            self._runner = gevent.spawn(self._run, decide)
        else:
            self._runner = threading.Thread(
                target=self._run, args=(decide,), name=name, daemon=True
            )
            self._runner.start()

    def _run(self, decide: Callable[[], bool]) -> None:
        try:
            self._admitted = decide()
        except BaseException as exc:  # handed to the task in admitted()
            self._error = exc

    def admitted(self) -> bool:
        """Wait for the verdict; raises what the broker raised while reaching it."""
        self._runner.join()
        if self._error is not None:
            raise self._error
        return bool(self._admitted)


def claim_in_background(
    pools: Any, settings: Settings, uid: str, *, restart: bool, token: str
) -> Admission:
    """Begin claiming ``uid`` for this task."""

    def decide() -> bool:
        for attempt in (1, 2):
            with pools.confirmed.acquire(block=True) as producer:
                try:
                    return _claim(producer, settings, uid, restart=restart, token=token)
                except BROKER_ERRORS:
                    producer.connection.collect()  # dead: the next acquire reconnects
                    if attempt == 2:
                        raise
                    # Most often a pooled connection that died with a broker
                    # restart: once more, on a new one.
        raise AssertionError("unreachable")

    return Admission(decide, f"admission-{uid}")


def _claim(producer: Any, settings: Settings, uid: str, *, restart: bool, token: str) -> bool:
    if token:
        # Submitted through the web front, which claimed the uid already.
        claim = read_claim(producer.connection, settings, uid)
        if claim is not None:
            return restart or secrets.compare_digest(str(claim.get("token")), token)
    return claim_uid(producer.channel, settings, uid) or restart
