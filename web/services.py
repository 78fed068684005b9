"""What the routes of one web process share: settings, the publisher, pools, the router."""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from typing import Any

import gevent
from amqp.exceptions import AMQPError
from flask import current_app
from gevent.lock import Semaphore

from app.broker import Pools
from app.errors import BrokerUnavailable
from config import Settings
from web.publisher import Publisher, ReplyBook
from web.router import LINK_ERRORS, Router

logger = logging.getLogger(__name__)

EXTENSION = "chatqueue"
# Seconds between two tries to reconnect for the answers awaited.
RECONNECT_PAUSE = 0.5


class Services:
    """Made by the app factory; nothing connects until first used (after the fork)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pools = Pools(settings)
        self._router: Router | None = None
        self._publisher: Publisher | None = None
        self._opening = Semaphore()
        self.replies = ReplyBook(settings)
        self._reconnecting = False

    def producer(self) -> AbstractContextManager[Any]:
        """A producer of the confirmed pool: every publish waits for the broker's confirm."""
        pool: Any = self.pools.confirmed
        acquired: AbstractContextManager[Any] = pool.acquire(block=True)
        return acquired

    def publisher(self) -> Publisher:
        """This process's :class:`Publisher`, made anew when its connection broke."""
        found = self._publisher
        if found is not None and found.usable:
            return found
        with self._opening:
            if self._publisher is None or not self._publisher.usable:
                try:
                    self._publisher = Publisher(self.settings, self.replies, self._lost)
                except (AMQPError, *LINK_ERRORS) as exc:
                    raise BrokerUnavailable(f"RabbitMQ cannot be reached: {exc}") from exc
            return self._publisher

    def _lost(self, error: BaseException) -> None:
        """The publisher's connection broke: while answers are awaited on the
        reply queue, a new one is made at once, which consumes it again."""
        if self.replies.waiting and not self._reconnecting:
            self._reconnecting = True
            gevent.spawn(self._reconnect, error)

    def _reconnect(self, error: BaseException) -> None:
        settings = self.settings
        began = time.monotonic()
        try:
            while self.replies.waiting:
                try:
                    self.publisher()
                except BrokerUnavailable:
                    if time.monotonic() - began >= settings.web_reconnect_timeout:
                        logger.warning(
                            "publisher: RabbitMQ did not come back in %g s; %d answers end",
                            settings.web_reconnect_timeout,
                            len(self.replies.waiting),
                        )
                        self.replies.fail(
                            BrokerUnavailable(
                                f"RabbitMQ did not come back in "
                                f"{settings.web_reconnect_timeout:g} s (WEB_RECONNECT_TIMEOUT) "
                                f"after the connection was lost ({error}); ask again"
                            )
                        )
                        return
                    gevent.sleep(RECONNECT_PAUSE)
                    continue
                logger.info(
                    "publisher: reconnected after %.1f s; %d answers read on",
                    time.monotonic() - began,
                    len(self.replies.waiting),
                )
                return
        finally:
            self._reconnecting = False

    @property
    def router(self) -> Router:
        if self._router is None:
            self._router = Router(self.settings)
        return self._router


def services() -> Services:
    """The services of the current app."""
    found: Services = current_app.extensions[EXTENSION]
    return found
