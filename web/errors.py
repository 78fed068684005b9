"""The web front's own errors, and how every error becomes an HTTP answer.

    app.errors.ChatqueueError
    ├── RequestError (400), BodyTooLarge (413), DuplicateRequest (409)
    ├── BrokerUnavailable (503), BrokerBlocked (503)
    └── (here)
        ├── Unauthorized     no or a wrong API key (401)
        ├── UnknownStream    no response queue for this uid, or not this key's (404)
        ├── StreamBusy       another client is reading this stream (409)
        ├── AnswerTimeout    no answer began within WEB_ANSWER_TIMEOUT (504)
        └── AnswerRestarted  a worker started an answer again that a drop-in
                             stream or the WebSocket had begun to send (502)

Every error leaves as an OpenAI error object with its status code, so the
openai SDK raises its own exception classes for them. A 503 carries
``Retry-After``: the broker is down or blocked for a while, and a client that
retries at once only adds to the load.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from app.errors import ChatqueueError, error_object

logger = logging.getLogger(__name__)

# Seconds a client should wait before it tries a 503 again.
RETRY_AFTER_SECONDS = 5


class Unauthorized(ChatqueueError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class UnknownStream(ChatqueueError):
    status = 404
    type = "invalid_request_error"
    code = "unknown_uid"


class StreamBusy(ChatqueueError):
    status = 409
    type = "invalid_request_error"
    code = "stream_in_use"


class AnswerTimeout(ChatqueueError):
    status = 504
    type = "timeout"
    code = "answer_timeout"


class AnswerCut(ChatqueueError):
    """An answer read from the reply queue (a drop-in stream, the WebSocket)
    ends here with this error; the reader's connection is still good."""


class AnswerRestarted(AnswerCut):
    status = 502
    type = "server_error"
    code = "answer_restarted"


class ReaderTooSlow(AnswerCut):
    status = 408
    type = "timeout"
    code = "reader_too_slow"


def error_response(
    body: dict[str, Any], status: int, headers: dict[str, str] | None = None
) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ChatqueueError)
    def chatqueue_error(exc: ChatqueueError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if exc.status == 503:
            headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return error_response(exc.to_error_object(), exc.status, headers)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        kind = "invalid_request_error" if status < 500 else "server_error"
        code = {
            404: "not_found",
            405: "method_not_allowed",
            413: "body_too_large",
        }.get(status, "http_error")
        return error_response(error_object(exc.description or exc.name, kind, code), status)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        logger.error("unexpected error while answering a request", exc_info=exc)
        body = error_object("internal error; see the web's log", "server_error", "internal_error")
        return error_response(body, 500)
