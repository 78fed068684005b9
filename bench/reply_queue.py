"""What a web process's own reply queue costs the broker, beside direct reply-to.

The drop-in and the WebSocket have their answers sent back to the web process
that submitted them. Direct reply-to (``amq.rabbitmq.reply-to``) makes no
queue, but its replies go with the connection that consumes them: a broker
restart ends every such answer. A durable queue of the process,
``<ns>.replies.<token>``, survives the restart, and the web process reads it
again once it has reconnected. This measures the price of that queue.

``python -m bench.reply_queue [--messages N] [--rounds R]`` publishes N chunk-
sized persistent messages (as the worker does) from one connection, consumed
by another (``no_ack``, as the web front does), R rounds of each kind in turn,
and prints the broker's CPU (``beam.smp``) per 1,000 messages and the
messages a second, medians over the rounds. Kinds:

- ``direct reply-to``: the consumer's ``amq.rabbitmq.reply-to``;
- ``durable reply queue``: a durable classic queue with ``x-expires``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
from typing import Any

import amqp

from bench.tools import broker_pid, cpu_seconds, format_table, median

DIRECT = "amq.rabbitmq.reply-to"
URL_HOST = "localhost:5672"


def chunk(i: int) -> bytes:
    """About the size of one streamed token's chunk."""
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": f" token{i}"}, "finish_reason": None}],
        }
    ).encode()


def connect() -> amqp.Connection:
    connection = amqp.Connection(URL_HOST, userid="guest", password="guest")
    connection.connect()
    return connection


def one_round(kind: str, messages: int) -> tuple[float, float]:
    """Broker CPU seconds and wall seconds for ``messages`` replies of ``kind``."""
    reader, writer = connect(), connect()
    inbox = reader.channel()
    got = 0

    def on_message(_: Any) -> None:
        nonlocal got
        got += 1

    queue = DIRECT
    if kind == "durable reply queue":
        queue = f"bench.replies.{secrets.token_hex(8)}"
        inbox.queue_declare(queue, durable=True, auto_delete=False, arguments={"x-expires": 60000})
    tag = inbox.basic_consume(queue, no_ack=True, callback=on_message)
    # Direct reply-to: the name RabbitMQ gives this consumer is learnt by
    # publishing to it from the consuming channel's connection.
    out = writer.channel()
    if kind == "direct reply-to":
        queue = _direct_name(inbox)
    broker = broker_pid(f"amqp://{URL_HOST}/")
    assert broker is not None, f"no RabbitMQ listens at {URL_HOST} on this machine"
    bodies = [chunk(i) for i in range(messages)]
    started, cpu = time.monotonic(), cpu_seconds(broker)
    for i, body in enumerate(bodies):
        out.basic_publish(
            amqp.Message(body, delivery_mode=2, correlation_id="u", headers={"seq": i}),
            routing_key=queue,
        )
    while got < messages:
        reader.drain_events(timeout=10)
    used, wall = cpu_seconds(broker) - cpu, time.monotonic() - started
    inbox.basic_cancel(tag)
    if kind == "durable reply queue":
        inbox.queue_delete(queue)
    reader.close()
    writer.close()
    return used, wall


def _direct_name(inbox: Any) -> str:
    """The ``amq.rabbitmq.reply-to.<token>`` name of ``inbox``'s consumer:
    a message sent from it to a queue carries that name in ``reply_to``."""
    sink = inbox.queue_declare("", exclusive=True).queue
    inbox.basic_publish(amqp.Message(b"", reply_to=DIRECT), routing_key=sink)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        message = inbox.basic_get(sink, no_ack=True)
        if message is not None:
            name: str = message.properties["reply_to"]
            return name
    raise RuntimeError("the probe message did not come")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    kinds = ["direct reply-to", "durable reply queue"]
    figures: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:  # A, B, A, B: the machine's drift falls on both
            figures[kind].append(one_round(kind, args.messages))
    rows = []
    for kind in kinds:
        cpu = median([c for c, _ in figures[kind]]) / args.messages * 1000
        rate = median([args.messages / w for _, w in figures[kind]])
        rows.append([kind, f"{cpu * 1000:.1f} ms", f"{rate:,.0f}"])
    print(
        f"{args.messages:,} persistent chunk-sized replies, one publisher, one no_ack "
        f"consumer; medians of {args.rounds} rounds each, in turn"
    )
    print(format_table(rows, ["reply by", "broker CPU / 1,000 messages", "messages / s"]))


if __name__ == "__main__":
    main()
