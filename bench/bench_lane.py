"""The worker's CPU per streamed message in a lane alone (app/broker.py).

``python -m bench.bench_lane [--streams N] [--messages M] [--gap S] [--run R]``
streams M messages from each of N greenlets through one :class:`Lane`, as a
worker's tasks do (each through a :class:`Sender`, settled at its end), into a
queue of the run's own on the shared broker (deleted at the end). A stream
waits up to ``2 * gap`` seconds (random) before every R-th message, and sends
the others at once, as tokens that an LLM sends together. It prints the CPU
of this process per message.

To compare two versions of the lane, run it from two checkouts in turn, with
``PYTHONPATH`` set to each (the editable install would otherwise import this
checkout's ``app``).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402 - after the monkey-patching, as in the worker
import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import gevent  # noqa: E402
from kombu import Connection  # noqa: E402

from app.broker import Lane, Sender  # noqa: E402
from bench.tools import cpu_seconds  # noqa: E402
from config import load_settings  # noqa: E402

BODY = '{"choices":[{"index":0,"delta":{"content":" token"}}],"seq":1}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--messages", type=int, default=40)
    parser.add_argument("--gap", type=float, default=0.01)
    parser.add_argument("--run", type=int, default=1)
    args = parser.parse_args()
    url = load_settings().rabbitmq_url
    queue = f"bench-lane-{uuid.uuid4().hex[:8]}"
    with Connection(url, heartbeat=0) as admin:
        admin.default_channel.queue_declare(queue, auto_delete=False)
        lane = Lane(Connection(url, heartbeat=0))

        def stream() -> None:
            send = Sender(lane)
            for n in range(args.messages):
                if n % args.run == 0:
                    gevent.sleep(args.gap * random.random() * 2)
                send(BODY, queue, {"content_type": "application/json"})
            send.settle()

        began_cpu, began = cpu_seconds(os.getpid()), time.monotonic()
        gevent.joinall([gevent.spawn(stream) for _ in range(args.streams)])
        cpu, wall = cpu_seconds(os.getpid()) - began_cpu, time.monotonic() - began
        total = args.streams * args.messages
        deadline = time.monotonic() + 10
        while (queued := _depth(admin, queue)) < total and time.monotonic() < deadline:
            time.sleep(0.05)
        admin.default_channel.queue_delete(queue)
    print(
        f"{args.streams} streams x {args.messages} messages (a wait before every "
        f"{args.run}): {cpu * 1e6 / total:.1f} us of CPU a message, {wall:.2f} s; "
        f"{queued}/{total} on the queue"
    )


def _depth(connection: Connection, queue: str) -> int:
    return int(connection.default_channel.queue_declare(queue, passive=True).message_count)


if __name__ == "__main__":
    main()
