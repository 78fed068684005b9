"""Where the time to first token of one request goes, in the worker (row 1).

``python -m bench.hops [--samples N]`` starts the development LLM and the
Procfile's worker line (``LOG_LEVEL=info``, a namespace of the run's own on
the shared broker), sends N requests one at a time as row 1 does (the
client declares ``response_<uid>``, publishes, reads the first chunk), and
puts each request's times side by side:

- ``published``: the client's publish (its clock);
- ``task received``: Celery's ``Task ... received`` line, the task message
  in the worker's consumer, after the intake's transaction committed;
- ``LLM asked``: the development LLM's line for the request as it arrives
  (``--log-level debug``), matched by order: the requests go one at a time;
- ``first chunk``: the client's read of the first content chunk.

The log lines carry milliseconds, so each hop is known to about 1 ms; the
medians over N are what to compare. ``LLM asked`` to ``first chunk`` holds
the LLM's own time to its first token, the lane's publish and the broker's
delivery; the LLM alone is measured beside it (the openai SDK, as row 1).
"""

from __future__ import annotations

import argparse
import re
import time
import uuid
from datetime import datetime

import openai

from bench.bench_worker import AmqpClient, Reading, direct_ttft
from bench.run import FULL
from bench.tools import format_table, median, ms, p99, say
from chatqueue_testing.harness import (
    Process,
    delete_queues,
    environ,
    procfile_command,
    wait_for_consumer,
)
from config import load_settings
from devllm.testing import DevLLM

MODEL = FULL.ttft_model  # row 1's
WARMUP = 20
STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def stamp(line: str) -> float | None:
    """The wall-clock time a log line was written at, or None."""
    m = STAMP.search(line)
    if m is None:
        return None
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    run = f"hops-{uuid.uuid4().hex[:8]}"
    dev = DevLLM(log_level="debug").start()
    env = environ(
        RABBITMQ_QUEUE=f"{run}-input",
        RESPONSE_QUEUE_PREFIX=f"{run}-response_",
        CHATQUEUE_NAMESPACE=run,
        OPENAI_URL=dev.base_url,
        OPENAI_MODEL="bench",
        LOG_LEVEL="info",
    )
    settings = load_settings(env)
    worker = Process(
        [*procfile_command("worker"), "--hostname", f"{run}@%h"], env, "worker", detached=True
    )
    published: list[float] = []
    first: list[float] = []
    uids: list[str] = []
    direct: list[float] = []
    try:
        wait_for_consumer(settings.rabbitmq_url, settings.rabbitmq_queue, 60, worker)
        client = AmqpClient(settings.rabbitmq_url, settings, [worker])
        llm = openai.OpenAI(base_url=dev.base_url, api_key="bench")
        for n in range(WARMUP + args.samples):
            reading = Reading.new(f"hops {n}", 5)
            ttft = client.ttft(MODEL, reading, 10)
            wall = time.time() - time.monotonic()  # the client's clock to the logs'
            if n >= WARMUP:
                uids.append(reading.uid)
                published.append(reading.sent_at + wall)
                first.append(reading.sent_at + wall + ttft)
        for n in range(args.samples):
            direct.append(direct_ttft(llm, MODEL, Reading.new(f"direct {n}", 5)))
        client.close()
        time.sleep(0.5)
    finally:
        worker.stop()
        dev.stop()
        queues = [settings.rabbitmq_queue, settings.task_queue, settings.dead_letter_queue]
        delete_queues(settings.rabbitmq_url, queues, [settings.cancel_exchange])
    log = worker.output()
    worker.remove_log()
    received = {}
    for line in log.splitlines():
        if (m := re.search(r"stream_chat\[([^\]]+)\] received", line)) and (t := stamp(line)):
            received[m.group(1)] = t
    asked = [t for line in dev.output().splitlines() if "stream=True" in line if (t := stamp(line))]
    asked = asked[WARMUP : WARMUP + args.samples]
    hops: dict[str, list[float]] = {
        "published -> task received": [],
        "task received -> LLM asked": [],
        "LLM asked -> first chunk": [],
        "published -> first chunk": [],
    }
    for uid, sent, got, at in zip(uids, published, first, asked, strict=False):
        if uid not in received:
            continue
        hops["published -> task received"].append(received[uid] - sent)
        hops["task received -> LLM asked"].append(at - received[uid])
        hops["LLM asked -> first chunk"].append(got - at)
        hops["published -> first chunk"].append(got - sent)
    rows = [[name, ms(median(v)), ms(p99(v))] for name, v in hops.items()]
    rows.append(["the LLM alone (openai SDK)", ms(median(direct)), ms(p99(direct))])
    say(f"{run}: {len(hops['published -> first chunk'])} requests one at a time, {MODEL!r}")
    say(format_table(rows, ["hop", "median", "p99"]))


if __name__ == "__main__":
    main()
