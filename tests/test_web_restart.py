"""A broker restart under the web front, on a RabbitMQ node of the tests' own
(tests/conftest.py): SSE streams being read pause and go on over a new
connection to ``[DONE]``, without an error, and the same web process serves
new requests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from chatqueue_testing.rabbitnode import RabbitNode
from tests.support import (
    Broker,
    EventStream,
    PrivateStack,
    chat,
    expected,
    read_in_background,
    stream,
    submit,
    wait_until,
)

# The test restarts a private RabbitMQ node.
pytestmark = pytest.mark.slow

TOKENS = 40
STREAMS = 5


def answer_of(events: EventStream) -> tuple[str, list[str | None]]:
    """The content after the last restart (a worker that restarted the answer
    began again at id 0: drop what came before), and the ids."""
    ids = [e.id for e in events.events]
    start = len(ids) - 1 - ids[::-1].index("0")
    return "".join(e.content for e in events.events[start:]), ids[start:]


def test_sse_streams_go_on_across_a_broker_restart(
    rabbit_node: RabbitNode,
    private_stack: Callable[..., PrivateStack],
) -> None:
    stack = private_stack("web-restart", SSE_KEEPALIVE="1")
    web, env = stack.web, stack.env
    prompts = [f"stream {n} across a broker restart" for n in range(STREAMS)]
    uids = [submit(web, chat(p, model=f"m;delay=0.15;tokens={TOKENS}")) for p in prompts]
    readers = [read_in_background(web, uid) for uid in uids]
    for started, _, _ in readers:
        assert started.wait(30), "a stream never started"

    rabbit_node.restart_app()

    for prompt, (_, first, reader) in zip(prompts, readers, strict=True):
        reader.join(90)
        assert first, "a reader never ended"
        sse = first[0]
        assert sse.events[-1].data == "[DONE]", [e.data for e in sse.events[-3:]]
        assert not [e for e in sse.events if '"error"' in e.data]
        content, ids = answer_of(sse)
        assert content == expected(prompt, TOKENS)
        assert ids == [str(n) for n in range(len(ids))], ids
    log = web.output()
    assert "reading again after" in log
    # An expected connection loss is one line: no traceback (kombu's
    # ConsumerMixin logged one for each of its consumers).
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]

    # The same web process goes on: submitting and reading work.
    uid = submit(web, chat("after the restart"))
    assert stream(web, uid, timeout=60).content == expected("after the restart")
    # Every answer was delivered: no response queue is left.
    broker = Broker(rabbit_node.url, env)
    try:
        wait_until(
            lambda: not any(broker.queue_exists(broker.response_queue(u)) for u in [*uids, uid]),
            10,
            "a delivered answer's queue was left",
            interval=0.5,
        )
    finally:
        broker.close()
