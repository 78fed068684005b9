"""Routing is safe: ``reply_to`` never names a queue chatqueue owns, and
RabbitMQ's direct reply-to works (app/request.py, then a real worker)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pika
import pytest

from app.errors import RequestError
from app.request import (
    DIRECT_REPLY_TO,
    check_reply_to,
    is_direct_reply_to,
    owned_queues,
    parse_request,
)
from config import load_settings
from devllm.testing import DevLLM
from tests.support import (
    Answer,
    Broker,
    Received,
    assert_protocol,
    expected,
    new_uid,
    requests_for,
    wait_dead_letter,
)

SETTINGS = load_settings(
    {
        "RABBITMQ_QUEUE": "requests",
        "CHATQUEUE_NAMESPACE": "cq",
        "RESPONSE_QUEUE_PREFIX": "response_",
    }
)
OWNED = owned_queues(SETTINGS)


# --- the rule --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "queue",
    [
        "requests",  # the input queue
        "cq.tasks",  # the task queue
        "cq.dead-letter",
        "cq.claim.600s.some-uid",
        "cq.anything-chatqueue-adds-later",
        "response_someone-else",
        "response_u1",  # the request's own response queue: refused too
    ],
)
def test_chatqueue_owns(queue: str) -> None:
    assert OWNED(queue)
    with pytest.raises(RequestError) as caught:
        check_reply_to(queue, owned=OWNED)
    error = caught.value
    assert (error.code, error.param, error.status) == ("invalid_reply_to", "reply_to", 400)
    assert repr(queue) in error.message
    assert DIRECT_REPLY_TO in error.message  # says how to fix it


@pytest.mark.parametrize(
    "queue",
    [
        "amq.gen-JzTY20BRgKO-HjmUJj0wLg",  # a server-named exclusive queue
        "my-app.replies",
        "requests-2",
        "cq",  # the namespace itself is no queue of ours; cq.<anything> is
        "cqx.tasks",
        "response",
        "responses_x",
    ],
)
def test_other_queues_are_the_clients(queue: str) -> None:
    assert not OWNED(queue)
    check_reply_to(queue, owned=OWNED)


def test_a_web_processs_reply_queue_is_a_reply_to() -> None:
    """The web front's drop-in and WebSocket ask for their answers on their
    process's reply queue (web/publisher.py), a name of the namespace."""
    queue = SETTINGS.reply_queue_prefix + "0123456789abcdef0123456789abcdef"
    assert queue.startswith("cq.replies.")
    assert not OWNED(queue)
    check_reply_to(queue, owned=OWNED)
    assert OWNED("cq.replies")  # but the prefix alone, or another cq. name


@pytest.mark.parametrize(
    "queue",
    [DIRECT_REPLY_TO, DIRECT_REPLY_TO + ".g1h2AA5yZXBseUAyNzIyNjM0OAAAEkQAAAAAAAAAAQ=="],
)
def test_direct_reply_to_is_always_allowed(queue: str) -> None:
    assert is_direct_reply_to(queue)
    check_reply_to(queue, owned=lambda _: True)  # even under a namespace "amq"


def test_lookalikes_of_direct_reply_to_are_not_it() -> None:
    for queue in ["amq.rabbitmq.reply-tox", "x.amq.rabbitmq.reply-to", "amq.rabbitmq"]:
        assert not is_direct_reply_to(queue)


def parse(data: dict[str, Any], **kw: Any) -> Any:
    return parse_request(data, default_model="m", **kw)


def test_parse_request_refuses_an_owned_reply_to_and_keeps_the_uid() -> None:
    with pytest.raises(RequestError) as caught:
        parse({"uid": "u1", "message": "x"}, reply_to="cq.tasks", owned_queue=OWNED)
    error = caught.value
    assert error.code == "invalid_reply_to"
    assert error.uid == "u1"  # the client is told on response_u1 ...
    assert error.reply_to is None  # ... and never on the queue it named


def test_an_owned_reply_to_is_refused_before_anything_else() -> None:
    """Any error of such a request would otherwise be sent to the owned queue."""
    with pytest.raises(RequestError) as caught:
        parse({"uid": "../x", "messages": 3}, reply_to="requests", owned_queue=OWNED)
    error = caught.value
    assert (error.code, error.uid, error.reply_to) == ("invalid_reply_to", None, None)


def test_parse_request_keeps_an_allowed_reply_to() -> None:
    for reply_to in ["my-replies", DIRECT_REPLY_TO + ".abc"]:
        request = parse({"uid": "u1", "message": "x"}, reply_to=reply_to, owned_queue=OWNED)
        assert request.reply_to == reply_to
    with pytest.raises(RequestError) as caught:
        parse({"uid": "u1", "messages": 3}, reply_to="my-replies", owned_queue=OWNED)
    assert caught.value.reply_to == "my-replies"  # other errors still go to reply_to


def test_without_owned_queue_parse_request_is_as_before() -> None:
    assert parse({"uid": "u1", "message": "x"}, reply_to="cq.tasks").reply_to == "cq.tasks"


# --- through a real worker -----------------------------------------------------------------


def test_direct_reply_to_gets_the_answer(broker: Broker, worker: Any) -> None:
    """A pika client consumes amq.rabbitmq.reply-to (no ack) and publishes on the same channel."""
    uid = new_uid()
    answer = Answer()
    channel = broker.connection.channel()
    try:

        def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
            answer.messages.append(Received(body, properties))

        channel.basic_consume(DIRECT_REPLY_TO, on_message, auto_ack=True)
        channel.basic_publish(
            exchange="",
            routing_key=broker.input_queue,
            body=json.dumps({"uid": uid, "message": "Tell me a joke."}),
            properties=pika.BasicProperties(reply_to=DIRECT_REPLY_TO),
        )
        deadline = time.monotonic() + 30
        while not answer.done and time.monotonic() < deadline:
            broker.connection.process_data_events(time_limit=0.2)
    finally:
        channel.close()
    assert_protocol(answer, uid)
    assert answer.content == expected("Tell me a joke.")
    assert not broker.queue_exists(broker.response_queue(uid))  # no queue made for it


def tag() -> str:
    return uuid.uuid4().hex[:8]


# Each picks a forbidden reply_to from the run's names and the request's uid.
FORBIDDEN: dict[str, Callable[[dict[str, str], str], str]] = {
    "input queue": lambda env, uid: env["RABBITMQ_QUEUE"],
    "task queue": lambda env, uid: load_settings(env).task_queue,
    "dead-letter queue": lambda env, uid: env["CHATQUEUE_NAMESPACE"] + ".dead-letter",
    "a queue in its namespace": lambda env, uid: env["CHATQUEUE_NAMESPACE"] + f".cancel.{uid}",
    "its own response queue": lambda env, uid: env["RESPONSE_QUEUE_PREFIX"] + uid,
}


@pytest.mark.parametrize("which", list(FORBIDDEN))
def test_a_reply_to_chatqueue_owns_is_dead_lettered(
    broker: Broker, worker: Any, llm: DevLLM, which: str
) -> None:
    uid = new_uid()
    model = f"m;tag={tag()}"
    reply_to = FORBIDDEN[which](broker.env, uid)
    broker.publish(
        {"uid": uid, "model": model, "message": "Tell me a joke."},
        pika.BasicProperties(reply_to=reply_to),
    )
    assert_refused(broker, uid, reply_to)
    assert requests_for(llm, model) == 0  # never handed to the task


def test_another_requests_stream_cannot_be_written_to(
    broker: Broker, worker: Any, llm: DevLLM
) -> None:
    victim = broker.response_queue(new_uid())
    broker.channel.queue_declare(victim, exclusive=True)
    uid = new_uid()
    model = f"m;tag={tag()}"
    broker.publish(
        {"uid": uid, "model": model, "message": "Tell me a joke."},
        pika.BasicProperties(reply_to=victim),
    )
    assert_refused(broker, uid, victim)
    assert broker.queue_length(victim) == 0  # nothing injected into the other stream
    assert requests_for(llm, model) == 0


def assert_refused(broker: Broker, uid: str, reply_to: str) -> None:
    """The error goes to response_<uid>, never to ``reply_to``; the request is dead-lettered."""
    answer = broker.answer(uid, timeout=10)
    assert [m.kind for m in answer.messages] == ["error", "done"]
    error = answer.messages[0]
    assert error.properties.headers["status"] == 400
    assert error.json["error"]["code"] == "invalid_reply_to"
    assert error.json["error"]["param"] == "reply_to"
    dead = wait_dead_letter(
        broker, lambda m: (m.properties.headers or {}).get("x-chatqueue-uid") == uid
    )
    assert dead.properties.headers["x-chatqueue-error-code"] == "invalid_reply_to"
    assert repr(reply_to) in dead.properties.headers["x-chatqueue-reason"]
