"""The worker's figures, as an AMQP client sees them (pika on both sides).

- :func:`measure_ttft`: the same request sent through chatqueue and directly
  to the development LLM with the openai SDK, samples interleaved, sequential;
- :meth:`AmqpClient.burst`: many requests published at once, each answered on
  its ``response_<uid>`` (declared by the client first, as the README tells
  clients) or, with ``reply_to``, on one exclusive queue the client declared.

``python -m bench.bench_worker`` runs only these rows of ``python -m bench``.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import openai
import pika

from app.broker import response_queue_arguments
from chatqueue_testing.harness import Process
from config import Settings
from devllm.answers import reply_tokens


@dataclass
class Reading:
    """One request and what came back for it."""

    uid: str
    prompt: str
    expected: str
    sent_at: float = math.nan
    first_token_at: float | None = None
    done_at: float | None = None
    parts: list[str] = field(default_factory=list)
    content_chunks: int = 0
    messages: int = 0
    next_seq: int = 0
    out_of_order: int = 0
    errors: list[str] = field(default_factory=list)

    @classmethod
    def new(cls, prompt: str, tokens: int) -> Reading:
        messages = [{"role": "user", "content": prompt}]
        return cls(str(uuid.uuid4()), prompt, "".join(reply_tokens(messages, tokens)))

    def request(self, model: str) -> bytes:
        body = {
            "uid": self.uid,
            "model": model,
            "messages": [{"role": "user", "content": self.prompt}],
        }
        return json.dumps(body).encode()

    def on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        now = time.monotonic()
        headers = properties.headers or {}
        seq = headers.get("seq")
        if headers.get("restart") and seq == 0 and self.messages:
            self.parts.clear()
            self.next_seq = 0
        self.messages += 1
        if seq != self.next_seq:
            self.out_of_order += 1
        self.next_seq = (seq if isinstance(seq, int) else self.next_seq) + 1
        if body == b"[DONE]":
            self.done_at = now
            return
        if properties.type == "error":
            self.errors.append(body.decode(errors="replace"))
            return
        if properties.type != "chunk":
            self.errors.append(f"unexpected message type {properties.type!r}")
            return
        choices = json.loads(body).get("choices") or []
        content = choices[0].get("delta", {}).get("content") if choices else None
        if content:
            self.parts.append(content)
            self.content_chunks += 1
            if self.first_token_at is None:
                self.first_token_at = now

    @property
    def complete(self) -> bool:
        return self.done_at is not None

    @property
    def correct(self) -> bool:
        return (
            self.complete
            and not self.errors
            and not self.out_of_order
            and "".join(self.parts) == self.expected
        )

    @property
    def ttft(self) -> float:
        return math.nan if self.first_token_at is None else self.first_token_at - self.sent_at


@dataclass
class Burst:
    """What came back from requests published at once."""

    readings: list[Reading]
    wall: float  # first publish to last [DONE]
    publish_time: float

    @property
    def completed(self) -> int:
        return sum(r.correct for r in self.readings)

    @property
    def failed(self) -> int:
        return len(self.readings) - self.completed

    @property
    def messages(self) -> int:
        return sum(r.messages for r in self.readings)

    @property
    def ttfts(self) -> list[float]:
        return [r.ttft for r in self.readings if r.first_token_at is not None]

    def example_failures(self) -> list[str]:
        return [
            f"uid={r.uid}: done={r.complete} messages={r.messages} out_of_order={r.out_of_order} "
            f"errors={r.errors[:1]} content={''.join(r.parts)[:60]!r}"
            for r in self.readings
            if not r.correct
        ][:3]


class AmqpClient:
    """A pika client of chatqueue: declares response queues, consumes, publishes."""

    def __init__(self, url: str, settings: Settings, workers: Sequence[Process]) -> None:
        self.settings = settings
        self.workers = workers
        self.queue_arguments = response_queue_arguments(settings)
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def listen(self, channel: Any, reading: Reading) -> str:
        """Declare the response queue of ``reading`` as the worker does, and consume it."""
        queue = self.settings.response_queue(reading.uid)
        channel.queue_declare(queue, durable=True, arguments=self.queue_arguments)
        tag: str = channel.basic_consume(queue, reading.on_message, auto_ack=True)
        return tag

    def publish(
        self, channel: Any, reading: Reading, model: str, reply_to: str | None = None
    ) -> None:
        body = reading.request(model)
        properties = pika.BasicProperties(reply_to=reply_to) if reply_to else None
        reading.sent_at = time.monotonic()
        channel.basic_publish("", self.settings.rabbitmq_queue, body, properties)

    def wait(self, done: Callable[[], bool], timeout: float) -> bool:
        """Process deliveries until ``done()`` or ``timeout``; the workers must stay up."""
        deadline = time.monotonic() + timeout
        checked = time.monotonic()
        while not done():
            now = time.monotonic()
            if now > deadline:
                return False
            if now - checked > 1:
                for worker in self.workers:
                    worker.check_alive()
                checked = now
            self.connection.process_data_events(time_limit=0.05)
        return True

    def forget(self, uids: Sequence[str]) -> None:
        """Delete the response queues of ``uids``."""
        for uid in uids:
            self.channel.queue_delete(self.settings.response_queue(uid))

    def ttft(self, model: str, reading: Reading, timeout: float) -> float:
        """Time from the publish to the first content chunk on the response queue."""
        tag = self.listen(self.channel, reading)
        self.publish(self.channel, reading, model)
        finished = self.wait(lambda: reading.complete, timeout)
        self.channel.basic_cancel(tag)
        self.forget([reading.uid])
        if not finished or not reading.correct:
            raise RuntimeError(
                f"uid={reading.uid}: chatqueue answered {''.join(reading.parts)!r} (done "
                f"{reading.complete}, errors {reading.errors}), not {reading.expected!r}"
            )
        return reading.ttft

    def burst(
        self,
        readings: list[Reading],
        model: str,
        timeout: float,
        *,
        reply_to: bool = False,
        before_publish: Callable[[], object] = lambda: None,
        before_forget: Callable[[], object] = lambda: None,
    ) -> Burst:
        """Publish ``readings`` at once and read every answer on this connection:
        each on its ``response_<uid>``, or with ``reply_to`` all on one exclusive
        queue of this client's (told apart by ``correlation_id``).
        ``before_publish`` runs once the client's queues are there, ``before_forget``
        once all are answered, before the queues go."""
        channel = self.connection.channel()
        channel.basic_qos(prefetch_count=2000)
        reply_queue: str | None = None
        if reply_to:
            by_uid = {r.uid: r for r in readings}

            def dispatch(ch: Any, method: Any, properties: Any, body: bytes) -> None:
                reading = by_uid.get(properties.correlation_id or "")
                if reading is not None:
                    reading.on_message(ch, method, properties, body)

            reply_queue = channel.queue_declare("", exclusive=True).method.queue
            channel.basic_consume(reply_queue, dispatch, auto_ack=True)
        else:
            for reading in readings:
                self.listen(channel, reading)
        before_publish()
        start = time.monotonic()
        for reading in readings:
            self.publish(channel, reading, model, reply_queue)
        published = time.monotonic() - start
        left = set(range(len(readings)))

        def all_done() -> bool:
            left.difference_update([i for i in left if readings[i].complete])
            return not left

        self.wait(all_done, timeout)
        ends = [r.done_at for r in readings if r.done_at is not None]
        wall = (max(ends) if ends else time.monotonic()) - start
        before_forget()
        channel.close()
        if not reply_to:
            self.forget([r.uid for r in readings])
        return Burst(readings, wall, published)


@dataclass
class TtftPairs:
    direct: list[float] = field(default_factory=list)
    chatqueue: list[float] = field(default_factory=list)

    @property
    def added(self) -> list[float]:
        return [c - d for c, d in zip(self.chatqueue, self.direct, strict=True)]


def direct_ttft(llm: openai.OpenAI, model: str, reading: Reading) -> float:
    """Time to the first content chunk of a stream straight from the LLM."""
    messages: Any = [{"role": "user", "content": reading.prompt}]
    parts: list[str] = []
    first = math.nan
    start = time.monotonic()
    with llm.chat.completions.create(model=model, messages=messages, stream=True) as chunks:
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                if not parts:
                    first = time.monotonic() - start
                parts.append(chunk.choices[0].delta.content)
    if "".join(parts) != reading.expected:
        raise RuntimeError(f"direct answer {''.join(parts)!r} != {reading.expected!r}")
    return first


def measure_ttft(
    client: AmqpClient, llm: openai.OpenAI, *, model: str, tokens: int, samples: int, warmup: int
) -> TtftPairs:
    """Sequential pairs of samples, the first ``warmup`` pairs dropped."""
    result = TtftPairs()
    for i in range(warmup + samples):
        pair: dict[str, float] = {}
        # Alternate which goes first, so that drift and caches favour neither.
        for path in ("direct", "chatqueue") if i % 2 == 0 else ("chatqueue", "direct"):
            reading = Reading.new(f"ttft {i} {path}", tokens)
            if path == "direct":
                pair[path] = direct_ttft(llm, model, reading)
            else:
                pair[path] = client.ttft(model, reading, 60)
        if i >= warmup:
            result.direct.append(pair["direct"])
            result.chatqueue.append(pair["chatqueue"])
    return result


if __name__ == "__main__":
    from bench.run import main

    sys.exit(main(["--only", "worker", *sys.argv[1:]]))
