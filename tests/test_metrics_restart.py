"""Metrics across a broker restart, on a RabbitMQ node of the tests' own
(tests/conftest.py): the exchange of the snapshots is not durable, and every
process finds it again, so the counts go on."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from chatqueue_testing.rabbitnode import RabbitNode
from tests.support import (
    PrivateStack,
    about,
    chat,
    processes,
    scrape,
    stream,
    submit,
    value,
    wait_until,
)

# The test restarts a private RabbitMQ node.
pytestmark = pytest.mark.slow


def test_counts_go_on_after_a_broker_restart(
    rabbit_node: RabbitNode,
    private_stack: Callable[..., PrivateStack],
) -> None:
    stack = private_stack("private-metrics", METRICS_INTERVAL="0.3")
    web = stack.web

    def accepted() -> float:
        return value(scrape(web), "chatqueue_requests_accepted_total")

    def answered() -> float:
        return value(scrape(web), "chatqueue_requests_total", outcome="answered", code="")

    assert stream(web, submit(web, chat("Count.", model="devllm"))).events[-1].data == "[DONE]"
    wait_until(lambda: accepted() == 1, 30, about("one request counted", web))

    rabbit_node.restart_app()

    wait_until(
        lambda: processes(scrape(web)) == {"worker": 1, "web": 1}, 90, about("both report", web)
    )
    assert (
        stream(web, submit(web, chat("Count.", model="devllm")), timeout=60).events[-1].data
        == "[DONE]"
    )
    wait_until(lambda: accepted() == 2, 60, about("two requests accepted", web))
    # The worker counts an answer after its [DONE] is out, and reports it in
    # its next snapshot: the client can read the [DONE] first.
    wait_until(lambda: answered() == 2, 10, about("two answers counted", web))
    assert accepted() == 2
