"""config/: the environment read in one place, bad values named at start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.broker import dead_letter_queue, input_queue, response_queue_arguments, task_queue
from config import ConfigError, load_settings
from config.celery import celery_config
from tests.support import BIN, ROOT, environ


def test_defaults_are_the_contract() -> None:
    s = load_settings({})
    assert s.rabbitmq_url == "amqp://guest:guest@localhost:5672/"
    assert s.rabbitmq_queue == "default-queue"
    assert s.response_queue_prefix == "response_"
    assert s.openai_api_key == "dummy-token"
    assert s.openai_url == "http://localhost:11434/v1"
    assert s.openai_model == "deepseek-r1:8b"
    assert s.log_level == "info"
    assert s.port == 8080
    assert s.response_queue("abc") == "response_abc"


def test_values_are_parsed_and_typed() -> None:
    s = load_settings(
        {
            "RESPONSE_QUEUE_TTL": "30",
            "LLM_READ_TIMEOUT": "2.5",
            "LOG_LEVEL": "WARN",
            "API_KEYS": "a, b,,c",
            "CONFIRM_CHUNKS": "yes",
        }
    )
    assert s.response_queue_ttl == 30
    assert s.llm_read_timeout == 2.5
    assert s.log_level == "warning"
    assert s.api_keys == frozenset({"a", "b", "c"})
    assert s.confirm_chunks is True


@pytest.mark.parametrize(
    ("var", "value", "words"),
    [
        ("RABBITMQ_URL", "http://localhost", "amqp://"),
        ("OPENAI_URL", "localhost:11434", "http://"),
        ("RESPONSE_QUEUE_TTL", "0", "at least 1"),
        ("RESPONSE_QUEUE_TTL", "ten", "invalid literal"),
        ("LLM_READ_TIMEOUT", "-1", "greater than 0"),
        ("LOG_LEVEL", "loud", "one of debug"),
        ("RABBITMQ_QUEUE", "a queue", "A-Z a-z"),
        ("CONFIRM_CHUNKS", "maybe", "true or false"),
        ("RABBITMQ_URL", "amqp://a/;http://b/", "amqp://"),
        ("RABBITMQ_URL", "amqp://a/;;amqp://b/", "empty URL"),
        ("RABBITMQ_QUEUE_TYPE", "stream", "classic, quorum"),
        ("RESPONSE_QUEUE_TYPE", "mirrored", "classic, quorum"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_fix(var: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({var: value})
    assert f"{var}=" in str(info.value)
    assert words in str(info.value)


def test_secrets_are_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"RABBITMQ_URL": "http://user:secret@host"})
    assert "secret" not in str(info.value)


def test_the_worker_refuses_to_start_on_a_bad_value() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "app", "worker"],
        check=False,
        env=environ(RESPONSE_QUEUE_TTL="-5"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "RESPONSE_QUEUE_TTL='-5'" in result.stderr + result.stdout


@pytest.mark.parametrize("command", [["celery", "-A", "app", "worker"], ["gunicorn", "web:app"]])
def test_a_bad_upstreams_file_stops_the_process_at_start(
    command: list[str], tmp_path: Path
) -> None:
    """The worker and the web front refuse to start, naming the file, the table and the key."""
    bad = tmp_path / "upstreams.toml"
    bad.write_text(
        '[[upstream]]\nname = "local"\nurl = "http://x/v1"\napi_key = "k"\nmodels = ["*"]\n'
    )
    argv = (
        [sys.executable, "-m", *command]
        if command[0] == "celery"
        else [str(BIN / "gunicorn"), *command[1:]]
    )
    result = subprocess.run(
        argv,
        check=False,
        env=environ(UPSTREAMS_FILE=str(bad)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    said = result.stderr + result.stdout
    assert f"UPSTREAMS_FILE {bad}: [[upstream]] #1 (name 'local'), key 'max_in_flight'" in said


def test_deployments_that_differ_in_input_queue_never_share_a_task_queue() -> None:
    default = load_settings({})
    a = load_settings({"RABBITMQ_QUEUE": "team-a"})
    b = load_settings({"RABBITMQ_QUEUE": "team-b"})
    assert default.task_queue == "chatqueue.running"
    assert len({default.task_queue, a.task_queue, b.task_queue}) == 3
    assert a.task_queue.startswith("chatqueue.")  # still chatqueue's own (reply_to rule)
    for queues in (default.deployment_queues, a.deployment_queues):
        assert all(q.startswith("chatqueue.") for q in queues[1:])
    assert set(a.deployment_queues[1:-1]).isdisjoint(default.deployment_queues)


def test_a_cluster_is_a_failover_list_of_urls() -> None:
    s = load_settings({"RABBITMQ_URL": "amqp://a:5672/; amqp://b:5672/;amqp://c:5672/"})
    assert s.rabbitmq_urls == ["amqp://a:5672/", "amqp://b:5672/", "amqp://c:5672/"]
    # kombu's own failover syntax, for Celery and every connection of chatqueue
    assert celery_config(s)["broker_url"] == ";".join(s.rabbitmq_urls)


def test_classic_queues_are_declared_as_they_always_were() -> None:
    s = load_settings({})
    for queue in (input_queue(s), dead_letter_queue(s)):
        assert not queue.queue_arguments
    # The running task messages end dead-lettered to the free slots (app/dispatcher.py).
    slots = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "chatqueue.slots"}
    assert task_queue(s).queue_arguments == slots
    assert celery_config(s)["task_queues"][0].queue_arguments == slots
    assert "broker_transport_options" not in celery_config(s)
    assert response_queue_arguments(s) == {"x-expires": 600_000}


def test_quorum_queues_are_declared_so_everywhere() -> None:
    """Every declare of a queue carries its type: a declare without it, on a
    quorum queue, is refused by the broker (PRECONDITION_FAILED)."""
    s = load_settings({"RABBITMQ_QUEUE_TYPE": "quorum", "RESPONSE_QUEUE_TYPE": "quorum"})
    quorum = {"x-queue-type": "quorum"}
    for queue in (input_queue(s), dead_letter_queue(s)):
        assert queue.queue_arguments == quorum
    config = celery_config(s)
    running = config["task_queues"][0].queue_arguments
    assert running == task_queue(s).queue_arguments
    # Dead-lettered at least once: a slot is never lost (one that comes back twice is dropped).
    assert running == {
        **quorum,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "chatqueue.slots",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert config["worker_detect_quorum_queues"] is True  # per-consumer prefetch
    assert config["broker_transport_options"] == {"confirm_publish": True}
    assert response_queue_arguments(s) == {"x-expires": 600_000, **quorum}
