"""The web front and the worker across a broker restart, on a RabbitMQ node of
the tests' own (tests/brokers.py): the shared broker is never disturbed."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import websocket

from bench.rabbitnode import RabbitNode
from tests.conftest import new_uid
from tests.support import PrivateStack
from tests.test_web import chat, expected, stream, submit
from tests.test_web_ws import content_of, receive_all, request, ws_url

pytest_plugins = ["tests.brokers"]


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


def test_a_drop_in_answer_ends_with_an_error_when_the_broker_restarts(
    rabbit_node: RabbitNode,
    private_stack: Callable[..., PrivateStack],
) -> None:
    """Its answer came by direct reply-to on the connection that broke: the
    client gets an error at once, not keep-alive comments for ever (its
    answer had begun: it cannot be asked again)."""
    web = private_stack("private-dropin").web
    client = openai.OpenAI(base_url=web.url + "/openai/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="m;tokens=200;delay=0.2",
        messages=[{"role": "user", "content": "a long answer"}],
        stream=True,
        timeout=60,
    )
    chunks = iter(stream)
    next(chunks)  # the answer has begun
    rabbit_node.restart_app()
    started = time.monotonic()
    with pytest.raises(openai.APIError):
        for _ in chunks:
            pass
    assert time.monotonic() - started < 20


def test_a_drop_in_answer_not_begun_survives_a_broker_restart(
    rabbit_node: RabbitNode,
    private_stack: Callable[..., PrivateStack],
) -> None:
    """A non-streaming drop-in request whose answer is still being made when
    RabbitMQ restarts: nothing was sent to the client yet, so the web front
    submits it again on a new connection, and the SDK gets its completion."""
    stack = private_stack("private-dropin-again", LLM_READ_TIMEOUT="30")
    client = openai.OpenAI(base_url=stack.web.url + "/openai/v1", api_key="x", max_retries=0)
    prompt = "a completion across a broker restart"
    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(
            client.chat.completions.create,
            model="m;tokens=30;delay=0.2",  # 6 s of answer, sent whole at the end
            messages=[{"role": "user", "content": prompt}],
            stream=False,
            timeout=120,
        )
        time.sleep(2)
        rabbit_node.restart_app()
        completion = asked.result()
    assert completion.choices[0].message.content == expected(prompt, 30)
    assert "before its answer began; submitting it again" in stack.web.output()


def test_a_websocket_answer_not_begun_survives_a_broker_restart(
    rabbit_node: RabbitNode,
    private_stack: Callable[..., PrivateStack],
) -> None:
    """The same on the WebSocket: a request whose answer has not begun when
    RabbitMQ restarts is submitted again, and the client gets the whole
    answer, no error, on the same socket (an error and a close before)."""
    stack = private_stack("private-ws-again", LLM_READ_TIMEOUT="30")
    prompt = "a WebSocket answer across a broker restart"
    ws = websocket.create_connection(ws_url(stack.web), timeout=120)
    try:
        ws.send(
            request(prompt, model="m;tokens=30;delay=0.2", stream=False)
        )  # 6 s, whole at the end
        time.sleep(2)
        rabbit_node.restart_app()
        frames = receive_all(ws)
        assert len(frames) == 2, frames  # the completion, [DONE]
        completion = json.loads(frames[0])
        assert completion["choices"][0]["message"]["content"] == expected(prompt, 30)
        # The socket goes on: the next request is answered.
        ws.send(request("and after it", model="m;tokens=3"))
        assert content_of(receive_all(ws)) == expected("and after it", 3)
    finally:
        ws.close()
    assert "before its answer began; submitting it again" in stack.web.output()
