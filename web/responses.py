"""Reading one answer from its response queue, for one client.

An :class:`Answer` is what every streaming route (SSE, the OpenAI drop-in,
the WebSocket) does with a response queue: take its deliveries in order until
``[DONE]``, and then clean up. Cleaning up is the same for all: stop
consuming; when the client went away before the answer was complete, ask the
worker to stop the LLM call (the cooperative cancel, so no tokens are paid
for nobody); and delete the queue, whose stream has been delivered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from app import metrics
from app.broker import request_cancel
from web.client import ClientGone, ClientWatch
from web.publisher import Replies
from web.router import Delivery, Stream
from web.services import Services

logger = logging.getLogger(__name__)


class Answer:
    """One client reading ``response_<uid>``: :meth:`next` until done, then :meth:`close`."""

    def __init__(
        self,
        services: Services,
        uid: str,
        *,
        environ: Mapping[str, Any] | None = None,
        wait: float = 0.0,
        replies: Replies | None = None,
    ) -> None:
        self.services = services
        self.uid = uid
        self.rid: str | None = None  # the incarnation whose messages came
        # Its direct replies, or its response queue.
        self.stream: Replies | Stream = (
            replies if replies is not None else services.router.open(uid, wait)
        )
        self.finished = False  # the worker has nothing more to send
        self.delivered = 0
        self._closed = False
        self._watch = (
            ClientWatch(environ, lambda: self.stream.interrupt(ClientGone()))
            if environ is not None
            else None
        )
        metrics.recorder().web_streams.inc()

    def next(self, timeout: float | None) -> Delivery | None:
        """The next message, or None after ``timeout`` seconds of silence.

        Raises :class:`ClientGone` when the client left, and a
        :class:`~app.errors.ChatqueueError` when the stream broke.
        """
        delivery = self.stream.get(timeout)
        if delivery is not None:
            self.delivered += 1
            self.rid = delivery.rid or self.rid
            if delivery.final:
                self.finished = True
        return delivery

    def close(self) -> None:
        """Stop reading; cancel the LLM call if the answer was cut short; delete the queue.

        Routes close an answer *before* they pass its ``[DONE]`` on, so a
        client that has seen ``[DONE]`` finds the queue gone.
        """
        self._close(keep=False)

    def keep(self) -> None:
        """Stop reading, but leave the queue and the LLM call alone.

        For a stream that broke on the web front's side (RabbitMQ went away):
        the answer goes on into its queue, and the client may read it again.
        """
        self._close(keep=True)

    def _close(self, *, keep: bool) -> None:
        if self._closed:
            return
        self._closed = True
        metrics.recorder().web_streams.dec()
        if self._watch is not None:
            self._watch.stop()
        if keep:
            logger.info("uid=%s: stream broke off after %d messages", self.uid, self.delivered)
            self.stream.close(delete=False)
            return
        if not self.finished:
            logger.info(
                "uid=%s: client left after %d messages; cancelling the LLM call",
                self.uid,
                self.delivered,
            )
            self._cancel()
        self.stream.close(delete=True)

    def _cancel(self) -> None:
        settings = self.services.settings
        try:
            with self.services.producer() as producer:
                request_cancel(producer, settings, self.uid, self.rid, time.time())
        except Exception as exc:
            # The client is gone either way; the LLM timeout bounds the waste.
            logger.warning("uid=%s: could not ask for a cancel: %r", self.uid, exc)
