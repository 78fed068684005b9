"""Behaviour on demand, read from the ``model`` string of a request.

The syntax (``name;key=value;...``) is documented in :mod:`devllm.server`.
:meth:`Behaviour.parse` raises :class:`BehaviourError` with a message that
names the offending part, which the server returns as a 400.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Fault = Literal["disconnect", "stall", "malformed", "error", "truncate", "truncate_eof"]
FAULTS: tuple[Fault, ...] = (
    "disconnect",
    "stall",
    "malformed",
    "error",
    "truncate",
    "truncate_eof",
)
DEFAULT_STALL = 3600.0


class BehaviourError(ValueError):
    """The model string asks for a behaviour that does not exist or has a bad value."""


def _int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("must be a whole number") from None


def _count(raw: str) -> int:
    value = _int(raw)
    if value < 0:
        raise ValueError("must be a whole number of at least 0")
    return value


def _positive(raw: str) -> int:
    value = _int(raw)
    if value < 1:
        raise ValueError("must be a whole number of at least 1")
    return value


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a number of seconds of at least 0")
    return value


def _timestamp(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a time.time() value (seconds since the epoch)") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a time.time() value (seconds since the epoch)")
    return value


def _status(raw: str) -> int:
    value = _int(raw)
    if not 400 <= value <= 599:
        raise ValueError("must be an HTTP error status from 400 to 599")
    return value


def _fault(raw: str) -> Fault:
    if raw not in FAULTS:
        raise ValueError(f"must be one of {', '.join(FAULTS)}")
    return raw


_KEYS: dict[str, Callable[[str], Any]] = {
    "tokens": _count,
    "delay": _seconds,
    "first_delay": _seconds,
    "hang": _seconds,
    "status": _status,
    "times": _positive,
    "until": _timestamp,
    "retry_after": _seconds,
    "fault": _fault,
    "at": _count,
    "stall": _seconds,
    "tag": str,
}


@dataclass(frozen=True)
class Behaviour:
    """What one request asks of the server beyond a normal answer."""

    name: str
    tokens: int | None = None
    delay: float | None = None
    first_delay: float = 0.0
    hang: float = 0.0
    status: int | None = None
    times: int | None = None
    until: float | None = None
    retry_after: float | None = None
    fault: Fault | None = None
    at: int = 0
    stall: float = DEFAULT_STALL
    tag: str | None = None

    @property
    def may_fail(self) -> bool:
        """Whether the request asks for a failure (``hang``, ``status`` or ``fault``)."""
        return self.hang > 0 or self.status is not None or self.fault is not None

    @classmethod
    def parse(cls, model: str) -> Behaviour:
        """Read ``name;key=value;...``; a model without ``;`` behaves normally."""
        name, *parts = model.split(";")
        values: dict[str, Any] = {}
        for part in parts:
            if not part.strip():
                continue
            key, sep, raw = (piece.strip() for piece in part.partition("="))
            if not sep or key not in _KEYS:
                raise BehaviourError(
                    f"model {model!r}: {part.strip()!r} is not a devllm option; use key=value"
                    f" with a key among {', '.join(_KEYS)} (see devllm/server.py)"
                )
            try:
                values[key] = _KEYS[key](raw)
            except ValueError as exc:
                raise BehaviourError(f"model {model!r}: {key}={raw!r} {exc}") from None
        return cls(name=name.strip(), **values)
