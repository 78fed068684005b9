"""An upstream stream that ends cleanly but early (no finish_reason on any
choice, then [DONE] or EOF) is an error, through the real worker and RabbitMQ.
The development LLM cuts its stream on demand (``fault=truncate`` and
``fault=truncate_eof``, see devllm/server.py)."""

from __future__ import annotations

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
    requests_for,
    tag,
)

pytestmark = pytest.mark.usefixtures("worker")
FAULTS = ["truncate", "truncate_eof"]


def whole() -> str:
    return "".join(reply_tokens([{"role": "user", "content": PROMPT}], TOKENS))


@pytest.mark.parametrize("fault", FAULTS)
def test_a_stream_cut_after_some_tokens_ends_with_an_error(
    broker: Broker, llm: DevLLM, fault: str
) -> None:
    model = f"m;fault={fault};at=3;tag={tag()}"
    uid, answer = ask(broker, model)
    assert_broken_after(answer, 3, "llm_stream_incomplete", 502)
    error = answer.messages[-2]
    assert error.properties.correlation_id == uid
    assert error.json["error"]["type"] == "upstream_error"
    assert "finish_reason" in error.json["error"]["message"]
    assert not any(m.restart for m in answer.messages)
    assert requests_for(llm, model) == 1  # never retried after the first token


def test_a_usage_chunk_does_not_make_a_cut_stream_whole(broker: Broker, llm: DevLLM) -> None:
    """The usage chunk (choices: []) comes last whether or not the answer finished."""
    model = f"m;fault=truncate;at=2;tag={tag()}"
    _, answer = ask(broker, model, stream_options={"include_usage": True})
    kinds = [m.kind for m in answer.messages]
    assert kinds[-2:] == ["error", "done"]
    assert answer.chunks[-1]["choices"] == [] and answer.chunks[-1]["usage"]
    assert answer.content == "".join(
        reply_tokens([{"role": "user", "content": PROMPT}], TOKENS)[:2]
    )
    assert answer.messages[-2].json["error"]["code"] == "llm_stream_incomplete"
    assert answer.messages[-2].properties.headers["status"] == 502


def test_a_whole_stream_with_a_usage_chunk_is_whole(broker: Broker) -> None:
    """A finish_reason seen before the usage chunk counts."""
    _, answer = ask(broker, f"m;tag={tag()}", stream_options={"include_usage": True})
    assert [m.kind for m in answer.messages][-2:] == ["chunk", "done"]
    assert answer.chunks[-1]["choices"] == []
    assert answer.chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert answer.content == whole()
    assert not answer.errors


@pytest.mark.parametrize("fault", FAULTS)
def test_a_stream_cut_before_its_first_token_is_retried(
    broker: Broker, llm: DevLLM, fault: str
) -> None:
    """The opening chunk went out; the answer asked again replaces it."""
    model = f"m;fault={fault};at=0;times=1;tag={tag()}"
    uid, answer = ask(broker, model)
    opening, again = answer.split()
    assert [m.kind for m in opening.messages] == ["chunk"]
    assert opening.messages[0].json["choices"][0]["delta"]["role"] == "assistant"
    assert all(m.restart for m in again.messages)
    assert_protocol(again, uid)
    assert again.content == whole()
    assert requests_for(llm, model) == 2


def test_a_stream_always_cut_before_its_first_token_is_reported(
    broker: Broker, llm: DevLLM
) -> None:
    model = f"m;fault=truncate;at=0;tag={tag()}"
    _, answer = ask(broker, model)
    # Each retry starts the answer over (restart, seq 0): a reader keeps the last one.
    starts = [i for i, m in enumerate(answer.messages) if m.seq == 0]
    assert len(starts) == 3
    assert all(m.restart for m in answer.messages[starts[1] :])
    final = answer.messages[starts[-1] :]
    assert [m.kind for m in final] == ["chunk", "error", "done"]
    assert final[1].json["error"]["code"] == "llm_stream_incomplete"
    assert final[1].properties.headers["status"] == 502
    assert requests_for(llm, model) == 3  # LLM_MAX_RETRIES=2 in the tests
