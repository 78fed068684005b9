"""The Chat Completions protocol: the request the server accepts, the objects it answers.

:func:`parse_request` validates a request body (raising :class:`InvalidRequest`,
which the server answers with a 400 OpenAI error object); :class:`Completion`
renders one answer as a ``chat.completion`` object or as the
``chat.completion.chunk`` SSE frames of a stream.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SYSTEM_FINGERPRINT = "fp_devllm"
DONE = b"data: [DONE]\n\n"
MALFORMED = b"data: {this is not json\n\n"
# What vLLM and others send when generation fails after the answer began.
STREAMED_ERROR = {
    "error": {
        "message": "devllm: the model failed mid-answer (fault=error)",
        "type": "server_error",
        "code": "model_error",
        "param": None,
    }
}


class InvalidRequest(ValueError):
    """The request body is not a valid Chat Completions request."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ChatRequest:
    """The fields of a Chat Completions request that the development LLM uses."""

    model: str
    messages: list[Mapping[str, Any]]
    stream: bool = False
    max_tokens: int | None = None
    include_usage: bool = False


def _optional_positive_int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(
            f"Invalid '{key}': expected an integer of at least 1, got {value!r}.",
            param=key,
            code="invalid_value",
        )
    return value


def parse_request(body: Any) -> ChatRequest:
    """Validate a decoded JSON body; raise :class:`InvalidRequest` saying what to fix."""
    if not isinstance(body, dict):
        raise InvalidRequest(
            "The request body must be a JSON object with 'model' and 'messages'.",
            code="invalid_json",
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            "Missing or invalid 'model': expected a non-empty string such as 'gpt-4o'.",
            param="model",
            code="missing_required_parameter" if model is None else "invalid_type",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(
            "Missing or invalid 'messages': expected a non-empty list of messages.",
            param="messages",
            code="missing_required_parameter" if messages is None else "invalid_value",
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"Invalid 'messages[{index}]': expected an object with a string 'role'.",
                param=f"messages[{index}]",
                code="invalid_type",
            )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(
            f"Invalid 'stream': expected a boolean, got {stream!r}.",
            param="stream",
            code="invalid_type",
        )
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest(
            "Invalid 'stream_options': expected an object.",
            param="stream_options",
            code="invalid_type",
        )
    max_tokens = _optional_positive_int(body, "max_tokens")
    max_completion_tokens = _optional_positive_int(body, "max_completion_tokens")
    return ChatRequest(
        model=model,
        messages=messages,
        stream=bool(stream),
        max_tokens=max_completion_tokens if max_completion_tokens is not None else max_tokens,
        include_usage=bool(options and options.get("include_usage")),
    )


@dataclass(frozen=True)
class Completion:
    """One answer: its identity, its tokens (already cut at ``max_tokens``) and its usage."""

    id: str
    created: int
    model: str
    tokens: list[str]
    finish_reason: str
    prompt_tokens: int

    @classmethod
    def new(
        cls, model: str, tokens: list[str], max_tokens: int | None, prompt_tokens: int
    ) -> Completion:
        cut = max_tokens is not None and len(tokens) > max_tokens
        return cls(
            id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
            created=int(time.time()),
            model=model,
            tokens=tokens[:max_tokens] if cut else tokens,
            finish_reason="length" if cut else "stop",
            prompt_tokens=prompt_tokens,
        )

    @property
    def content(self) -> str:
        return "".join(self.tokens)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.tokens),
            "total_tokens": self.prompt_tokens + len(self.tokens),
        }

    def to_object(self) -> dict[str, Any]:
        """The ``chat.completion`` object of a non-streaming answer."""
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": self.usage(),
        }

    def frames(self) -> ChunkFrames:
        return ChunkFrames(self)


class ChunkFrames:
    """The SSE frames of a stream; the common head is encoded once, tokens are cheap."""

    def __init__(self, completion: Completion) -> None:
        self._completion = completion
        head = json.dumps(
            {
                "id": completion.id,
                "object": "chat.completion.chunk",
                "created": completion.created,
                "model": completion.model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
            },
            separators=(",", ":"),
        )
        self._head = "data: " + head[:-1]  # without the closing brace

    def _choice(self, delta: str, finish_reason: str | None) -> bytes:
        finish = "null" if finish_reason is None else json.dumps(finish_reason)
        return (
            f'{self._head},"choices":[{{"index":0,"delta":{delta},'
            f'"logprobs":null,"finish_reason":{finish}}}]}}\n\n'
        ).encode()

    def role(self) -> bytes:
        return self._choice('{"role":"assistant","content":""}', None)

    def token(self, token: str) -> bytes:
        return self._choice('{"content":' + json.dumps(token) + "}", None)

    def finish(self) -> bytes:
        return self._choice("{}", self._completion.finish_reason)

    def usage(self) -> bytes:
        usage = json.dumps(self._completion.usage(), separators=(",", ":"))
        return f'{self._head},"choices":[],"usage":{usage}}}\n\n'.encode()
