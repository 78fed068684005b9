"""The worker end to end: pika publishes, a real worker answers on response_<uid>."""

from __future__ import annotations

import json
from typing import Any

import pika
import pytest

from config import load_settings
from devllm.answers import reply_tokens
from devllm.testing import DevLLM
from tests.support import (
    TOKENS,
    Broker,
    Process,
    about,
    assert_protocol,
    expected,
    holds_for,
    isolated,
    new_uid,
    procfile_command,
    queue_names,
    task_events,
    wait_dead_letter,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("worker")


def test_simple_shape_as_in_the_readme(broker: Broker) -> None:
    uid = "123e4567-e89b-12d3-a456-426614174000"
    broker.channel.basic_publish(
        exchange="",
        routing_key=broker.input_queue,
        body=json.dumps({"key": uid, "message": "What is the capital of France?"}),
    )
    answer = broker.answer(uid)
    assert_protocol(answer, uid)
    assert answer.content == expected("What is the capital of France?")
    assert answer.content == "The capital of France is Paris."
    assert answer.chunks[0]["model"] == "devllm"  # OPENAI_MODEL of the test worker


def test_chat_shape_as_in_the_readme(broker: Broker, llm: DevLLM) -> None:
    uid = new_uid()
    broker.channel.basic_publish(
        exchange="",
        routing_key=broker.input_queue,
        body=json.dumps(
            {
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": "Tell me a joke."}],
                "stream": True,
                "username": "alice",
                "uid": uid,
            }
        ),
    )
    answer = broker.answer(uid)
    assert_protocol(answer, uid)
    assert answer.content == expected("Tell me a joke.")
    assert answer.chunks[0]["model"] == "gpt-4o"
    sent = [
        r
        for r in llm.stats()["last_requests"]
        if r.get("messages") == [{"role": "user", "content": "Tell me a joke."}]
        and r.get("model") == "gpt-4o"
    ]
    assert sent and sent[-1]["stream"] is True


def test_the_response_queue_is_declared_with_its_ttl(broker: Broker) -> None:
    uid = new_uid()
    broker.publish({"uid": uid, "message": "ttl?"})
    broker.wait_for_queue(broker.response_queue(uid))
    # Declaring with the same arguments succeeds; with another x-expires the
    # broker says they differ: so the worker declared exactly x-expires = TTL.
    channel = broker.connection.channel()
    channel.queue_declare(
        broker.response_queue(uid), durable=True, arguments={"x-expires": 120_000}
    )
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="x-expires"):
        channel.queue_declare(
            broker.response_queue(uid), durable=True, arguments={"x-expires": 5_000}
        )
    assert_protocol(broker.answer(uid), uid)


def test_stream_false_gives_one_completion(broker: Broker) -> None:
    uid = new_uid()
    broker.publish(
        {"uid": uid, "messages": [{"role": "user", "content": "Tell me a joke."}], "stream": False}
    )
    answer = broker.answer(uid)
    assert [m.kind for m in answer.messages] == ["completion", "done"]
    assert [m.seq for m in answer.messages] == [0, 1]
    completion = answer.messages[0].json
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == expected("Tell me a joke.")
    assert completion["choices"][0]["finish_reason"] == "stop"


def test_reply_to_gets_the_answer_instead(broker: Broker) -> None:
    uid = new_uid()
    reply = broker.channel.queue_declare("", exclusive=True).method.queue
    broker.publish({"uid": uid, "message": "Tell me a joke."}, pika.BasicProperties(reply_to=reply))
    answer = broker.read(reply)
    assert_protocol(answer, uid)
    assert answer.content == expected("Tell me a joke.")
    assert not broker.queue_exists(broker.response_queue(uid))


def test_correlation_id_names_the_queue_when_the_body_has_no_uid(broker: Broker) -> None:
    uid = new_uid()
    broker.publish(
        {"message": "What is the capital of France?"}, pika.BasicProperties(correlation_id=uid)
    )
    answer = broker.answer(uid)
    assert_protocol(answer, uid)
    assert answer.content == "The capital of France is Paris."


def test_sampling_fields_pass_through_and_unknown_ones_do_not(broker: Broker, llm: DevLLM) -> None:
    uid = new_uid()
    prompt = f"count for {uid}"
    broker.publish(
        {
            "uid": uid,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 3,
            "temperature": 0.25,
            "seed": 7,
            "stop": ["zz"],
            "secret_field": "do not forward",
            "username": "bob",
            "stream_options": {"include_usage": True},
        }
    )
    answer = broker.answer(uid)
    assert_protocol(answer, uid)
    tokens = reply_tokens([{"role": "user", "content": prompt}], TOKENS)
    assert answer.content == "".join(tokens[:3])  # cut by max_tokens
    finishes = [c["choices"][0]["finish_reason"] for c in answer.chunks if c["choices"]]
    assert finishes[-1] == "length"
    assert answer.chunks[-1]["usage"]["completion_tokens"] == 3  # include_usage went through
    sent = next(
        r
        for r in llm.stats()["last_requests"]
        if r.get("messages") == [{"role": "user", "content": prompt}]
    )
    assert sent["temperature"] == 0.25 and sent["seed"] == 7 and sent["max_tokens"] == 3
    assert "secret_field" not in sent and "username" not in sent and "uid" not in sent


def test_a_duplicate_uid_is_answered_once(broker: Broker) -> None:
    uid = new_uid()
    body = {"uid": uid, "message": "Tell me a joke."}
    broker.publish(body)
    broker.publish(body)
    answer = broker.answer(uid)
    assert_protocol(answer, uid)
    # The second copy is refused, dead-lettered: no second answer follows it.
    dead = wait_dead_letter(
        broker, lambda m: (m.properties.headers or {}).get("x-chatqueue-uid") == uid
    )
    assert dead.properties.headers["x-chatqueue-error-code"] == "uid_in_use"
    assert broker.get_all(broker.response_queue(uid)) == []


def test_flower_sees_each_request_as_a_task_named_by_its_uid(
    broker: Broker, start_worker: Any, worker_env: dict[str, str]
) -> None:
    """task-sent (from the bootstep) and task-succeeded events, uid as task id."""
    uid = new_uid()
    events = task_events(
        worker_env["RABBITMQ_URL"],
        uid,
        lambda: broker.publish({"uid": uid, "message": "Tell me a joke."}),
    )
    mine = [e["type"] for e in events if e.get("uuid") == uid]
    assert "task-sent" in mine
    assert "task-received" in mine
    assert "task-succeeded" in mine
    sent = next(e for e in events if e.get("uuid") == uid and e["type"] == "task-sent")
    assert sent["name"] == "chatqueue.stream_chat"
    # The request is summed up, its content is not shown.
    received = next(e for e in events if e.get("uuid") == uid and e["type"] == "task-received")
    assert "messages=1" in received["args"] and "joke" not in received["args"]


@pytest.mark.slow  # over 8 s
def test_response_queue_expires_when_nobody_reads_it(
    start_worker: Any, worker_env: dict[str, str], names: dict[str, str]
) -> None:
    env = {
        **worker_env,
        "RABBITMQ_QUEUE": names["RABBITMQ_QUEUE"] + "-ttl",
        "CHATQUEUE_NAMESPACE": names["CHATQUEUE_NAMESPACE"] + "-ttl",
        "RESPONSE_QUEUE_TTL": "2",
    }
    proc: Process = start_worker("ttl", env=env)
    client = Broker(env["RABBITMQ_URL"], env)
    try:
        uid = new_uid()
        client.publish({"uid": uid, "message": "nobody reads this"})
        queue = client.response_queue(uid)
        client.wait_for_queue(queue)
        # Left alone, it goes after 2 s. Watched with rabbitmqctl: a passive
        # declare would count as a use of the queue, and put its expiry off.
        wait_until(lambda: queue not in queue_names(queue), 30, "it never expired", interval=0.5)
    finally:
        client.channel.queue_delete(env["RABBITMQ_QUEUE"])
        client.close()
        proc.stop()


def test_a_response_queue_the_client_declared_its_own_way_is_used(broker: Broker) -> None:
    """Declared with other arguments (not durable, no x-expires): used as it is."""
    uid = new_uid()
    broker.channel.queue_declare(broker.response_queue(uid), auto_delete=False)
    broker.publish({"uid": uid, "message": "What is the capital of France?"})
    answer = broker.answer(uid)
    assert_protocol(answer, uid)
    assert answer.content == "The capital of France is Paris."
    broker.channel.queue_delete(broker.response_queue(uid))


def test_an_input_queue_of_another_type_is_named_not_retried_in_a_loop(
    worker_env: dict[str, str], names: dict[str, str], broker: Broker
) -> None:
    """RABBITMQ_QUEUE_TYPE=quorum on a deployment whose input and dead-letter
    queues are classic: the intake says what to do, and tries again now and
    then (the broker refuses every declare: a retry at once would spin)."""
    env = {**isolated(worker_env, names, "qtype"), "RABBITMQ_QUEUE_TYPE": "quorum"}
    dead_letter = env["CHATQUEUE_NAMESPACE"] + ".dead-letter"
    for queue in (env["RABBITMQ_QUEUE"], dead_letter):
        broker.channel.queue_declare(queue, durable=True)  # classic, as before
    worker = Process(
        [*procfile_command("worker"), "--hostname", f"qtype-{new_uid()}@%h"], env, "worker-qtype"
    )
    try:
        wait_until(
            lambda: "exists with another type" in worker.output() or not worker.alive,
            60,
            about("the intake never named the queue's type", worker),
        )
        assert worker.alive, worker.output()[-3000:]
        # No second try within two of RECONNECT_PAUSE (1 s): a loop that
        # retried at once, or at each reconnect, would have.
        holds_for(
            lambda: worker.output().count("exists with another type") == 1,
            2,
            about("the intake tried again at once", worker),
        )
        output = worker.output()
        assert output.count("exists with another type") == 1, output[-3000:]
        assert "declared apart" not in output
    finally:
        worker.kill()  # it pauses MISMATCH_PAUSE (10 s) between tries: no warm shutdown
        worker.remove_log()
        for queue in (env["RABBITMQ_QUEUE"], dead_letter, load_settings(env).task_queue):
            broker.channel.queue_delete(queue)
