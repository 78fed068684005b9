"""Settings of the development LLM, filled from the command line by :mod:`devllm.cli`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Over = Literal["queue", "interrupt", "503", "429"]
OVER_MODES: tuple[Over, ...] = ("queue", "interrupt", "503", "429")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
DEFAULT_TOKEN_DELAY = 0.02
DEFAULT_TOKENS = 12
DEFAULT_RETRY_AFTER = 1.0
BACKLOG = 2048


@dataclass(frozen=True)
class Settings:
    """How the development LLM listens and answers.

    ``port=0`` binds a free port (the log line says which). ``api_key=None``
    accepts any request; otherwise ``Authorization: Bearer <api_key>`` is required
    on ``/v1/``. ``slots`` is how many chat completions are served at once (0: no
    limit); ``over`` is what happens to a request that finds them all busy, and
    ``retry_after`` the ``retry-after`` seconds of the 429 that ``over="429"``
    answers (see :mod:`devllm.slots`).
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token_delay: float = DEFAULT_TOKEN_DELAY
    tokens: int = DEFAULT_TOKENS
    api_key: str | None = None
    slots: int = 0
    over: Over = "queue"
    retry_after: float = DEFAULT_RETRY_AFTER

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range: use 0 (any free port) to 65535")
        if not math.isfinite(self.token_delay) or self.token_delay < 0:
            raise ValueError(f"token delay {self.token_delay} must be a number of seconds >= 0")
        if self.tokens < 0:
            raise ValueError(f"tokens {self.tokens} must be a whole number >= 0")
        if self.api_key == "":
            raise ValueError("the API key is empty: give a non-empty key or none at all")
        if self.slots < 0:
            raise ValueError(f"slots {self.slots} must be a whole number >= 0 (0: no limit)")
        if self.over not in OVER_MODES:
            raise ValueError(f"over {self.over!r} must be one of {', '.join(OVER_MODES)}")
        if not math.isfinite(self.retry_after) or self.retry_after < 0:
            raise ValueError(f"retry-after {self.retry_after} must be a number of seconds >= 0")
