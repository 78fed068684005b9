"""config/upstreams.py: UPSTREAMS_FILE, routing by model, and errors that name what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.upstreams import UpstreamsError, default_upstreams, load_upstreams

GOOD = """
[[upstream]]
name = "local"
url = "http://localhost:11434/v1"
api_key = "none"
models = ["llama*", "qwen2.5:7b"]
max_in_flight = 2
fallback = ["cloud"]

[[upstream]]
name = "cloud"
url = "https://api.example.com/v1"
api_key_env = "CLOUD_KEY"
models = ["gpt-*", "llama*"]
max_in_flight = 0
rpm = 600
forward_service_tier = true
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "upstreams.toml"
    path.write_text(text)
    return str(path)


def test_a_file_routes_each_model_to_the_first_upstream_that_serves_it(tmp_path: Path) -> None:
    ups = load_upstreams(write(tmp_path, GOOD), {"CLOUD_KEY": "sk-1"})
    assert ups.names == ["local", "cloud"]
    local, cloud = ups.all
    assert (local.max_in_flight, local.fallback, local.rpm) == (2, ("cloud",), 0)
    assert (cloud.api_key, cloud.rpm, cloud.forward_service_tier) == ("sk-1", 600, True)
    assert ups.route("llama3") is local
    assert ups.route("qwen2.5:7b") is local
    assert ups.route("gpt-4o") is cloud
    assert ups.route("mistral") is None
    assert local.listed_models == ["qwen2.5:7b"]


def test_without_a_file_one_default_upstream_serves_every_model() -> None:
    ups = default_upstreams("http://localhost:11434/v1", "k", 4)
    assert ups.names == ["default"]
    assert ups.route("anything at all") is ups.all[0]
    assert ups.all[0].max_in_flight == 4


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[[upstream]]\nname='a'\n", "#1 (name 'a'), key 'url'"),
        (
            GOOD.replace("max_in_flight = 2", "max_in_flight = -1"),
            "#1 (name 'local'), key 'max_in_flight'",
        ),
        (GOOD.replace("max_in_flight = 2", ""), "key 'max_in_flight': required"),
        (
            GOOD.replace('fallback = ["cloud"]', 'fallback = ["nowhere"]'),
            "no upstream is named 'nowhere'",
        ),
        (
            GOOD.replace('fallback = ["cloud"]', 'fallback = ["local"]'),
            "cannot fall back on itself",
        ),
        (GOOD.replace('name = "cloud"', 'name = "local"'), "#2 (name 'local'), key 'name'"),
        (GOOD.replace("rpm = 600", "rpm = 0"), "#2 (name 'cloud'), key 'rpm'"),
        (GOOD.replace('models = ["gpt-*", "llama*"]', "models = []"), "key 'models'"),
        (
            GOOD.replace("max_in_flight = 2", "max_in_flight = 2\nmax_inflight = 3"),
            "key 'max_inflight': unknown",
        ),
        (GOOD.replace('api_key = "none"', ""), "key 'api_key': required"),
        ("upstream = 3", "no [[upstream]] table"),
        ("[[upstream]\n", "not valid TOML"),
    ],
)
def test_a_bad_file_is_named_with_its_table_and_key(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UpstreamsError) as caught:
        load_upstreams(path, {"CLOUD_KEY": "sk-1"})
    assert path in str(caught.value)
    assert words in str(caught.value)


def test_a_key_from_a_missing_variable_is_named(tmp_path: Path) -> None:
    with pytest.raises(UpstreamsError, match=r"#2 .*api_key_env.*CLOUD_KEY is not set"):
        load_upstreams(write(tmp_path, GOOD), {})


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(UpstreamsError, match=r"nowhere\.toml: cannot be read"):
        load_upstreams(str(tmp_path / "nowhere.toml"), {})
