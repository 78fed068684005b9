"""Drop-in streams across a broker restart: how many come whole, and how many
times the LLM was asked.

``python -m bench.dropin_restart [--streams 200] [--workers 2]`` runs the
Procfile's worker line (``--workers`` processes) and web line
(``WEB_CONCURRENCY=2``) against the development LLM and a RabbitMQ node of its
own (``chatqueue_testing/rabbitnode.py``: the shared broker is never restarted), opens
``--streams`` OpenAI drop-in streams at once with the real openai SDK
(``AsyncOpenAI``, ``stream=True``), restarts the broker (``stop_app``,
``start_app``) once every stream has begun, and reads them all to their end.

It prints how many streams got their whole text, how many ended with an
error (by code), how many times the LLM was asked beyond once a stream, and
from the workers' logs how many streams went on in their worker, how many
task messages that came back to the other worker followed them there, and
how many were answered again from the start (the drop-in stream then ends
with ``answer_restarted``).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import openai

from bench.bench_web import expected
from bench.tools import format_table, say
from chatqueue_testing.harness import (
    Process,
    environ,
    free_port,
    procfile_command,
    wait_for_consumer,
    wait_for_http,
)
from chatqueue_testing.rabbitnode import RabbitNode
from devllm.testing import DevLLM

TOKENS = 60
TOKEN_DELAY = 0.25  # a 15 s answer


@dataclass
class Stream:
    prompt: str
    text: str = ""
    chunks: int = 0
    error: str = ""


async def read(client: openai.AsyncOpenAI, stream: Stream, model: str) -> None:
    try:
        chunks = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": stream.prompt}],
            stream=True,
            timeout=180,
        )
        async for chunk in chunks:
            stream.chunks += 1
            if chunk.choices:
                stream.text += chunk.choices[0].delta.content or ""
    except openai.APIError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        stream.error = str(body.get("code") or type(exc).__name__)


async def run(url: str, streams: list[Stream], model: str, node: RabbitNode) -> float:
    """Read every stream; restart the broker once each has begun. The seconds
    the restart took."""
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
    readers = [asyncio.create_task(read(client, s, model)) for s in streams]
    deadline = time.monotonic() + 60
    while not all(s.chunks >= 3 or s.error for s in streams):
        if time.monotonic() > deadline:
            raise RuntimeError("the streams never all began")
        await asyncio.sleep(0.2)
    began = time.monotonic()
    await asyncio.to_thread(node.restart_app)
    restart = time.monotonic() - began
    await asyncio.gather(*readers)
    await client.close()
    return restart


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:6]
    name = f"dropin-{tag}"
    node = RabbitNode("dropin").start()
    dev = DevLLM().start()
    port = free_port()
    env = environ(
        RABBITMQ_URL=node.url,
        RABBITMQ_QUEUE=f"{name}-input",
        CHATQUEUE_NAMESPACE=name,
        OPENAI_URL=dev.base_url,
        LOG_LEVEL="info",
        PORT=str(port),
        WEB_CONCURRENCY="2",
    )
    argv = procfile_command("worker")
    processes = [
        Process([*argv, "--hostname", f"{name}-{i}@%h"], env, f"dropin-worker{i}")
        for i in range(args.workers)
    ]
    try:
        wait_for_consumer(node.url, env["RABBITMQ_QUEUE"], 90, processes[0])
        web = Process(procfile_command("web"), env, "dropin-web")
        processes.append(web)
        wait_for_http(f"http://127.0.0.1:{port}/ping", web, lambda _, b: b == b"pong", 60)
        streams = [Stream(f"drop-in {tag} {i}") for i in range(args.streams)]
        dev.reset()
        model = f"m;delay={TOKEN_DELAY};tokens={TOKENS}"
        say(
            f"{args.streams} drop-in streams of {TOKENS} tokens, {TOKEN_DELAY} s apart, "
            f"{args.workers} workers, the broker restarted once all have begun ..."
        )
        restart = asyncio.run(run(f"http://127.0.0.1:{port}/openai/v1", streams, model, node))
        asked = int(dev.stats()["requests"])
        logs = "\n".join(p.output() for p in processes[:-1])
    finally:
        for proc in processes:
            proc.stop()
        dev.stop()
        node.stop()
    whole = sum(1 for s in streams if not s.error and s.text == expected(s.prompt, TOKENS))
    errors = Counter(s.error for s in streams if s.error)
    wrong = sum(1 for s in streams if not s.error and s.text != expected(s.prompt, TOKENS))
    rows = [
        ["whole, no error", whole],
        *[[f"ended with {code}", n] for code, n in errors.most_common()],
        ["no error, text wrong", wrong],
        ["LLM asked beyond once a stream", asked - len(streams)],
        ["went on in their worker (log)", logs.count("goes on after a lost connection")],
        ["their task message followed them from the other worker (log)", logs.count("follows it")],
        ["started again elsewhere (log)", logs.count("redelivered; the answer starts again")],
    ]
    print(f"the broker restart took {restart:.1f} s")
    print(format_table(rows, ["streams", "count"]))


if __name__ == "__main__":
    main()
