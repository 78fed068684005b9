"""The LLM side: one openai client per process, and its errors in OpenAI's words.

The openai SDK retries what fails before an answer starts (connection
errors, timeouts, 408, 409, 429 honouring ``Retry-After``, 5xx) with
exponential backoff, ``LLM_MAX_RETRIES`` times.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import httpx2
import openai

from app.errors import error_object
from config import Settings

_lock = threading.Lock()
_clients: dict[int, openai.OpenAI] = {}

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


def client(settings: Settings) -> openai.OpenAI:
    """This process's client (made after a fork, so never shared across one)."""
    pid = os.getpid()
    found = _clients.get(pid)
    if found is None:
        with _lock:
            found = _clients.get(pid)
            if found is None:
                found = _clients[pid] = openai.OpenAI(
                    api_key=settings.openai_api_key,
                    base_url=settings.openai_url,
                    max_retries=settings.llm_max_retries,
                    timeout=openai.Timeout(
                        settings.llm_read_timeout, connect=settings.llm_connect_timeout
                    ),
                    http_client=openai.DefaultHttpxClient(
                        limits=httpx2.Limits(
                            max_connections=settings.llm_max_connections,
                            max_keepalive_connections=min(settings.llm_max_connections, 256),
                        )
                    ),
                )
    return found


def describe(exc: BaseException, *, started: bool) -> tuple[dict[str, Any], int]:
    """An exception from the LLM call as (OpenAI error object, HTTP status).

    ``started``: whether the answer had begun (a dropped connection is then a
    broken stream, not an unreachable LLM).
    """
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
            f"the LLM cannot be reached at its URL (OPENAI_URL): {exc}",
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
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRYABLE_STATUS
    return isinstance(exc, openai.APIConnectionError | httpx2.TransportError)
