"""OpenAI error objects, as the real API shapes them.

``{"error": {"message", "type", "code", "param"}}``; :func:`error_object`
fills ``type`` and ``code`` from the HTTP status unless told otherwise, so the
openai SDK raises the same exception class as against the real service
(400 ``BadRequestError``, 401 ``AuthenticationError``, 403
``PermissionDeniedError``, 404 ``NotFoundError``, 409 ``ConflictError``,
422 ``UnprocessableEntityError``, 429 ``RateLimitError``, 5xx
``InternalServerError``).
"""

from __future__ import annotations

from typing import Any

# status: (type, code, message)
_DEFAULTS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", "invalid_request", "The request is invalid."),
    401: ("authentication_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", "permission_denied", "You are not allowed to use this model."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    409: ("invalid_request_error", "conflict", "The request conflicts with another one."),
    422: ("invalid_request_error", "unprocessable_entity", "The request cannot be processed."),
    429: ("rate_limit_error", "rate_limit_exceeded", "Rate limit reached, retry later."),
    500: ("server_error", "internal_error", "The server had an error processing your request."),
    502: ("server_error", "bad_gateway", "Bad gateway."),
    503: ("server_error", "service_unavailable", "The server is overloaded, retry later."),
    504: ("server_error", "gateway_timeout", "The server timed out."),
}


def error_object(
    status: int,
    message: str | None = None,
    *,
    code: str | None = None,
    param: str | None = None,
    type: str | None = None,
) -> dict[str, Any]:
    """The body of an error answer with HTTP ``status``."""
    default_type, default_code, default_message = _DEFAULTS.get(
        status,
        ("server_error", "server_error", f"Error {status}.")
        if status >= 500
        else ("invalid_request_error", None, f"Error {status}."),
    )
    return {
        "error": {
            "message": message or default_message,
            "type": type or default_type,
            "code": code or default_code,
            "param": param,
        }
    }
