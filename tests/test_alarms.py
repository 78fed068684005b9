"""A broker resource alarm (memory or disk) on a RabbitMQ node of the tests' own
(tests/conftest.py): RabbitMQ blocks publishing connections, and the web front
answers its submissions 503 with ``Retry-After`` at once instead of hanging;
the worker waits it out, losing nothing; when the alarm clears, everything
goes on."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from chatqueue_testing.rabbitnode import RabbitNode
from tests.support import (
    EventStream,
    PrivateStack,
    Web,
    about,
    chat,
    connections_of,
    error_of,
    expected,
    fetch,
    new_uid,
    stream,
    submit,
    wait_until,
)

# Each test raises a resource alarm on a private RabbitMQ node.
pytestmark = pytest.mark.slow

# Seconds a refused submission may take.
PROMPT_REFUSAL = 3.0


def refused(web: Web, path: str, body: dict[str, Any]) -> None:
    """``POST path`` is 503, with ``Retry-After``, within PROMPT_REFUSAL seconds."""
    started = time.monotonic()
    status, headers, raw = fetch("POST", web.url + path, body, timeout=60)
    took = time.monotonic() - started
    assert status == 503, raw
    assert error_of(raw)["code"] == "broker_blocked", raw
    assert int(headers["Retry-After"]) > 0
    assert took < PROMPT_REFUSAL, f"{path} took {took:.1f} s to refuse"


@pytest.mark.parametrize("alarm", ["memory", "disk"])
def test_an_alarm_is_503_with_retry_after_and_loses_nothing(
    *,
    alarm: str,
    rabbit_node: RabbitNode,
    private_stack: Callable[..., PrivateStack],
) -> None:
    raise_alarm: Callable[[], None] = getattr(rabbit_node, f"set_{alarm}_alarm")
    clear_alarm: Callable[[], None] = getattr(rabbit_node, f"clear_{alarm}_alarm")
    stack = private_stack(f"alarm-{alarm}")
    worker, web = stack.worker, stack.web
    before = submit(web, chat("before the alarm"))
    assert stream(web, before).content == expected("before the alarm")
    across = submit(web, chat("across the alarm", model="m;delay=0.2;tokens=30"))
    streaming = threading.Event()

    def seen_three(sse: EventStream) -> bool:
        if len(sse.events) >= 3:
            streaming.set()
        return False

    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(stream, web, across, timeout=120, until=seen_three)
        assert streaming.wait(30), "the answer never streamed"

        raise_alarm()
        try:
            refused(web, "/v1/chat/completions", chat("fresh uid"))
            refused(web, "/v1/chat/completions", chat("chosen uid", uid=f"mine-{new_uid()}"))
            drop_in = {**chat("drop-in"), "model": "devllm", "stream": False}
            refused(web, "/openai/v1/chat/completions", drop_in)
            # The worker sits through the alarm: RabbitMQ blocks its connection
            # as it publishes the answer's next message...
            wait_until(
                lambda: ["blocked"] in connections_of(rabbit_node, worker.pid, "state"),
                30,
                about("the worker's connection was never blocked", worker),
                interval=0.2,
            )
        finally:
            clear_alarm()

        # ...and the answer that was streaming ends whole.
        assert reading.result().content == expected("across the alarm", 30)

    def accepted() -> bytes | None:
        status, _, raw = fetch("POST", web.url + "/v1/chat/completions", chat("after"))
        return raw if status == 202 else None

    raw = wait_until(accepted, 10, "submissions are still refused", interval=0.5)
    assert stream(web, json.loads(raw)["uid"]).content == expected("after")
    assert worker.alive, worker.output()[-3000:]
