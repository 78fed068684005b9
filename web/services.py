"""What the routes of one web process share: settings, the publisher, pools, the router."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from amqp.exceptions import AMQPError
from flask import current_app
from gevent.lock import Semaphore

from app.broker import Pools
from app.errors import BrokerUnavailable
from config import Settings
from web.publisher import Publisher
from web.router import LINK_ERRORS, Router

EXTENSION = "chatqueue"


class Services:
    """Made by the app factory; nothing connects until first used (after the fork)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pools = Pools(settings)
        self._router: Router | None = None
        self._publisher: Publisher | None = None
        self._opening = Semaphore()

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
                    self._publisher = Publisher(self.settings)
                except (AMQPError, *LINK_ERRORS) as exc:
                    raise BrokerUnavailable(f"RabbitMQ cannot be reached: {exc}") from exc
            return self._publisher

    @property
    def router(self) -> Router:
        if self._router is None:
            self._router = Router(self.settings)
        return self._router


def services() -> Services:
    """The services of the current app."""
    found: Services = current_app.extensions[EXTENSION]
    return found
