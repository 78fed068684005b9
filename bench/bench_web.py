"""The web front's figures (and the peer's), as an HTTP client sees them.

- :func:`sse_ttft` and :func:`two_steps_ttft`: one request at a time, the time
  to its first content token, read with the same plain HTTP client whatever
  serves it (the development LLM, chatqueue's drop-in, LiteLLM's proxy);
- :func:`sse_clients`: N clients at once, each ``POST /v1/chat/completions``
  then ``GET /v1/chat/response`` (asyncio, one connection each);
- :func:`openai_streams` and :func:`openai_requests`: N streams at once, or
  N non-streaming requests so many at a time, to any OpenAI-compatible
  ``/chat/completions``.

``python -m bench.bench_web`` runs only these rows of ``python -m bench``.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bench.tools import open_stream
from chatqueue_testing.harness import Event, SseParser, fetch, read_sse
from devllm.answers import reply_tokens


def expected(prompt: str, tokens: int) -> str:
    return "".join(reply_tokens([{"role": "user", "content": prompt}], tokens))


def chat_body(prompt: str, model: str, **fields: Any) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], **fields}
    return json.dumps(body).encode()


# --- one request at a time ------------------------------------------------------------------


def sse_ttft(
    url: str, prompt: str, model: str, want: str, headers: Mapping[str, str] | None = None
) -> float:
    """POST a streaming chat request to ``url``; the time to its first content token."""
    stream = read_sse(
        url,
        {"Content-Type": "application/json", **(headers or {})},
        method="POST",
        body=chat_body(prompt, model, stream=True),
    )
    if stream.status != 200 or stream.content != want:
        raise RuntimeError(f"{url}: {stream.status} {stream.content!r} {stream.body[:300]!r}")
    return stream.first_content_at - stream.opened


def two_steps_ttft(web: str, prompt: str, model: str, want: str) -> float:
    """``POST /v1/chat/completions`` then ``GET`` its SSE stream: the time from
    the POST to the first content token."""
    start = time.monotonic()
    status, _, body = fetch("POST", web + "/v1/chat/completions", chat_body(prompt, model))
    if status != 202:
        raise RuntimeError(f"submit: {status} {body[:300]!r}")
    stream = read_sse(web + "/v1/chat/response?uid=" + json.loads(body)["uid"])
    if stream.content != want:
        raise RuntimeError(f"POST + GET: {stream.status} {stream.content!r}")
    return stream.first_content_at - start


def interleaved(
    paths: Mapping[str, Callable[[str, str], float]], tokens: int, samples: int, warmup: int
) -> dict[str, list[float]]:
    """``samples`` sequential samples of each path (``path(prompt, want)``), their
    order rotated each round so that drift and caches favour none."""
    result: dict[str, list[float]] = {name: [] for name in paths}
    order = list(paths)
    for i in range(warmup + samples):
        order = order[1:] + order[:1]
        for name in order:
            prompt = f"ttft {i} {name}"
            value = paths[name](prompt, expected(prompt, tokens))
            if i >= warmup:
                result[name].append(value)
    return result


# --- many at once ---------------------------------------------------------------------------


@dataclass
class Client:
    """One HTTP client of a burst, and the times of what it saw."""

    prompt: str
    want: str
    uid: str = ""
    sent: float = math.nan
    accepted: float = math.nan  # the 202 came (submit, then stream)
    first_token: float = math.nan
    done: float = math.nan
    content: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def correct(self) -> bool:
        return not math.isnan(self.done) and "".join(self.content) == self.want

    @property
    def ttft(self) -> float:
        return self.first_token - self.sent

    @property
    def submit(self) -> float:
        return self.accepted - self.sent

    async def read_stream(self, lines: Any) -> None:
        parser = SseParser()
        async for raw in lines:
            item = parser.feed(raw)
            if not isinstance(item, Event):
                continue
            if item.data == "[DONE]":
                self.done = item.at
                return
            if content := item.content:
                if not self.content:
                    self.first_token = item.at
                self.content.append(content)


@dataclass
class BurstResult:
    clients: list[Client]
    wall: float

    @property
    def completed(self) -> int:
        return sum(c.correct for c in self.clients)

    @property
    def failed(self) -> int:
        return len(self.clients) - self.completed

    @property
    def ttfts(self) -> list[float]:
        return [c.ttft for c in self.clients if not math.isnan(c.first_token)]

    @property
    def submits(self) -> list[float]:
        return [c.submit for c in self.clients if not math.isnan(c.accepted)]

    def errors(self) -> list[str]:
        return [c.error for c in self.clients if c.error][:3]


def _clients(n: int, label: str, tokens: int) -> list[Client]:
    return [Client(f"{label} {i}", expected(f"{label} {i}", tokens)) for i in range(n)]


async def _gather(coroutines: list[Any], timeout: float) -> None:
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _run(clients: list[Client], make: Callable[[Client], Any], timeout: float) -> BurstResult:
    start = time.monotonic()
    asyncio.run(_gather([make(c) for c in clients], timeout))
    ends = [c.done for c in clients if not math.isnan(c.done)]
    return BurstResult(clients, (max(ends) if ends else time.monotonic()) - start)


def sse_clients(
    host: str, port: int, n: int, *, model: str, tokens: int, timeout: float
) -> BurstResult:
    """``n`` clients at once, each submits (``POST``, 202) then reads its SSE stream."""

    async def one(client: Client) -> None:
        try:
            client.sent = time.monotonic()
            status, lines, writer = await open_stream(
                host, port, "POST", "/v1/chat/completions", body=chat_body(client.prompt, model)
            )
            body = b"".join([line async for line in lines])
            writer.close()
            if status != 202:
                raise RuntimeError(f"submit: {status} {body[:200]!r}")
            client.accepted = time.monotonic()
            client.uid = json.loads(body)["uid"]
            status, lines, writer = await open_stream(
                host, port, "GET", f"/v1/chat/response?uid={client.uid}"
            )
            try:
                await client.read_stream(lines)
            finally:
                writer.close()
        except Exception as exc:
            client.error = f"{type(exc).__name__}: {exc}"

    return _run(_clients(n, "sse", tokens), one, timeout)


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible ``/chat/completions``: where, and the headers it needs."""

    host: str
    port: int
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)


def openai_streams(
    endpoint: Endpoint, n: int, *, model: str, tokens: int, timeout: float
) -> BurstResult:
    """``n`` streaming requests at once to an OpenAI-compatible ``path``."""

    async def one(client: Client) -> None:
        try:
            client.sent = time.monotonic()
            status, lines, writer = await open_stream(
                endpoint.host,
                endpoint.port,
                "POST",
                endpoint.path,
                body=chat_body(client.prompt, model, stream=True),
                headers=endpoint.headers,
            )
            try:
                if status != 200:
                    raise RuntimeError(f"status {status}")
                await client.read_stream(lines)
            finally:
                writer.close()
        except Exception as exc:
            client.error = f"{type(exc).__name__}: {exc}"

    return _run(_clients(n, "stream", tokens), one, timeout)


def openai_requests(
    endpoint: Endpoint, n: int, *, at_a_time: int, model: str, tokens: int, timeout: float
) -> BurstResult:
    """``n`` non-streaming requests to an OpenAI-compatible ``path``, ``at_a_time``
    in flight; ``done`` is when each whole answer came."""
    gate: asyncio.Semaphore | None = None

    async def one(client: Client) -> None:
        nonlocal gate
        gate = gate or asyncio.Semaphore(at_a_time)
        async with gate:
            try:
                client.sent = time.monotonic()
                status, lines, writer = await open_stream(
                    endpoint.host,
                    endpoint.port,
                    "POST",
                    endpoint.path,
                    body=chat_body(client.prompt, model, stream=False),
                    headers=endpoint.headers,
                )
                body = b"".join([line async for line in lines])
                writer.close()
                if status != 200:
                    raise RuntimeError(f"status {status}: {body[:200]!r}")
                content = json.loads(body)["choices"][0]["message"]["content"]
                client.first_token = client.done = time.monotonic()
                client.content.append(content)
            except Exception as exc:
                client.error = f"{type(exc).__name__}: {exc}"

    return _run(_clients(n, "short", tokens), one, timeout)


def submit_only(web: str, n: int, model: str) -> list[str]:
    """``n`` requests submitted (``POST``, 202) and not read: their uids."""
    uids = []
    for i in range(n):
        status, _, body = fetch("POST", web + "/v1/chat/completions", chat_body(f"q {i}", model))
        if status != 202:
            raise RuntimeError(f"submit: {status} {body[:300]!r}")
        uids.append(json.loads(body)["uid"])
    return uids


def read_answers(web: str, uids: list[str]) -> int:
    """Read the answers of ``uids`` with ``GET``; how many ended with ``[DONE]``."""
    done = 0
    for uid in uids:
        stream = read_sse(web + "/v1/chat/response?uid=" + uid)
        done += bool(stream.events) and stream.events[-1].data == "[DONE]"
    return done


if __name__ == "__main__":
    from bench.run import main

    sys.exit(main(["--only", "web", *sys.argv[1:]]))
