"""The response protocol: the messages on ``response_<uid>`` (docs/protocol.md).

Each message body is one OpenAI streaming ``data:`` payload, in order, and the
last one is always ``[DONE]``. Properties: ``content_type``, ``correlation_id``
(the uid), ``type`` (``chunk``, ``completion``, ``error``, ``done``) and the
header ``seq`` (0, 1, 2, ...). A stream that a worker had to start again
(its first worker died, or the LLM broke its stream after the opening chunk
but before the first token and was asked again) carries the header
``restart: true`` on every message: its ``seq`` starts at 0 again and a reader
drops what it had. The header ``rid`` names the incarnation (the hand-off)
that wrote the message: a reader that leaves cancels that one (see
:mod:`app.lifecycle`). The header ``run`` names one run of the answer (a
new one at each start over). A worker that lost its connection mid-stream
and goes on writes the run again from ``seq`` 0, the same bodies, marked
``restart`` and ``replay: true`` (tasks/chat.py): a reader that has that
run's messages up to some ``seq`` may skip those again instead of starting
over.

Properties are given to ``publish`` as py-amqp names them
(``application_headers`` for the headers table).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

logger = logging.getLogger(__name__)

DONE = "[DONE]"
JSON = "application/json"
TEXT = "text/plain"


class Kind(StrEnum):
    CHUNK = "chunk"
    COMPLETION = "completion"
    ERROR = "error"
    DONE = "done"
    # A waiting request's place (``queue.status``); no ``seq``: the numbered
    # messages of the answer are the same with or without it.
    QUEUE = "queue"


# The properties of a ``queue`` message, but its ``correlation_id``: transient,
# since a place is of no use after a broker restart (and a persistent message
# costs the broker a write).
QUEUE_PROPERTIES: dict[str, Any] = {
    "content_type": "application/json",
    "content_encoding": "utf-8",
    "type": "queue",
    "delivery_mode": 1,
}


def queue_status(position: int, wait: float | None) -> str:
    """The body of a ``queue`` message: a waiting request's place (1 = next,
    0 = its LLM call starts) and its estimated wait in seconds (None: unknown)."""
    return json.dumps(
        {"object": "queue.status", "position": position, "estimated_wait_seconds": wait}
    )


# publish(body, routing_key, properties) -> None
Publish = Callable[[str, str, dict[str, Any]], None]


def new_run() -> str:
    """The id of one run of an answer (the ``run`` header)."""
    return secrets.token_hex(4)


def opens_only(chunk: dict[str, Any]) -> bool:
    """Whether a ``chat.completion.chunk`` only opens the answer: no content,
    no tool call, no end. A stream started again after such chunks alone
    repeats nothing a reader could have shown."""
    choices = chunk.get("choices") or []
    return all(
        isinstance(c, dict)
        and not (c.get("delta") or {}).get("content")
        and not (c.get("delta") or {}).get("tool_calls")
        and c.get("finish_reason") is None
        for c in choices
    )


class ResponseStream:
    """Writes one answer onto its response queue, numbering the messages.

    ``publish`` sends one message; the stream owns the order and the
    properties. Once :meth:`done` has been sent nothing more goes out.
    """

    def __init__(
        self, publish: Publish, queue: str, uid: str, *, restart: bool = False, rid: str = ""
    ) -> None:
        self._publish = publish
        self.queue = queue
        self.uid = uid
        self.restart = restart
        self.rid = rid
        self.run = new_run()
        self.seq = 0
        self.finished = False
        # For the metrics: messages sent (restarts included), when the first
        # went out (monotonic), the code of the error object sent.
        self.sent = 0
        self.first_sent: float | None = None
        self.error_code = ""

    @property
    def started(self) -> bool:
        """Whether anything went out yet (after that, no retry is possible)."""
        return self.seq > 0

    def chunk(self, payload: str) -> None:
        self._send(payload, Kind.CHUNK, JSON)

    def completion(self, payload: str) -> None:
        self._send(payload, Kind.COMPLETION, JSON)

    def error(self, error_object: dict[str, Any], status: int) -> None:
        self.error_code = str((error_object.get("error") or {}).get("code") or status)
        self._send(json.dumps(error_object), Kind.ERROR, JSON, status=status)

    def again(self) -> None:
        """Start the answer over: what follows carries ``restart``, ``seq`` from 0
        and a new ``run``."""
        self.seq = 0
        self.restart = True
        self.run = new_run()

    def done(self) -> None:
        self._send(DONE, Kind.DONE, TEXT)
        self.finished = True

    def starts(self) -> None:
        """Tell a request that waited for its place that its LLM call starts
        (``queue``, position 0); not numbered, not part of the answer."""
        properties = QUEUE_PROPERTIES | {"correlation_id": self.uid}
        self._publish(queue_status(0, 0.0), self.queue, properties)

    def fail(self, error_object: dict[str, Any], status: int) -> None:
        """End the stream with an error object and ``[DONE]``."""
        self.error(error_object, status)
        self.done()

    def _send(self, body: str, kind: Kind, content_type: str, **headers: Any) -> None:
        if self.finished:
            raise RuntimeError(f"the stream of {self.uid} is finished")
        headers["seq"] = self.seq
        if self.restart:
            headers["restart"] = True
        if self.rid:
            headers["rid"] = self.rid
        headers["run"] = self.run
        self._publish(
            body,
            self.queue,
            {
                "content_type": content_type,
                "content_encoding": "utf-8",
                "correlation_id": self.uid,
                "type": str(kind),
                "application_headers": headers,
            },
        )
        self.seq += 1
        self.sent += 1
        if self.first_sent is None:
            self.first_sent = time.monotonic()
