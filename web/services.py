"""What the routes of one web process share: settings, publishing pools, the router."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from flask import current_app

from app.broker import Pools
from config import Settings
from web.router import Router

EXTENSION = "chatqueue"


class Services:
    """Made by the app factory; nothing connects until first used (after the fork)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pools = Pools(settings)
        self._router: Router | None = None

    def producer(self) -> AbstractContextManager[Any]:
        """A producer of the confirmed pool: every publish waits for the broker's confirm."""
        pool: Any = self.pools.confirmed
        acquired: AbstractContextManager[Any] = pool.acquire(block=True)
        return acquired

    @property
    def router(self) -> Router:
        if self._router is None:
            self._router = Router(self.settings)
        return self._router


def services() -> Services:
    """The services of the current app."""
    found: Services = current_app.extensions[EXTENSION]
    return found
