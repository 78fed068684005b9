"""A dead or misbehaving LLM: error objects, retries before the first token,
and a clean end after it. The development LLM misbehaves on demand through
the model string (see devllm/server.py)."""

from __future__ import annotations

from typing import Any

import pytest

from devllm.answers import reply_tokens
from devllm.testing import DevLLM
from tests.support import (
    PROMPT,
    TOKENS,
    Broker,
    ask,
    assert_broken_after,
    assert_protocol,
    new_uid,
    requests_for,
    tag,
)

pytestmark = pytest.mark.usefixtures("worker")


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(400, "invalid_request_error"), (401, "authentication_error"), (404, "not_found_error")],
)
def test_client_errors_of_the_llm_end_the_stream_at_once(
    broker: Broker, llm: DevLLM, status: int, error_type: str
) -> None:
    model = f"m;status={status};tag={tag()}"
    uid, answer = ask(broker, model)
    assert [m.kind for m in answer.messages] == ["error", "done"]
    error = answer.messages[0]
    assert error.properties.headers["status"] == status
    assert error.properties.correlation_id == uid
    body = error.json["error"]
    assert set(body) == {"message", "type", "code", "param"}
    assert str(status) in body["message"]
    assert requests_for(llm, model) == 1  # not retried


def test_a_server_error_is_retried_then_reported(broker: Broker, llm: DevLLM) -> None:
    model = f"m;status=500;retry_after=0.05;tag={tag()}"
    _, answer = ask(broker, model)
    assert [m.kind for m in answer.messages] == ["error", "done"]
    assert answer.messages[0].properties.headers["status"] == 500
    assert requests_for(llm, model) == 3  # LLM_MAX_RETRIES=2 in the tests


def test_429_twice_then_success(broker: Broker, llm: DevLLM) -> None:
    model = f"m;status=429;times=2;retry_after=0.05;tag={tag()}"
    uid, answer = ask(broker, model)
    assert_protocol(answer, uid)
    assert answer.content == "".join(reply_tokens([{"role": "user", "content": PROMPT}], TOKENS))
    assert requests_for(llm, model) == 3


def test_a_timeout_before_the_first_token_is_retried(broker: Broker, llm: DevLLM) -> None:
    model = f"m;hang=10;times=1;tag={tag()}"  # LLM_READ_TIMEOUT=3 in the tests
    uid, answer = ask(broker, model)
    assert_protocol(answer, uid)
    assert answer.content
    assert requests_for(llm, model) == 2


def test_a_stream_broken_before_its_first_token_is_retried(broker: Broker, llm: DevLLM) -> None:
    """The opening chunk went out at once; the answer asked again replaces it."""
    model = f"m;fault=disconnect;at=0;times=1;tag={tag()}"
    uid, answer = ask(broker, model)
    opening, again = answer.split()
    assert [m.kind for m in opening.messages] == ["chunk"]
    assert opening.messages[0].json["choices"][0]["delta"]["role"] == "assistant"
    assert opening.content == ""
    assert all(m.restart for m in again.messages)
    assert_protocol(again, uid)
    assert again.content == "".join(reply_tokens([{"role": "user", "content": PROMPT}], TOKENS))
    assert requests_for(llm, model) == 2


def test_a_disconnect_mid_stream_ends_with_an_error(broker: Broker, llm: DevLLM) -> None:
    model = f"m;fault=disconnect;at=3;tag={tag()}"
    _, answer = ask(broker, model)
    assert_broken_after(answer, 3, "llm_stream_interrupted", 502)
    assert requests_for(llm, model) == 1  # never retried after the first token


def test_a_malformed_chunk_ends_with_an_error(broker: Broker) -> None:
    _, answer = ask(broker, f"m;fault=malformed;at=2;tag={tag()}")
    assert_broken_after(answer, 2, "llm_stream_interrupted", 502)


def test_an_error_object_in_the_stream_is_passed_on(broker: Broker, llm: DevLLM) -> None:
    """An LLM that fails mid-answer sends an error object as a data: payload."""
    model = f"m;fault=error;at=2;tag={tag()}"
    _, answer = ask(broker, model)
    assert_broken_after(answer, 2, "model_error", 502)
    error = answer.messages[-2].json["error"]
    assert error["type"] == "server_error"
    assert "failed mid-answer" in error["message"]
    assert requests_for(llm, model) == 1


def test_an_error_object_as_a_whole_answer_is_passed_on(broker: Broker) -> None:
    _, answer = ask(broker, f"m;fault=error;tag={tag()}", stream=False)
    assert [m.kind for m in answer.messages] == ["error", "done"]
    assert answer.messages[0].json["error"]["code"] == "model_error"
    assert answer.messages[0].properties.headers["status"] == 502


def test_a_stall_past_the_timeout_ends_with_an_error(broker: Broker) -> None:
    _, answer = ask(broker, f"m;fault=stall;at=4;stall=30;tag={tag()}")
    assert_broken_after(answer, 4, "llm_timeout", 504)


def test_a_non_streaming_failure_is_one_error(broker: Broker) -> None:
    uid, answer = ask(broker, f"m;status=404;tag={tag()}", stream=False)
    assert [m.kind for m in answer.messages] == ["error", "done"]
    assert answer.messages[0].properties.correlation_id == uid


def test_a_refused_connection_is_retried_then_reported(
    start_worker: Any, worker_env: dict[str, str], names: dict[str, str]
) -> None:
    env = {
        **worker_env,
        "OPENAI_URL": "http://127.0.0.1:9/v1",
        "RABBITMQ_QUEUE": names["RABBITMQ_QUEUE"] + "-dead-llm",
        "CHATQUEUE_NAMESPACE": names["CHATQUEUE_NAMESPACE"] + "-dead-llm",
    }
    proc = start_worker("dead-llm", env=env)
    client = Broker(env["RABBITMQ_URL"], env)
    try:
        uid = new_uid()
        client.publish({"uid": uid, "message": PROMPT})
        answer = client.answer(uid, timeout=60)
        assert [m.kind for m in answer.messages] == ["error", "done"]
        error = answer.messages[0]
        assert error.json["error"]["code"] == "llm_unreachable"
        assert error.properties.headers["status"] == 502
        assert proc.output().count("Retrying request") == 2  # LLM_MAX_RETRIES=2
    finally:
        client.channel.queue_delete(env["RABBITMQ_QUEUE"])
        client.close()
        proc.stop()
