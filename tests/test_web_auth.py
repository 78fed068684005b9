"""``API_KEYS``: no key, a wrong key, and another key's uid."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.support import Web, fetch, new_uid, read_sse

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}
BODY = {"messages": [{"role": "user", "content": "Say hello."}]}


def code_of(raw: bytes) -> Any:
    return json.loads(raw)["error"]["code"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-alice"}],
    ids=["no key", "wrong key", "not bearer"],
)
def test_every_route_needs_a_valid_key(keyed_web: Web, headers: dict[str, str]) -> None:
    for method, path, body in [
        ("POST", "/v1/chat/completions", BODY),
        ("GET", "/v1/chat/response?uid=abc", None),
        ("POST", "/openai/v1/chat/completions", BODY),
        ("GET", "/openai/v1/models", None),
    ]:
        status, answer_headers, raw = fetch(method, keyed_web.url + path, body, headers)
        assert status == 401, (path, raw)
        assert code_of(raw) == "invalid_api_key"
        assert answer_headers["WWW-Authenticate"] == "Bearer"


def test_ping_healthz_and_the_page_need_none(keyed_web: Web) -> None:
    assert fetch("GET", keyed_web.url + "/ping")[0] == 200
    assert fetch("GET", keyed_web.url + "/healthz")[0] == 200
    status, _, page = fetch("GET", keyed_web.url + "/")
    assert status == 200
    assert b"<html" in page
    assert fetch("GET", keyed_web.url + "/static/playground.js")[0] == 200


def test_a_stream_is_read_only_with_the_key_that_submitted_it(keyed_web: Web) -> None:
    status, _, raw = fetch("POST", keyed_web.url + "/v1/chat/completions", BODY, ALICE)
    assert status == 202
    uid = json.loads(raw)["uid"]
    url = f"{keyed_web.url}/v1/chat/response?uid={uid}"
    assert read_sse(url).status == 401
    as_bob = read_sse(url, BOB)
    assert as_bob.status == 404  # another key's uid is no uid at all
    assert code_of(as_bob.body) == "unknown_uid"
    as_alice = read_sse(url, ALICE)
    assert as_alice.status == 200
    assert as_alice.content == "Hello!"


def test_with_keys_a_uid_is_bound_to_the_key_that_got_it(keyed_web: Web) -> None:
    """A uid a client makes up is refused; another key's uid is refused; the
    owner sending its own unread uid again is a duplicate."""
    made_up = {**BODY, "uid": f"shared-{new_uid()}"}
    status, _, raw = fetch("POST", keyed_web.url + "/v1/chat/completions", made_up, ALICE)
    assert status == 400 and code_of(raw) == "invalid_uid"

    body = {**BODY, "model": "m;first_delay=1"}
    status, _, raw = fetch("POST", keyed_web.url + "/v1/chat/completions", body, ALICE)
    assert status == 202
    uid = json.loads(raw)["uid"]
    status, _, raw = fetch(
        "POST", keyed_web.url + "/v1/chat/completions", {**body, "uid": uid}, BOB
    )
    assert status == 400 and code_of(raw) == "invalid_uid"
    status, _, raw = fetch(
        "POST", keyed_web.url + "/v1/chat/completions", {**body, "uid": uid}, ALICE
    )
    assert status == 409 and code_of(raw) == "uid_in_use"
    url = f"{keyed_web.url}/v1/chat/response?uid={uid}"
    assert read_sse(url, BOB).status == 404
    assert read_sse(url, ALICE).content == "Hello!"


def test_the_openai_sdk_with_keys(keyed_web: Web) -> None:
    base = keyed_web.url + "/openai/v1"
    wrong = OpenAI(base_url=base, api_key="wrong", max_retries=0)
    with wrong, pytest.raises(openai.AuthenticationError) as denied:
        wrong.chat.completions.create(model="gpt-4o", messages=BODY["messages"])  # type: ignore[arg-type]
    assert denied.value.code == "invalid_api_key"
    with OpenAI(base_url=base, api_key="key-bob", max_retries=0) as client:
        answer = client.chat.completions.create(model="gpt-4o", messages=BODY["messages"])  # type: ignore[arg-type]
        assert answer.choices[0].message.content == "Hello!"
        assert client.models.list().data


def test_reading_at_once_after_submitting(keyed_web: Web) -> None:
    """A stream read the moment it was submitted, with its key."""
    for i in range(10):
        body = {"messages": [{"role": "user", "content": f"at once {i}"}]}
        status, _, raw = fetch("POST", keyed_web.url + "/v1/chat/completions", body, ALICE)
        assert status == 202
        url = f"{keyed_web.url}/v1/chat/response?uid={json.loads(raw)['uid']}"
        assert read_sse(url, ALICE, timeout=20).events[-1].data == "[DONE]"
