"""Bad input never crashes the worker and never loops: each is dead-lettered
with its reason, and the client is told where its uid or reply_to is known."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pika
import pytest

from tests.support import Broker, Process, assert_protocol, new_uid, wait_dead_letter

pytestmark = pytest.mark.usefixtures("worker")


def marker() -> str:
    return uuid.uuid4().hex


# (name, body built from a unique marker, expected error code)
UNANSWERABLE: list[tuple[str, Any, str]] = [
    ("broken JSON", lambda m: f'{{"uid": "{m}", "message": '.encode(), "invalid_json"),
    ("JSON list", lambda m: json.dumps([m, "hello"]).encode(), "invalid_json"),
    ("JSON string", lambda m: json.dumps(m).encode(), "invalid_json"),
    (
        "not UTF-8",
        lambda m: b'{"uid": "' + m.encode() + b'", "message": "\xff\xfe"}',
        "invalid_encoding",
    ),
    ("no uid", lambda m: json.dumps({"message": m}).encode(), "missing_uid"),
    ("empty uid", lambda m: json.dumps({"uid": "", "message": m}).encode(), "invalid_uid"),
    ("path uid", lambda m: json.dumps({"uid": "../x", "message": m}).encode(), "invalid_uid"),
    (
        "300-char uid",
        lambda m: json.dumps({"uid": "u" * 300, "message": m}).encode(),
        "invalid_uid",
    ),
    (
        "uid with spaces",
        lambda m: json.dumps({"uid": "a b c", "message": m}).encode(),
        "invalid_uid",
    ),
    ("unicode uid", lambda m: json.dumps({"uid": "ünïcødé", "message": m}).encode(), "invalid_uid"),
    (
        "uid of wrong type",
        lambda m: json.dumps({"uid": 12345, "message": m}).encode(),
        "invalid_uid",
    ),
    (
        "several MB",
        lambda m: json.dumps({"uid": m, "message": "x" * 3_000_000}).encode(),
        "body_too_large",
    ),
]


@pytest.mark.parametrize(("name", "make", "code"), UNANSWERABLE, ids=[u[0] for u in UNANSWERABLE])
def test_unanswerable_input_is_dead_lettered(
    broker: Broker, name: str, make: Any, code: str
) -> None:
    body = make(marker())
    broker.publish(body)
    dead = wait_dead_letter(broker, lambda m: m.body == body)
    headers = dead.properties.headers
    assert headers["x-chatqueue-error-code"] == code
    assert headers["x-chatqueue-reason"]
    assert headers["x-chatqueue-source-queue"] == broker.input_queue
    assert_still_serving(broker)


# Requests with a valid uid: the client hears about its mistake on its queue.
WRONG_TYPES: list[tuple[str, dict[str, Any], str]] = [
    ("no messages", {}, "missing_messages"),
    ("messages is a string", {"messages": "hello"}, "invalid_type"),
    ("empty messages", {"messages": []}, "invalid_type"),
    ("message without role", {"messages": [{"content": "x"}]}, "invalid_type"),
    ("stream not a bool", {"message": "x", "stream": "yes"}, "invalid_type"),
    ("model not a string", {"message": "x", "model": ["gpt"]}, "invalid_type"),
    ("temperature not a number", {"message": "x", "temperature": "hot"}, "invalid_type"),
]


@pytest.mark.parametrize(("name", "extra", "code"), WRONG_TYPES, ids=[w[0] for w in WRONG_TYPES])
def test_wrong_types_tell_the_client(
    broker: Broker, name: str, extra: dict[str, Any], code: str
) -> None:
    uid = new_uid()
    broker.publish({"uid": uid, **extra})
    answer = broker.answer(uid)
    assert [m.kind for m in answer.messages] == ["error", "done"]
    assert [m.seq for m in answer.messages] == [0, 1]
    error = answer.messages[0]
    assert error.properties.headers["status"] == 400
    assert error.json["error"]["type"] == "invalid_request_error"
    assert error.json["error"]["code"] == code
    assert set(error.json["error"]) == {"message", "type", "code", "param"}
    dead = wait_dead_letter(
        broker, lambda m: (m.properties.headers or {}).get("x-chatqueue-uid") == uid
    )
    assert dead.properties.headers["x-chatqueue-error-code"] == code


def test_a_hostile_uid_with_reply_to_is_told_on_reply_to(broker: Broker) -> None:
    reply = broker.channel.queue_declare("", exclusive=True).method.queue
    body = json.dumps({"uid": "../../etc/passwd", "message": marker()})
    broker.publish(body, pika.BasicProperties(reply_to=reply))
    answer = broker.read(reply)
    assert [m.kind for m in answer.messages] == ["error", "done"]
    assert answer.messages[0].json["error"]["code"] == "invalid_uid"
    assert not broker.queue_exists(broker.response_queue("../../etc/passwd"))
    wait_dead_letter(broker, lambda m: m.body == body.encode())


def test_a_text_plain_body_from_pika_is_read(broker: Broker) -> None:
    uid = new_uid()
    broker.publish(
        json.dumps({"uid": uid, "message": "Tell me a joke."}),
        pika.BasicProperties(content_type="text/plain"),
    )
    assert_protocol(broker.answer(uid), uid)


def test_a_burst_of_garbage_does_not_stop_the_worker(broker: Broker, worker: Process) -> None:
    bodies = [f"garbage {i} {marker()}".encode() for i in range(300)]
    for body in bodies:
        broker.publish(body)
    assert_still_serving(broker)
    assert worker.proc.poll() is None
    log = worker.output()
    assert "Unrecoverable error" not in log and "RecursionError" not in log
    for body in bodies[-3:]:
        wait_dead_letter(broker, lambda m, b=body: m.body == b)
    broker.channel.queue_purge(broker.env["CHATQUEUE_NAMESPACE"] + ".dead-letter")


def assert_still_serving(broker: Broker) -> None:
    uid = new_uid()
    broker.publish({"uid": uid, "message": "What is the capital of France?"})
    answer = broker.answer(uid)
    assert_protocol(answer, uid)
    assert answer.content == "The capital of France is Paris."
