"""A request's state (app/lifecycle.py), through real processes and RabbitMQ:
ownership that fails closed, cancels of one incarnation, one answer at a
time per uid, and no queue left behind."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from app.consumer import Intake
from app.factory import create_app
from app.lifecycle import new_uid as owned_uid
from app.lifecycle import owned_by
from config import load_settings
from devllm.testing import DevLLM
from tests.support import (
    Broker,
    Web,
    WebFactory,
    about,
    chat,
    client_of,
    collect,
    declare_response_queues,
    expected,
    fetch,
    holds_for,
    isolated,
    new_uid,
    queue_names,
    stream,
    submit,
    wait_until,
)
from web.accepted import Accepted
from web.errors import UnknownStream


def test_an_owned_uid_verifies_only_with_its_key() -> None:
    uid = owned_uid("key-alice")
    assert owned_by(uid, "key-alice")
    assert not owned_by(uid, "key-bob")
    assert not owned_by(uid.split(".")[0], "key-alice")  # no tag: nobody's
    assert not owned_by(uid[:-1] + ("0" if uid[-1] != "0" else "1"), "key-alice")
    assert not owned_by("é.é", "key-alice")


def test_a_uid_sent_again_after_a_cancel_is_answered(web: Web, llm: DevLLM) -> None:
    """A cancel stops one incarnation of a uid, not the uid: the same uid
    sent again once the first answer was cancelled is answered."""
    uid = new_uid()
    before = llm.stats()["streams_cancelled"]
    submit(web, chat("slow one", uid=uid, model="m;delay=0.2;tokens=50"))
    first = stream(web, uid, until=lambda s: len(s.events) >= 3)  # then hang up
    assert first.events and first.events[-1].data != "[DONE]"
    wait_until(
        lambda: llm.stats()["streams_cancelled"] > before,
        20,
        about("the first answer was not cancelled", web),
    )
    # Its queue was deleted with the cancel, so the uid is free again.
    submit(web, chat("again", uid=uid))
    assert stream(web, uid, timeout=30).content == expected("again")


def test_a_cancel_before_the_first_message_stops_that_request_only(
    web: Web, broker: Broker
) -> None:
    """A reader that leaves before any message cancels by uid and time: the
    request in flight is stopped, the same uid sent afterwards is answered."""
    uid = new_uid()
    # hang: the LLM answers (even its headers) only after 3 s.
    submit(web, chat("never read", uid=uid, model="m;hang=3"))
    left = stream(web, uid, timeout=30, until=lambda s: True)  # leave at the first ping
    assert not left.events
    # WEB_RESUME_GRACE (0.5 s here) passes: the queue is deleted, the cancel sent.
    wait_until(
        lambda: f"uid={uid}: its client did not come back" in web.output(),
        10,
        about("the web front never gave up on the reader", web),
    )
    assert not broker.queue_exists(broker.response_queue(uid))
    submit(web, chat("read this", uid=uid))
    assert stream(web, uid, timeout=30).content == expected("read this")


@pytest.mark.slow  # it kills a worker mid-intake; 300 requests
def test_hand_off_and_ack_are_one_transaction(
    start_worker: Any, worker_env: dict[str, str], names: dict[str, str]
) -> None:
    """A request's hand-off and the ack of its input message commit together:
    a worker killed at any moment of its intake leaves either both or
    neither, so each request is handed off exactly once (one [DONE], its
    seq in order), never streamed by two workers at once."""
    env = {**isolated(worker_env, names, "onetx"), "INPUT_PREFETCH": "200"}
    with client_of(env) as client:
        client.channel.queue_declare(env["RABBITMQ_QUEUE"], durable=True)
        uids = [new_uid() for _ in range(300)]
        declare_response_queues(client, uids, int(env["RESPONSE_QUEUE_TTL"]))
        for uid in uids:
            client.publish({"uid": uid, "model": "m;tokens=8;delay=0.05", "message": uid})
        doomed = start_worker("onetx-doomed", env=env)
        wait_until(
            lambda: "accepted" in doomed.output(),
            30,
            about("the first worker accepted nothing", doomed),
            interval=0.01,
        )
        time.sleep(0.2)  # the kill comes mid-intake
        doomed.kill()
        start_worker("onetx-a", env=env)
        start_worker("onetx-b", env=env)
        answers = collect(client, uids, timeout=120)
        for uid in uids:
            messages = answers[uid].messages
            dones = [m for m in messages if m.body == b"[DONE]"]
            assert len(dones) == 1, f"{uid}: {len(dones)} answers"
            assert answers[uid].final.in_order


@pytest.mark.slow  # RESPONSE_QUEUE_TTL (8 s) and rabbitmqctl: about 25 s
def test_no_queue_is_left_after_a_request_once_its_ttl_passed(
    start_web: WebFactory, start_worker: Any, worker_env: dict[str, str], names: dict[str, str]
) -> None:
    """Read, cancelled, abandoned: each request made one queue, and none
    remains once RESPONSE_QUEUE_TTL has passed (counted on the broker)."""
    env = {
        **isolated(worker_env, names, "leftover"),
        "RESPONSE_QUEUE_PREFIX": names["CHATQUEUE_NAMESPACE"] + "-leftover-response_",
        "RESPONSE_QUEUE_TTL": "8",
        "SSE_KEEPALIVE": "1",
    }
    start_worker("leftover", env=env)
    web = start_web("leftover", env=env)
    prefix = env["RESPONSE_QUEUE_PREFIX"]
    read = submit(web, chat("read"))
    assert stream(web, read).content == expected("read")
    cancelled = submit(web, chat("cancelled", model="m;delay=0.2;tokens=40"))
    stream(web, cancelled, until=lambda s: len(s.events) >= 2)
    wait_until(
        lambda: prefix + cancelled not in queue_names(prefix),
        10,
        "the cancelled answer's queue was not deleted",
    )
    abandoned = [submit(web, chat(f"abandoned {i}")) for i in range(5)]

    # The worker declares them.
    def declared() -> list[str]:
        made = queue_names(prefix)
        return made if len(made) >= len(abandoned) else []

    made = wait_until(declared, 10)
    assert set(made) <= {prefix + u for u in [read, cancelled, *abandoned]}
    assert len(made) == len(abandoned)  # the read and the cancelled are gone already
    wait_until(lambda: not queue_names(prefix), 30, "a queue outlived its TTL", interval=0.5)
    # Nothing else of the request is on the broker: only the deployment's own
    # queues, and the web process's reply queue (one per process, web/publisher.py).
    settings = load_settings(env)
    ns = env["CHATQUEUE_NAMESPACE"]
    mine = [q for q in queue_names(ns) if not q.startswith(prefix)]
    replies = [q for q in mine if q.startswith(settings.reply_queue_prefix)]
    assert len(replies) <= settings.web_concurrency, replies
    others = sorted(set(mine) - set(replies))
    assert others == sorted(set(settings.deployment_queues) - {settings.rabbitmq_queue}), mine
    status, _, _ = fetch("GET", web.url + "/ping")
    assert status == 200


@pytest.mark.slow  # over 8 s
def test_a_reader_waits_for_the_worker_to_accept_its_request(
    start_web: WebFactory, start_worker: Any, worker_env: dict[str, str], names: dict[str, str]
) -> None:
    """A fresh uid's response queue is declared by the worker that accepts the
    request, not by the POST: a reader that comes first waits for it
    (WEB_ACCEPT_WAIT), and a uid of that form that nobody submitted is 404
    once the wait is over."""
    # 2 s: longer than a hand-off that no `taken` notice covers (HOLD_NOTICE and
    # the notices' period), as a fresh worker's first can be on a loaded machine.
    accept_wait = 2
    env = {**isolated(worker_env, names, "accept"), "WEB_ACCEPT_WAIT": str(accept_wait)}
    web = start_web("accept", env=env)
    uid = submit(web, chat("wait for me"))  # no worker on this input queue yet
    results: list[Any] = []
    reader = threading.Thread(target=lambda: results.append(stream(web, uid, timeout=40)))
    reader.start()
    # Waiting past WEB_ACCEPT_WAIT (and a look after it, LOOK_AGAIN), not 404:
    # the request is in the input queue's backlog (as after a burst, or a
    # broker restart).
    holds_for(reader.is_alive, accept_wait + 3, lambda: str(results))
    start_worker("accept", env=env)
    reader.join(40)
    assert results and results[0].content == expected("wait for me")

    quick = start_web("accept-quick", env={**env, "WEB_ACCEPT_WAIT": "1"})
    started = time.monotonic()
    nobody = stream(quick, owned_uid())
    assert nobody.status == 404
    assert 0.5 <= time.monotonic() - started < 10  # it waited, then gave up


@pytest.mark.slow  # over 8 s
def test_a_reader_waits_for_a_request_just_taken_from_the_backlog(names: dict[str, str]) -> None:
    """A request taken from the input queue leaves its backlog before its
    hand-off commits and its queue exists: a reader that saw a backlog waits
    WEB_ACCEPT_WAIT more once it is gone, instead of a 404 in between (as
    when a worker starts while a reader waits on the backlog).
    Here the broker's answers are played by the clock: a backlog until 2.5 s,
    the queue from 4.0 s, a look about every second (LOOK_AGAIN); then a
    backlog until 1.5 s and the queue from 2.5 s."""
    accepted = Accepted(load_settings(isolated(names, names, "taken-from-backlog")))
    accepted.start()
    try:
        wait_until(lambda: accepted._listening, 10, "the listener never consumed")
        _wait_across_a_backlog_that_empties(accepted)
    finally:
        accepted.should_stop = True


def _wait_across_a_backlog_that_empties(accepted: Accepted) -> None:
    def played(timeout: float, backlog_until: float, queue_from: float) -> str:
        """A wait of ``timeout`` s: a backlog until ``backlog_until`` s, the
        queue from ``queue_from`` s."""
        began = time.monotonic()

        def look() -> str:
            if time.monotonic() - began < queue_from:
                raise UnknownStream("no queue yet")
            return "found"

        def backlog() -> bool:
            return time.monotonic() - began < backlog_until

        return accepted.wait(new_uid(), timeout, look, backlog)

    assert played(2.0, backlog_until=2.5, queue_from=4.0) == "found"
    # A backlog seen before the wait is over, gone before it is (taken by an
    # intake whose `taken` notice has not come yet): the wait goes on from the
    # last look that saw it (here ~1 s), and the queue comes at 2.5 s.
    assert played(2.0, backlog_until=1.5, queue_from=2.5) == "found"
    # With no backlog ever, the wait ends after WEB_ACCEPT_WAIT, with a 404.
    began = time.monotonic()
    with pytest.raises(UnknownStream):
        played(1.0, backlog_until=0.0, queue_from=4.0)
    assert 1.0 <= time.monotonic() - began < 3.0


@pytest.mark.slow  # over 8 s
def test_a_reader_waits_while_an_intake_holds_its_request(
    start_web: WebFactory, start_worker: Any, worker_env: dict[str, str], names: dict[str, str]
) -> None:
    """A request an intake has taken but cannot hand off yet (its broker slow
    to answer: seconds, on a loaded machine) is in no backlog and not
    accepted; the intake says it holds it (a ``taken`` notice), and its reader
    waits instead of a 404 after WEB_ACCEPT_WAIT for a request answered later."""
    # The intake tells after HOLD_NOTICE (1 s): a wait of 3 s leaves room for it.
    env = {**isolated(worker_env, names, "held"), "WEB_ACCEPT_WAIT": "3"}
    web = start_web("held", env=env)
    intake = Intake(create_app(load_settings(env)))
    taken, release = threading.Event(), threading.Event()

    def stalled(reads: list[Any], since: float | None = None) -> None:
        taken.set()
        release.wait(30)  # the broker does not answer the hand-off

    intake.hand_off = stalled  # type: ignore[method-assign]
    serves = (intake.serve, intake.holding.serve)
    threads = [threading.Thread(target=serve, daemon=True) for serve in serves]
    for thread in threads:
        thread.start()
    try:
        uid = submit(web, chat("hold me"))
        results: list[Any] = []
        reader = threading.Thread(target=lambda: results.append(stream(web, uid, timeout=60)))
        reader.start()
        assert taken.wait(10)
        # Not 404 after WEB_ACCEPT_WAIT (3 s) from the last look that saw a
        # backlog, nor after one more from the first ``taken`` notice (1 s on):
        # the intake tells again every RETELL (3 s) while it holds the request.
        holds_for(reader.is_alive, 8, lambda: str(results))
    finally:
        intake.should_stop = intake.holding.should_stop = True
        release.set()
        for thread in threads:
            thread.join(10)
    # The intake is gone without handing it off: the request goes back to the
    # queue, and a worker answers it to the reader that waited.
    start_worker("held", env=env)
    reader.join(60)
    assert results and results[0].content == expected("hold me")


def test_a_reader_that_does_not_read_leaves_the_backlog_in_rabbitmq(
    web: Web, broker: Any, llm: DevLLM
) -> None:
    """The web front takes at most a few dozen messages of a stream ahead of its
    reader (prefetch, ack once written): a client that stops reading leaves the
    rest in RabbitMQ, not in the web process's memory."""
    uid = submit(web, chat("a firehose", model="m;tokens=60000;delay=0"))
    host, port = web.url.removeprefix("http://").split(":")
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect((host, int(port)))
    try:
        client.sendall(f"GET /v1/chat/response?uid={uid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        queue = broker.response_queue(uid)
        broker.wait_for_queue(queue)  # made by the worker that takes the request
        wait_until(  # and never reads a byte
            lambda: broker.queue_length(queue) >= 5000,
            60,
            about("the web process took the backlog in", web),
            interval=0.2,
        )
    finally:
        client.close()
    before = llm.stats()["streams_cancelled"]
    wait_until(
        lambda: llm.stats()["streams_cancelled"] > before or not llm.stats()["active_streams"],
        30,
        about("the answer of a reader that left went on", web),
        interval=0.2,
    )
