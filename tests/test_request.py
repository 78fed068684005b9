"""app/request.py: both request shapes, and every way a request can be wrong."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.errors import BodyTooLarge, RequestError
from app.request import decode_body, is_valid_uid, parse_request


def parse(data: dict[str, Any], **kw: Any) -> Any:
    return parse_request(data, default_model="default-model", **kw)


def test_simple_shape() -> None:
    r = parse({"key": "123e4567-e89b-12d3-a456-426614174000", "message": "Hi?"})
    assert r.uid == "123e4567-e89b-12d3-a456-426614174000"
    assert r.messages == [{"role": "user", "content": "Hi?"}]
    assert (r.model, r.stream, r.username) == ("default-model", True, "anonymous")


def test_chat_shape_with_passthrough_and_unknown_fields() -> None:
    r = parse(
        {
            "uid": "u1",
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "x"}],
            "stream": False,
            "username": "alice",
            "temperature": 0.2,
            "max_tokens": 5,
            "stop": ["\n"],
            "stream_options": {"include_usage": True},
            "evil": "drop me",
        }
    )
    assert (r.model, r.stream, r.username) == ("gpt-4o", False, "alice")
    # stream_options only make sense when streaming; unknown fields are not forwarded
    assert r.params == {"temperature": 0.2, "max_tokens": 5, "stop": ["\n"]}


def test_correlation_id_is_the_uid_of_last_resort() -> None:
    assert parse({"message": "x"}, correlation_id="c-1").uid == "c-1"
    assert parse({"message": "x", "uid": "u"}, correlation_id="c-1").uid == "u"


@pytest.mark.parametrize("uid", ["a", "A-z_0.9:x", "x" * 128])
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "../x", "x" * 129, "a b", "ünï", "a/b", 5, None])
def test_hostile_uids(uid: object) -> None:
    assert not is_valid_uid(uid)
    if uid is not None:
        with pytest.raises(RequestError) as info:
            parse({"uid": uid, "message": "x"})
        assert info.value.code == "invalid_uid"
        assert info.value.uid is None  # never used as a queue name


@pytest.mark.parametrize(
    ("data", "code", "param"),
    [
        ({"uid": "u"}, "missing_messages", "messages"),
        ({"message": "x"}, "missing_uid", "uid"),
        ({"uid": "u", "messages": "hello"}, "invalid_type", "messages"),
        ({"uid": "u", "messages": []}, "invalid_type", "messages"),
        ({"uid": "u", "messages": [5]}, "invalid_type", "messages[0]"),
        (
            {"uid": "u", "messages": [{"role": "king", "content": "x"}]},
            "invalid_type",
            "messages[0].role",
        ),
        (
            {"uid": "u", "messages": [{"role": "user", "content": 3}]},
            "invalid_type",
            "messages[0].content",
        ),
        ({"uid": "u", "message": ""}, "invalid_type", "message"),
        ({"uid": "u", "message": "x", "stream": "yes"}, "invalid_type", "stream"),
        ({"uid": "u", "message": "x", "model": 5}, "invalid_type", "model"),
        ({"uid": "u", "message": "x", "temperature": "hot"}, "invalid_type", "temperature"),
        ({"uid": "u", "message": "x", "max_tokens": True}, "invalid_type", "max_tokens"),
    ],
)
def test_wrong_types_say_which_field(data: dict[str, Any], code: str, param: str) -> None:
    with pytest.raises(RequestError) as info:
        parse(data, reply_to="rq")
    assert (info.value.code, info.value.param) == (code, param)
    assert info.value.reply_to == "rq"
    assert info.value.to_error_object()["error"]["type"] == "invalid_request_error"


def test_uid_is_known_on_errors_so_the_client_can_be_told() -> None:
    with pytest.raises(RequestError) as info:
        parse({"uid": "good-uid", "messages": "nope"})
    assert info.value.uid == "good-uid"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"uid": "u", "message": ', "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'"just a string"', "invalid_json"),
        (b"\xff\xfe{}", "invalid_encoding"),
    ],
)
def test_undecodable_bodies(body: bytes, code: str) -> None:
    with pytest.raises(RequestError) as info:
        decode_body(body, 1000)
    assert info.value.code == code


def test_body_size_limit() -> None:
    body = json.dumps({"uid": "u", "message": "x" * 2000}).encode()
    with pytest.raises(BodyTooLarge) as info:
        decode_body(body, 1000)
    assert info.value.status == 413
    assert decode_body(body, len(body))["uid"] == "u"
