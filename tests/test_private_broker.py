"""The web front and the worker across a broker restart, on a RabbitMQ node of
the tests' own (tests/conftest.py): the shared broker is never disturbed."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import websocket

from chatqueue_testing.rabbitnode import RabbitNode
from devllm.testing import DevLLM
from tests.support import (
    PrivateStack,
    chat,
    content_of,
    expected,
    new_uid,
    receive_all,
    stream,
    submit,
    wait_until,
    ws_request,
    ws_url,
)

# Each test restarts a private RabbitMQ node.
pytestmark = pytest.mark.slow


def test_submissions_go_on_after_a_broker_restart(
    rabbit_node: RabbitNode,
    private_stack: Callable[..., PrivateStack],
) -> None:
    """Fresh and chosen uids alike: the web process's connections died with the
    broker, and the next submission takes new ones (202, then the answer)."""
    web = private_stack("private").web
    before = submit(web, chat("before", uid=f"mine-{new_uid()}"))
    assert stream(web, before).content == expected("before")

    rabbit_node.restart_app()

    for prompt, uid in (("chosen", f"mine-{new_uid()}"), ("fresh", None)):
        fields = {"uid": uid} if uid else {}
        accepted = submit(web, chat(prompt, **fields))
        assert stream(web, accepted, timeout=60).content == expected(prompt)


def times_asked(llm: DevLLM, prompt: str) -> int:
    """How many times the LLM was asked ``prompt`` (of its last requests)."""
    return sum(prompt in json.dumps(r) for r in llm.stats()["last_requests"])


def test_a_drop_in_stream_goes_on_across_a_broker_restart(
    rabbit_node: RabbitNode,
    private_stack: Callable[..., PrivateStack],
    llm: DevLLM,
) -> None:
    """Its answer comes to the web process's reply queue, which outlives the
    connection: the web process reconnects and reads it again, the worker
    goes on and writes again what it had written (skipped), and the client
    gets the whole answer, no error, from the LLM asked once: its reply
    address does not go with the connection."""
    stack = private_stack("private-dropin")
    client = openai.OpenAI(base_url=stack.web.url + "/openai/v1", api_key="x", max_retries=0)
    prompt = f"a long answer {new_uid()}"
    stream = client.chat.completions.create(
        model="m;tokens=60;delay=0.15",
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        timeout=120,
    )
    chunks = iter(stream)
    text = [c.choices[0].delta.content or "" for c in itertools.islice(chunks, 5)]
    rabbit_node.restart_app()
    text += [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(text) == expected(prompt, 60)
    assert times_asked(llm, prompt) == 1
    log = stack.web.output()
    assert "publisher: reconnected after" in log
    assert "submitting it again" not in log


def test_a_websocket_answer_goes_on_across_a_broker_restart(
    rabbit_node: RabbitNode,
    private_stack: Callable[..., PrivateStack],
    llm: DevLLM,
) -> None:
    """The same for a WebSocket answer under way: the whole answer, no error
    frame, on the same socket, and the LLM asked once."""
    stack = private_stack("private-ws-on")
    prompt = f"a WebSocket stream across a broker restart {new_uid()}"
    ws = websocket.create_connection(ws_url(stack.web), timeout=120)
    try:
        ws.send(ws_request(prompt, model="m;tokens=60;delay=0.15"))
        frames = [ws.recv() for _ in range(5)]  # the answer has begun
        rabbit_node.restart_app()
        frames += receive_all(ws)
        assert not [f for f in frames if '"error"' in f], frames[-3:]
        assert content_of([f for f in frames if isinstance(f, str)]) == expected(prompt, 60)
    finally:
        ws.close()
    assert times_asked(llm, prompt) == 1


def test_a_drop_in_answer_not_begun_survives_a_broker_restart(
    rabbit_node: RabbitNode,
    private_stack: Callable[..., PrivateStack],
    llm: DevLLM,
) -> None:
    """A non-streaming drop-in request whose answer is still being made when
    RabbitMQ restarts: the web front reads its reply queue again on a new
    connection, and the SDK gets its completion from the LLM asked once."""
    stack = private_stack("private-dropin-again", LLM_READ_TIMEOUT="30")
    client = openai.OpenAI(base_url=stack.web.url + "/openai/v1", api_key="x", max_retries=0)
    prompt = f"a completion across a broker restart {new_uid()}"
    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(
            client.chat.completions.create,
            model="m;tokens=30;delay=0.2",  # 6 s of answer, sent whole at the end
            messages=[{"role": "user", "content": prompt}],
            stream=False,
            timeout=120,
        )
        # The worker has asked the LLM: the answer is being made.
        wait_until(lambda: times_asked(llm, prompt) == 1, 30, "the LLM was never asked")
        rabbit_node.restart_app()
        completion = asked.result()
    assert completion.choices[0].message.content == expected(prompt, 30)
    assert times_asked(llm, prompt) == 1  # read again from the reply queue, not asked again
    assert "publisher: reconnected after" in stack.web.output()


def test_a_websocket_answer_not_begun_survives_a_broker_restart(
    rabbit_node: RabbitNode,
    private_stack: Callable[..., PrivateStack],
    llm: DevLLM,
) -> None:
    """The same on the WebSocket: a request whose answer has not begun when
    RabbitMQ restarts is read again, and the client gets the whole answer,
    no error, on the same socket."""
    stack = private_stack("private-ws-again", LLM_READ_TIMEOUT="30")
    prompt = f"a WebSocket answer across a broker restart {new_uid()}"
    ws = websocket.create_connection(ws_url(stack.web), timeout=120)
    try:
        ws.send(
            ws_request(prompt, model="m;tokens=30;delay=0.2", stream=False)
        )  # 6 s, whole at the end
        wait_until(lambda: times_asked(llm, prompt) == 1, 30, "the LLM was never asked")
        rabbit_node.restart_app()
        frames = receive_all(ws)
        assert len(frames) == 2, frames  # the completion, [DONE]
        completion = json.loads(frames[0])
        assert completion["choices"][0]["message"]["content"] == expected(prompt, 30)
        # The socket goes on: the next request is answered.
        ws.send(ws_request("and after it", model="m;tokens=3"))
        assert content_of(receive_all(ws)) == expected("and after it", 3)
    finally:
        ws.close()
    assert times_asked(llm, prompt) == 1
    assert "publisher: reconnected after" in stack.web.output()
