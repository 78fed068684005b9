"""The LLM side: one openai client per process, its answers as raw payloads,
and its errors in OpenAI's words.

The openai SDK retries what fails before an answer starts (connection
errors, timeouts, 408, 409, 5xx) with exponential backoff, ``LLM_MAX_RETRIES``
times; but not an upstream that says it is saturated (a 429, or a 503 with
``retry-after``): chatqueue pauses that upstream for every worker instead
(:func:`saturated`, app/dispatcher.py).

Answers are taken as the LLM sent them: each SSE ``data:`` payload is
forwarded verbatim (the wire contract), checked to be a JSON object, but not
turned into SDK objects and back, which cost most of the worker's time per
chunk. The stream is read to its end, so its HTTP connection is reused.
A stream that ends cleanly (``[DONE]`` or EOF) with no ``finish_reason`` on
any chunk is cut short, which the SDK does not flag: it ends in
:class:`IncompleteStream` (``llm_stream_incomplete``, 502), retried like a
broken stream when no token went out.
"""

from __future__ import annotations

import contextlib
import email.utils
import itertools
import json
import math
import re
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx2
import openai
from openai._streaming import SSEDecoder  # the SDK's own SSE parser

from app.errors import UpstreamError, error_object
from app.metrics import on_llm_request, on_llm_response
from app.process import per_process
from app.request import ChatRequest
from config import Settings
from config.upstreams import Upstream

CHAT_COMPLETIONS = "/chat/completions"

# Status codes the SDK retries, and with them what we may retry ourselves when
# a stream breaks before its first chunk.
RETRYABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


# Connections one HTTP connection pool holds. httpcore looks at every
# connection of its pool on each request and each response closed (and polls
# each idle socket): with 1,000 streams in one pool that scan was more than
# half of the worker's CPU. So a process keeps several small pools (clients),
# and each request takes the next one in turn.
CONNECTIONS_PER_POOL = 64


class Clients:
    """The openai clients of one process, for each upstream several, each with
    a small connection pool."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._tls = httpx2.create_ssl_context()  # one for all: each costs milliseconds to make
        self._by_upstream: dict[str, list[openai.OpenAI]] = {}
        self._lock = threading.Lock()
        self._turn = itertools.count()

    def next(self, upstream: Upstream) -> openai.OpenAI:
        clients = self._by_upstream.get(upstream.name)
        if clients is None:
            with self._lock:
                clients = self._by_upstream.get(upstream.name)
                if clients is None:
                    clients = self._by_upstream[upstream.name] = self._make(upstream)
        return clients[next(self._turn) % len(clients)]

    def _make(self, upstream: Upstream) -> list[openai.OpenAI]:
        settings = self.settings
        pools = max(1, math.ceil(settings.llm_max_connections / CONNECTIONS_PER_POOL))
        per_pool = math.ceil(settings.llm_max_connections / pools)
        return [_new_client(settings, upstream, per_pool, self._tls) for _ in range(pools)]


def _new_client(
    settings: Settings, upstream: Upstream, connections: int, tls: ssl.SSLContext
) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=upstream.api_key,
        base_url=upstream.url,
        max_retries=settings.llm_max_retries,
        timeout=openai.Timeout(settings.llm_read_timeout, connect=settings.llm_connect_timeout),
        http_client=openai.DefaultHttpxClient(
            verify=tls,
            limits=httpx2.Limits(
                max_connections=connections, max_keepalive_connections=connections
            ),
            # Every response by status, and the SDK's retries (app/metrics.py);
            # a saturated upstream is not asked again by the SDK.
            event_hooks={
                "request": [on_llm_request],
                "response": [on_llm_response, _saturation_is_not_retried],
            },
        ),
    )


_clients = per_process(Clients)


def client(settings: Settings, upstream: Upstream | None = None) -> openai.OpenAI:
    """A client of this process for ``upstream`` (default: the one serving
    OPENAI_MODEL), made after a fork, so never shared across one; the next in turn."""
    if upstream is None:
        upstream = settings.upstreams.route(settings.openai_model) or settings.upstreams.all[0]
    return _clients(settings).next(upstream)


# --- a saturated upstream ----------------------------------------------------------------------

# Seconds of a pause when a 429 says nothing of how long.
DEFAULT_PAUSE = 1.0
# The longest pause chatqueue takes from a header.
MAX_PAUSE = 600.0
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)(ms|h|m|s))")


def saturated(response: Any) -> bool:
    """Whether an upstream's answer says it is saturated: a 429, or a 503 with
    ``retry-after``. All its callers wait then (app/dispatcher.py), instead of
    each one retrying on its own."""
    status = response.status_code
    headers = response.headers
    return status == 429 or (
        status == 503 and ("retry-after" in headers or "retry-after-ms" in headers)
    )


def _saturation_is_not_retried(response: Any) -> None:
    """The SDK retries 429s and 5xx by itself, each caller on its own clock: a
    saturated upstream gets the whole wave again when its window ends. The
    SDK obeys ``x-should-retry: false``; chatqueue pauses the upstream instead."""
    if saturated(response):
        response.headers["x-should-retry"] = "false"


def pause_of(headers: Any) -> float:
    """Seconds to leave an upstream alone, from the headers of its 429 or 503:
    ``retry-after-ms``, ``retry-after`` (seconds or an HTTP date), or the
    longest of OpenAI's ``x-ratelimit-reset-requests`` / ``-tokens``
    (``1s``, ``6m0s``, ``20ms``); DEFAULT_PAUSE if none says."""
    found: list[float] = []
    raw = headers.get("retry-after-ms")
    if raw is not None:
        with contextlib.suppress(ValueError):
            found.append(float(raw) / 1000)
    raw = headers.get("retry-after")
    if raw is not None and not found:
        try:
            found.append(float(raw))
        except ValueError:
            with contextlib.suppress(TypeError, ValueError, OverflowError):
                when = email.utils.parsedate_to_datetime(raw)
                found.append(when.timestamp() - time.time())
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        raw = headers.get(name)
        if raw:
            found.append(_duration(raw))
    pause = max(found, default=DEFAULT_PAUSE)
    return min(max(pause, 0.0), MAX_PAUSE) or DEFAULT_PAUSE


def _duration(raw: str) -> float:
    """``6m0s``, ``1.5s``, ``20ms`` in seconds (0 for what it cannot read)."""
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    try:
        return float(raw)
    except ValueError:
        return sum(float(n) * scale[unit] for n, unit in _DURATION.findall(raw))


class MalformedPayload(UpstreamError):
    """The LLM sent a payload that is not a JSON object."""

    code = "llm_stream_interrupted"


class IncompleteStream(UpstreamError):
    """The LLM's stream ended cleanly (``[DONE]`` or EOF) but no choice had a
    ``finish_reason``: the answer is cut short, though the SDK sees no error."""

    code = "llm_stream_incomplete"


class StreamedError(UpstreamError):
    """The LLM sent an error object inside its stream."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(str(error.get("message") or "the LLM reported an error mid-stream"))
        self.error = error


def _object(data: str) -> dict[str, Any]:
    try:
        payload = json.loads(data)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise MalformedPayload(f"the LLM sent a payload that is not a JSON object: {data[:200]!r}")
    if payload.get("error"):
        error = payload["error"]
        raise StreamedError(error if isinstance(error, dict) else {"message": str(error)})
    return payload


def _body(request: ChatRequest, upstream: Upstream | None, *, stream: bool) -> dict[str, Any]:
    body = {
        "model": request.model,
        "messages": request.messages,
        "stream": stream,
        **request.params,
    }
    if upstream is not None and upstream.forward_service_tier and request.service_tier:
        body["service_tier"] = request.service_tier
    return body


@contextmanager
def stream(
    client: openai.OpenAI, request: ChatRequest, upstream: Upstream | None = None
) -> Iterator[Iterator[tuple[str, dict[str, Any]]]]:
    """Open the streamed answer; yields ``(payload, parsed)`` per ``data:`` event.

    Raises the SDK's errors when the answer does not start (after its
    retries), :class:`UpstreamError` for a payload that is not JSON, and
    :class:`IncompleteStream` after the last payload of a stream that ended
    (``[DONE]`` or EOF) with no ``finish_reason`` on any chunk.

    The request goes through the SDK's ``post`` (its retries, timeouts,
    headers and errors, as ``create`` has them) with a body already checked
    by :func:`app.request.parse_request`: ``create`` would walk every message
    against its typed parameters first, which cost an eighth of the worker's
    time.
    """
    response = client.post(
        CHAT_COMPLETIONS,
        body=_body(request, upstream, stream=True),
        cast_to=httpx2.Response,
        stream=True,
    )
    try:

        def payloads() -> Iterator[tuple[str, dict[str, Any]]]:
            done = False
            finished = False  # a choice had a finish_reason (the usage chunk after it has none)
            count = 0
            for event in SSEDecoder().iter_bytes(response.iter_bytes()):
                if done:
                    continue  # read to the end: the connection goes back to the pool
                if event.data.startswith("[DONE]"):
                    done = True
                    continue
                parsed = _object(event.data)
                finished = finished or _finishes(parsed)
                count += 1
                yield event.data, parsed
            if not finished:
                ending = "[DONE]" if done else "the end of the HTTP body, without [DONE]"
                raise IncompleteStream(
                    f"the LLM stream ended ({ending}) after {count} chunks without a "
                    "finish_reason: the answer is incomplete; ask again, or check the LLM "
                    "server (or a proxy in front of it) for a cut stream"
                )

        yield payloads()
    finally:
        response.close()


def _finishes(chunk: dict[str, Any]) -> bool:
    """Whether a chunk ends the answer: a ``finish_reason`` on one of its choices."""
    choices = chunk.get("choices")
    return isinstance(choices, list) and any(
        isinstance(c, dict) and c.get("finish_reason") is not None for c in choices
    )


def complete(client: openai.OpenAI, request: ChatRequest, upstream: Upstream | None = None) -> str:
    """The whole answer of a ``stream: false`` request: the ``chat.completion`` as sent."""
    response = client.post(
        CHAT_COMPLETIONS, body=_body(request, upstream, stream=False), cast_to=httpx2.Response
    )
    text = response.text
    _object(text)
    return text


def describe(exc: BaseException, *, started: bool) -> tuple[dict[str, Any], int]:
    """An exception from the LLM call as (OpenAI error object, HTTP status).

    ``started``: whether the answer had begun (a dropped connection is then a
    broken stream, not an unreachable LLM).
    """
    if isinstance(exc, StreamedError):
        error = exc.error
        return error_object(
            f"the LLM reported an error mid-stream: {exc.message}",
            str(error.get("type") or "upstream_error"),
            error.get("code") or "llm_error",
            error.get("param"),
        ), 502
    if isinstance(exc, IncompleteStream):
        return exc.to_error_object(), exc.status
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        body = exc.body if isinstance(exc.body, dict) else {}
        message = body.get("message") or exc.message
        kind = body.get("type") or _TYPE_BY_STATUS.get(status, "server_error")
        code = body.get("code") or status
        return error_object(
            f"the LLM answered {status}: {message}", kind, code, body.get("param")
        ), status
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
        return error_object(
            "the LLM did not answer in time (LLM_READ_TIMEOUT); try again later",
            "timeout",
            "llm_timeout",
        ), 504
    if isinstance(exc, openai.APIConnectionError) and not started:
        return error_object(
            f"the LLM cannot be reached at its URL (OPENAI_URL, or its upstream's url): {exc}",
            "api_connection_error",
            "llm_unreachable",
        ), 502
    return error_object(
        f"the LLM stream broke off: {type(exc).__name__}: {exc}",
        "upstream_error",
        "llm_stream_interrupted",
    ), 502


def retryable(exc: BaseException) -> bool:
    """Whether a failure may be retried (only ever before the first token)."""
    if isinstance(exc, IncompleteStream):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRYABLE_STATUS
    return isinstance(exc, openai.APIConnectionError | httpx2.TransportError)
