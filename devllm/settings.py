"""Settings of the development LLM, filled from the command line by :mod:`devllm.cli`."""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
DEFAULT_TOKEN_DELAY = 0.02
DEFAULT_TOKENS = 12
BACKLOG = 2048


@dataclass(frozen=True)
class Settings:
    """How the development LLM listens and answers.

    ``port=0`` binds a free port (the log line says which). ``api_key=None``
    accepts any request; otherwise ``Authorization: Bearer <api_key>`` is required
    on ``/v1/``.
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token_delay: float = DEFAULT_TOKEN_DELAY
    tokens: int = DEFAULT_TOKENS
    api_key: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range: use 0 (any free port) to 65535")
        if not math.isfinite(self.token_delay) or self.token_delay < 0:
            raise ValueError(f"token delay {self.token_delay} must be a number of seconds >= 0")
        if self.tokens < 0:
            raise ValueError(f"tokens {self.tokens} must be a whole number >= 0")
        if self.api_key == "":
            raise ValueError("the API key is empty: give a non-empty key or none at all")
