"""What a response queue costs on a three-node cluster, classic beside quorum.

``python -m bench.bench_cluster [--queues N] [--messages M]`` starts a private
cluster (:class:`chatqueue_testing.rabbitnode.RabbitCluster`, stopped and removed at the
end), and for each queue type makes N durable queues with ``x-expires`` on
node 1, as the intake declares response queues (over 8 channels, waiting for
the last of each), publishes M persistent messages to each through node 2, as
a worker's lane does (no confirms; then one confirmed message per queue, so
all are in), consumes them all from node 3 as the web front does, and
deletes the queues. It prints the
wall time of each step and the CPU the three nodes used, per queue and per
message. The shared broker is not touched.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import amqp

from bench.tools import CpuMeter, format_table
from chatqueue_testing.rabbitnode import RabbitCluster

CHANNELS = 8


def _connect(url: str) -> amqp.Connection:
    parts = urlsplit(url)
    connection = amqp.Connection(
        f"{parts.hostname}:{parts.port}", userid=parts.username, password=parts.password
    )
    connection.connect()
    return connection


def measure(cluster: RabbitCluster, queue_type: str, queues: int, messages: int) -> list[str]:
    """One row: wall time of each step; the nodes' CPU a queue and a message."""
    names = [f"bench-{queue_type}-{uuid.uuid4().hex[:12]}" for _ in range(queues)]
    arguments: dict[str, object] = {"x-expires": 600_000}
    if queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
    meter = CpuMeter({"nodes": [n.beam_pid for n in cluster.nodes]})
    declarer, publisher, reader = (_connect(u) for u in cluster.urls)
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def step(name: str) -> None:
        cpu[name] = meter.stop()["nodes"]
        times[name] = meter.wall
        meter.start()

    def over_channels(call: Callable[..., Any]) -> None:
        # As the intake declares: spread over channels, unanswered but the
        # last of each channel, whose answer stands for the channel's share.
        channels = [declarer.channel() for _ in range(CHANNELS)]
        shares = [names[i::CHANNELS] for i in range(CHANNELS)]
        for channel, share in zip(channels, shares, strict=True):
            for name in share[:-1]:
                call(channel, name, nowait=True)
        for channel, share in zip(channels, shares, strict=True):
            if share:
                call(channel, share[-1], nowait=False)

    meter.start()
    over_channels(
        lambda ch, name, nowait: ch.queue_declare(
            name, durable=True, auto_delete=False, arguments=arguments, nowait=nowait
        )
    )
    step("declare")

    out = publisher.channel()
    for m in range(messages):
        for name in names:
            out.basic_publish(amqp.Message(b'{"chunk": %d}' % m, delivery_mode=2), "", name)
    out.confirm_select()
    for name in names:  # confirmed: once the last is, all are in
        out.basic_publish(amqp.Message(b"[DONE]", delivery_mode=2), "", name)
    step("publish")

    inbox = reader.channel()
    inbox.basic_qos(0, 1000, False)
    left = {name: messages + 1 for name in names}

    def on_message(message: amqp.Message) -> None:
        queue = message.delivery_info["routing_key"]
        left[queue] -= 1
        if not left[queue]:
            del left[queue]

    for name in names:
        inbox.basic_consume(name, no_ack=True, callback=on_message)
    deadline = time.monotonic() + 120
    while left and time.monotonic() < deadline:
        reader.drain_events(timeout=5)
    assert not left, f"{len(left)} queues not read in full"
    step("read")
    reader.close()  # before the deletes, which would cancel its consumers

    over_channels(lambda ch, name, nowait: ch.queue_delete(name, nowait=nowait))
    step("delete")
    for connection in (declarer, publisher):
        connection.close()

    per_queue = (cpu["declare"] + cpu["delete"]) / queues
    per_message = (cpu["publish"] + cpu["read"]) / (queues * (messages + 1))
    return [
        queue_type,
        *(f"{times[s]:.2f} s" for s in ("declare", "publish", "read", "delete")),
        f"{per_queue * 1000:.1f} ms",
        f"{per_message * 1000:.2f} ms",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queues", type=int, default=200)
    parser.add_argument("--messages", type=int, default=20)
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="cq-bench-cluster-"))
    started = time.monotonic()
    with RabbitCluster(directory, name=f"bench{uuid.uuid4().hex[:6]}") as cluster:
        print(f"cluster up in {time.monotonic() - started:.1f} s: {cluster.failover_url}")
        rows = [measure(cluster, t, args.queues, args.messages) for t in ("classic", "quorum")]
    print(
        f"\n{args.queues} response queues declared on node 1, {args.messages} messages each "
        "published through node 2, consumed from node 3, deleted; CPU of the three nodes:\n"
    )
    header = ["type", "declare", "publish", "read", "delete", "CPU a queue", "CPU a message"]
    print(format_table(rows, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
