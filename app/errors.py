"""chatqueue's exceptions.

    ChatqueueError                 base of everything chatqueue raises on purpose
    ├── RequestError               a request that cannot be served as sent (400)
    │   ├── BodyTooLarge           over MAX_BODY_BYTES (413)
    │   ├── DuplicateRequest       the uid is already taken by another request (409)
    │   └── ModelNotFound          no upstream serves the request's model (404)
    ├── BrokerUnavailable          RabbitMQ cannot be reached (503)
    │   └── BrokerBlocked          RabbitMQ blocks publishing: a memory or disk alarm (503)
    └── UpstreamError              the LLM server failed; carries its status

Each one turns into an OpenAI error object at the edges only (the worker's
response queue, the web front's HTTP answers), with :meth:`ChatqueueError.to_error_object`.
"""

from __future__ import annotations

from typing import Any


class ChatqueueError(Exception):
    """Base class; ``status``, ``type`` and ``code`` say how to report it."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        status: int | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.param = param

    def to_error_object(self) -> dict[str, Any]:
        return error_object(self.message, self.type, self.code, self.param)


class RequestError(ChatqueueError):
    """The request is malformed: broken JSON, wrong types, a bad uid...

    ``uid`` and ``reply_to`` are set when they could be read, so that the
    client can still be told.
    """

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"

    uid: str | None = None
    reply_to: str | None = None


class BodyTooLarge(RequestError):
    status = 413
    code = "body_too_large"


class DuplicateRequest(RequestError):
    status = 409
    code = "uid_in_use"


class ModelNotFound(RequestError):
    """No upstream serves the request's model (UPSTREAMS_FILE)."""

    status = 404
    code = "model_not_found"

    @classmethod
    def of(cls, model: str) -> ModelNotFound:
        return cls(
            f"no upstream serves the model {model!r}; GET /openai/v1/models lists the "
            "models served here",
            param="model",
        )


class BrokerUnavailable(ChatqueueError):
    status = 503
    type = "service_unavailable"
    code = "broker_unavailable"


class BrokerBlocked(BrokerUnavailable):
    """RabbitMQ blocks publishing (a memory or disk alarm), or did not confirm a
    publish in time; asking again later is the fix."""

    code = "broker_blocked"


class UpstreamError(ChatqueueError):
    """The LLM server answered with an error, timed out, or broke its stream."""

    status = 502
    type = "upstream_error"
    code = "llm_error"


def error_object(
    message: str, type: str, code: str | int | None, param: str | None = None
) -> dict[str, Any]:
    """An OpenAI error object: ``{"error": {"message", "type", "code", "param"}}``."""
    return {"error": {"message": message, "type": type, "code": code, "param": param}}
