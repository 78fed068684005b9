"""Scale-out on a three-node RabbitMQ cluster (tests/conftest.py): quorum queues,
two workers on different nodes, and one node killed (``kill -9`` of its
``beam.smp``) while 200 answers stream.

Every accepted request is answered exactly once: one ``[DONE]``, the whole
answer, in order; a stream whose worker lost its node starts again, marked
``restart`` (seq from 0) as the protocol says. Requests sent while the node
is down are answered. The figures go to the test's output (``pytest -s``).
A web process moves to another node the same way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from chatqueue_testing.rabbitnode import RabbitCluster
from config import load_settings
from devllm.answers import reply_tokens
from tests.support import (
    Answer,
    Received,
    WebFactory,
    chat,
    expected,
    isolated,
    new_uid,
    stream,
    submit,
    wait_for_consumer,
)

# Each test runs a private three-node RabbitMQ cluster, and kills a node.
pytestmark = pytest.mark.slow

STREAMS = 200
TOKENS = 24
DELAY = 0.5  # seconds a token: an answer takes about 12 s
DURING = 10  # requests sent while the node is down


@dataclass
class Readers:
    """One client connection (to a node that is not killed) reading many
    response queues at once, each once its answer has begun.

    Not as soon as the queue is there: on RabbitMQ 3.10 a consume that comes
    while a new quorum queue's Raft group is still starting crashes the
    broker's channel and closes the connection (541 INTERNAL_ERROR,
    ``badmatch {error,noproc}`` or ``{error,nodedown}`` in
    ``rabbit_quorum_queue:consume``), whether the client or the worker
    declared it. A queue with a message in it has a leader.
    """

    connection: BlockingConnection
    prefix: str
    answers: dict[str, Answer] = field(default_factory=dict)
    done_at: dict[str, float] = field(default_factory=dict)
    waiting: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.channel: BlockingChannel = self.connection.channel()
        self.channel.basic_qos(prefetch_count=2000)

    def follow(self, uids: list[str]) -> None:
        for uid in uids:
            self.answers[uid] = Answer()
            self.waiting.add(uid)

    @staticmethod
    def exists(connection: BlockingConnection, queue: str) -> bool:
        channel = connection.channel()
        try:
            channel.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            return False
        channel.close()
        return True

    def _begun(self, queue: str) -> bool:
        channel = self.connection.channel()
        try:
            ok = channel.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            return False  # not there yet
        channel.close()
        return bool(ok.method.message_count)

    def _consume_declared(self) -> None:
        for uid in list(self.waiting):
            queue = self.prefix + uid
            if self._begun(queue):
                self.waiting.discard(uid)
                self.channel.basic_consume(queue, self._handler(uid), auto_ack=True)

    def _handler(self, uid: str) -> Any:
        def handle(ch: Any, method: Any, properties: Any, body: bytes) -> None:
            self.answers[uid].messages.append(Received(body, properties))
            if body == b"[DONE]":
                self.done_at[uid] = time.monotonic()

        return handle

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.waiting:
                self._consume_declared()
            self.connection.process_data_events(time_limit=0.2)

    def pump_until_done(self, uids: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(u in self.done_at for u in uids):
                return True
            self.pump(0.5)
        return all(u in self.done_at for u in uids)


def last_incarnation(answer: Answer) -> Answer:
    """What a reader keeps: a message marked ``restart`` with seq 0 drops what came before."""
    start = 0
    for i, m in enumerate(answer.messages):
        if m.restart and m.seq == 0:
            start = i
    return Answer(answer.messages[start:])


def check_once(
    answer: Answer, prompt: str, tokens: int, *, ended_before: bool = False
) -> list[str]:
    """What is wrong with ``answer`` (nothing: it is whole, and answered once).

    ``ended_before``: its ``[DONE]`` came before the kill. Its worker may not
    have acknowledged its task message yet (with quorum response queues it
    waits for the confirms of its last messages first, about a second): the
    message comes back, and a second answer marked ``restart`` follows the
    first, as the README says for an AMQP client. That second answer must
    be whole and marked."""
    problems = []
    dones = [i for i, m in enumerate(answer.messages) if m.body == b"[DONE]"]
    again = answer.messages[dones[0] + 1 :] if ended_before and len(dones) == 2 else []
    if len(dones) != 1 and not (again and all(m.restart for m in again)):
        problems.append(f"{len(dones)} [DONE]")
    if not answer.done:
        problems.append("does not end with [DONE]")
    final = last_incarnation(answer)
    if not final.in_order:
        problems.append(f"seq out of order: {[m.seq for m in final.messages]}")
    expected = "".join(reply_tokens([{"role": "user", "content": prompt}], tokens))
    if final.content != expected:
        problems.append(f"content {final.content!r}")
    return problems


def print_workers(workers: list[Any]) -> None:
    for w in workers:
        out = w.output()
        accepted, again = out.count(": accepted"), out.count("the answer starts again")
        renewed = out.count("TimeoutError")  # a lane's confirm that did not come
        print(f"\n{w.name}: accepted {accepted}, restarted {again}, confirms timed out {renewed}")


def wrong_answers(
    readers: Readers, prompts: dict[str, str], during: dict[str, str], ended_before: set[str]
) -> dict[str, list[str]]:
    """What is wrong with each answer that is not right (:func:`check_once`)."""
    return {
        u: p
        for u, text in {**prompts, **during}.items()
        if (
            p := check_once(
                readers.answers[u],
                text,
                5 if u in during else TOKENS,
                ended_before=u in ended_before,
            )
        )
    }


def unended_report(
    readers: Readers, unended: list[str], workers: list[Any], cluster: RabbitCluster
) -> str:
    """What became of answers that never ended: what their reader got, their
    queue, and every line the workers and the nodes logged about them."""
    lines = []
    for uid in unended:
        got = readers.answers[uid].messages
        seqs = [(m.properties.headers or {}).get("seq") for m in got]
        probe = readers.connection.channel()
        try:
            ok = probe.queue_declare(readers.prefix + uid, passive=True).method
            queue = f"{ok.message_count} messages, {ok.consumer_count} consumers"
            probe.close()
        except pika.exceptions.ChannelClosedByBroker as exc:
            queue = f"none ({exc})"
        lines.append(f"never ended: {uid}: {len(got)} messages, seqs {seqs}; queue: {queue}")
        logs = [(w.name, w.output()) for w in workers]
        for node in cluster.nodes:
            log = node.log_dir / f"{node.nodename}.log"
            logs.append((node.nodename, log.read_text(errors="replace") if log.exists() else ""))
        lines += [
            f"  {name}: {line}" for name, text in logs for line in text.splitlines() if uid in line
        ]
    return "\n".join(lines)


def worker_errors(workers: list[Any]) -> str:
    """The lines the workers logged at WARNING or above."""
    return "\n".join(
        f"  {w.name}: {line}"
        for w in workers
        for line in w.output().splitlines()
        if " WARNING " in line or " ERROR " in line or "Traceback" in line
    )


def publish_all(channel: BlockingChannel, queue: str, requests: list[dict[str, Any]]) -> None:
    """Publish persistent requests, each confirmed by the broker: accepted."""
    for body in requests:
        channel.basic_publish(
            "",
            queue,
            json.dumps(body),
            pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
            mandatory=True,
        )


def serve_during_outage(
    readers: Readers,
    sender: BlockingChannel,
    queue: str,
    workers: list[Any],
    cluster: RabbitCluster,
) -> tuple[dict[str, str], float]:
    """Send DURING short requests while a node is down; each must be answered
    within a minute. Their prompts by uid, and when they were sent."""
    during = {new_uid(): f"during {i}" for i in range(DURING)}
    readers.follow(list(during))
    sent = time.monotonic()
    publish_all(
        sender,
        queue,
        [
            {"uid": u, "model": "m;tokens=5", "messages": [{"role": "user", "content": p}]}
            for u, p in during.items()
        ],
    )
    if not readers.pump_until_done(list(during), timeout=60):
        unserved = [u for u in during if u not in readers.done_at]
        raise AssertionError(
            f"{len(unserved)} of {DURING} not served during the outage:\n"
            + unended_report(readers, unserved, workers, cluster)
            + "\n"
            + worker_errors(workers)
        )
    return during, sent


def test_a_node_killed_mid_stream_loses_no_accepted_request(
    rabbit_cluster: RabbitCluster,
    start_worker: Any,
    worker_env: dict[str, str],
    names: dict[str, str],
) -> None:
    url1, url2, url3 = rabbit_cluster.urls
    env = {
        **isolated(worker_env, names, "cluster"),
        "RABBITMQ_QUEUE_TYPE": "quorum",
        "RESPONSE_QUEUE_TYPE": "quorum",
        "LLM_READ_TIMEOUT": "30",
    }
    queue = env["RABBITMQ_QUEUE"]
    # Worker A is on node 1 (the one killed), worker B on node 2; each moves
    # along its list when its node goes away. A starts first, so the input and
    # task queues' leaders, and A's response queues, are on node 1.
    a = start_worker("cluster-a", env={**env, "RABBITMQ_URL": f"{url1};{url2};{url3}"})
    b = start_worker("cluster-b", env={**env, "RABBITMQ_URL": f"{url2};{url3};{url1}"})
    wait_for_consumer(url3, queue, consumers=2)

    client = pika.BlockingConnection(pika.URLParameters(url3))
    try:
        assert not Readers.exists(client, "celery_delayed_0")  # app.factory.TaskConsumer
        sender = client.channel()
        sender.confirm_delivery()
        readers = Readers(client, env["RESPONSE_QUEUE_PREFIX"])
        model = f"m;delay={DELAY};tokens={TOKENS}"
        prompts = {new_uid(): f"cluster {i}" for i in range(STREAMS)}
        uids = list(prompts)
        readers.follow(uids)
        publish_all(
            sender,
            queue,
            [
                {"uid": u, "model": model, "messages": [{"role": "user", "content": p}]}
                for u, p in prompts.items()
            ],
        )
        # Mid-way: every answer has begun (and none is near its end).
        deadline = time.monotonic() + 60
        while not all(len(readers.answers[u].messages) >= 3 for u in uids):
            assert time.monotonic() < deadline, "the answers never all began"
            readers.pump(0.5)

        rabbit_cluster.kill(1)
        killed = time.monotonic()
        # On a slow day the first answers can end before the last have begun.
        ended_before = set(readers.done_at)

        during, sent_during = serve_during_outage(readers, sender, queue, [a, b], rabbit_cluster)
        assert not rabbit_cluster.node(1).running()  # they were served while node 1 was down
        latencies = sorted(readers.done_at[u] - sent_during for u in during)
        # Worker A moved to another node: its intake and its task consumer are back.
        task_queue = load_settings(env).task_queue
        for consumed in (queue, task_queue):
            wait_for_consumer(url3, consumed, timeout=30, consumers=2)
        assert not rabbit_cluster.node(1).running()

        all_done = readers.pump_until_done(uids, timeout=90)
        unended = [u for u in uids if u not in readers.done_at]
        why = unended_report(readers, unended, [a, b], rabbit_cluster)
        recovered = max(readers.done_at.get(u, time.monotonic()) for u in uids) - killed

        started = time.monotonic()
        rabbit_cluster.restart(1)
        node_back = time.monotonic() - started
        readers.pump(3)  # nothing more comes once the node is back: no second answer
        client.close()

        restarted = [u for u in uids if any(m.restart for m in readers.answers[u].messages)]
        print_workers([a, b])
        print(
            f"\n{STREAMS} streams on two workers (nodes 1 and 2), node 1 killed mid-way:"
            f" {len(restarted)} restarted; all answered {recovered:.1f} s after the kill;"
            f" {len(ended_before)} had ended before the kill;"
            f" {DURING} new requests during the outage, answered in"
            f" {latencies[0]:.2f}-{latencies[-1]:.2f} s; node 1 back in {node_back:.1f} s"
        )
        print(why)
        assert all_done, f"{len(unended)} answers never ended"
        problems = wrong_answers(readers, prompts, during, ended_before)
        assert problems == {}, f"{len(problems)} answers wrong, e.g. {list(problems.items())[:3]}"

    finally:
        if client.is_open:  # a failed assertion: its socket is not left to the GC
            client.close()


def test_the_web_front_moves_to_another_node(
    rabbit_cluster: RabbitCluster,
    start_web: WebFactory,
    start_worker: Any,
    worker_env: dict[str, str],
    names: dict[str, str],
) -> None:
    """A web process connected to node 1 takes new connections to node 2 when
    node 1 dies: submissions and streams go on."""
    url1, url2, url3 = rabbit_cluster.urls
    env = {
        **isolated(worker_env, names, "cluster-web"),
        "RABBITMQ_QUEUE_TYPE": "quorum",
        "RESPONSE_QUEUE_TYPE": "quorum",
    }
    start_worker("cluster-web", env={**env, "RABBITMQ_URL": f"{url2};{url3};{url1}"})
    web = start_web("cluster-web", env={**env, "RABBITMQ_URL": f"{url1};{url2};{url3}"})
    before = submit(web, chat("before the kill"))
    assert stream(web, before).content == expected("before the kill")

    rabbit_cluster.kill(1)

    for prompt in ("after the kill", "and again"):
        uid = submit(web, chat(prompt))
        assert stream(web, uid, timeout=60).content == expected(prompt)
