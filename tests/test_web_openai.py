"""The OpenAI drop-in with the official openai SDK: ``base_url=<web>/openai/v1``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from openai import OpenAI

from devllm.answers import reply_tokens
from devllm.testing import DevLLM
from tests.support import Broker, Web, WebFactory, fetch, new_uid, requests_for

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def client(web: Web) -> Iterator[OpenAI]:
    # No retries: each error must reach the test as the SDK's exception.
    with OpenAI(base_url=web.url + "/openai/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_non_streaming_returns_a_real_chat_completion(client: OpenAI, broker: Broker) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=FRANCE)  # type: ignore[arg-type]
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "The capital of France is Paris."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    uid = raw.headers["X-Chatqueue-Uid"]
    assert not broker.queue_exists(broker.response_queue(uid))


def test_streaming_returns_real_chunks(client: OpenAI, broker: Broker) -> None:
    prompt = [{"role": "user", "content": "Describe a harbor at night."}]
    with client.chat.completions.with_streaming_response.create(
        model="m;tokens=30;delay=0.01",
        messages=prompt,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        uid = response.headers["X-Chatqueue-Uid"]
        chunks = list(response.parse())
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "".join(reply_tokens(prompt, 30))
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 30
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 30
    assert not broker.queue_exists(broker.response_queue(uid))


def test_sampling_fields_pass_through(client: OpenAI, llm: DevLLM) -> None:
    completion = client.chat.completions.create(
        model="m;tokens=40",
        messages=FRANCE,
        max_tokens=3,
        temperature=0.2,
        seed=7,  # type: ignore[arg-type]
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "The capital of"
    sent = [r for r in llm.stats()["last_requests"] if isinstance(r, dict)][-1]
    assert (sent["max_tokens"], sent["temperature"], sent["seed"]) == (3, 0.2, 7)


# The LLM's errors (the worker retries 5xx, then gives up) and the web's own,
# each the SDK's own exception class. A 429 is no error: the request waits
# again (below).
LLM_ERRORS = [
    ("m;status=400", openai.BadRequestError, 400),
    ("m;status=401", openai.AuthenticationError, 401),
    ("m;status=403", openai.PermissionDeniedError, 403),
    ("m;status=404", openai.NotFoundError, 404),
    ("m;status=500", openai.InternalServerError, 500),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_llm_errors_are_the_sdks_exceptions(client: OpenAI, stream: bool) -> None:
    def call(case: tuple[str, type[openai.APIStatusError], int]) -> None:
        model, exception, status = case
        with pytest.raises(exception) as caught:
            answer = client.chat.completions.create(model=model, messages=FRANCE, stream=stream)  # type: ignore[call-overload]
            if stream:
                list(answer)
        assert caught.value.status_code == status
        body: Any = caught.value.body
        assert {"message", "type", "code"} <= set(body), body

    # In parallel: the worker's retries of 429 and 5xx take a few seconds.
    with ThreadPoolExecutor(len(LLM_ERRORS)) as pool:
        list(pool.map(call, LLM_ERRORS))


def test_an_llm_that_answers_429_until_the_queue_timeout_is_a_504(
    client: OpenAI, llm: DevLLM
) -> None:
    """An LLM that rate-limits on and on: the request waits again after each
    pause (never an error of its own), until its ``queue_timeout``: a 504 with
    the code ``queue_timeout``, which the SDK is told not to retry."""
    model = f"m;status=429;retry_after=0.3;tag={new_uid()}"
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model=model,
            messages=FRANCE,
            extra_body={"queue_timeout": 1.5},  # type: ignore[arg-type]
        )
    assert caught.value.status_code == 504
    assert caught.value.code == "queue_timeout"
    assert caught.value.response.headers["x-should-retry"] == "false"
    asked = requests_for(llm, model)
    assert 2 <= asked <= 6, asked  # once per pause of 0.3 s, in 1.5 s: not the SDK's retries


def test_web_errors_are_the_sdks_exceptions(client: OpenAI, web: Web) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="gpt-4o", messages=[])
    assert bad.value.code == "invalid_type"
    assert bad.value.param == "messages"

    # A uid whose answer waits unread in its queue is taken.
    uid = new_uid()
    body = {"uid": uid, "model": "m;first_delay=1", "messages": FRANCE}
    assert fetch("POST", web.url + "/v1/chat/completions", body)[0] == 202
    with pytest.raises(openai.ConflictError) as taken:
        client.chat.completions.create(model="gpt-4o", messages=FRANCE, extra_body={"uid": uid})  # type: ignore[arg-type]
    assert taken.value.code == "uid_in_use"


def test_an_error_mid_stream_raises_in_the_sdk(client: OpenAI) -> None:
    # The LLM drops the connection after 3 tokens: the worker reports it as
    # an error object, which the SDK raises while iterating.
    stream = client.chat.completions.create(
        model="m;fault=disconnect;at=3;tokens=10",
        messages=FRANCE,
        stream=True,  # type: ignore[arg-type]
    )
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk)
    assert len([c for c in received if c.choices and c.choices[0].delta.content]) == 3
    assert "broke off" in str(caught.value) or "LLM" in str(caught.value)


def test_broker_down_is_503(down_web: Web) -> None:
    c = OpenAI(base_url=down_web.url + "/openai/v1", api_key="k", max_retries=0)
    with c, pytest.raises(openai.InternalServerError) as unavailable:
        c.chat.completions.create(model="gpt-4o", messages=FRANCE)  # type: ignore[arg-type]
    assert unavailable.value.status_code == 503
    assert unavailable.value.code == "broker_unavailable"


def test_no_answer_in_time_is_504_and_cancels(start_web: WebFactory) -> None:
    slow = start_web("slow", WEB_ANSWER_TIMEOUT="1")
    try:
        with OpenAI(base_url=slow.url + "/openai/v1", api_key="k", max_retries=0) as c:
            started = time.monotonic()
            with pytest.raises(openai.InternalServerError) as late:
                # The LLM sends nothing for 2.5 s (under LLM_READ_TIMEOUT).
                c.chat.completions.create(model="m;hang=2.5", messages=FRANCE, stream=True)  # type: ignore[arg-type]
            assert late.value.status_code == 504
            assert late.value.code == "answer_timeout"
            assert time.monotonic() - started < 2.5
        assert "cancelling the LLM call" in slow.output()
    finally:
        slow.stop()


def test_models_lists_the_llms_models_with_openai_model_first(client: OpenAI, web: Web) -> None:
    models = [m.id for m in client.models.list()]
    assert models[0] == "devllm"  # OPENAI_MODEL of the tests
    assert {"gpt-4o", "llama3.2"} <= set(models)
    status, _, raw = fetch("GET", web.url + "/openai/v1/models")
    assert status == 200
    assert json.loads(raw)["object"] == "list"
