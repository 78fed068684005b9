"""The web front and the worker across a broker restart, on a RabbitMQ node of
the tests' own (tests/brokers.py): the shared broker is never disturbed."""

from __future__ import annotations

from typing import Any

from bench.rabbitnode import RabbitNode
from tests.conftest import WebFactory, new_uid
from tests.test_durability import isolated
from tests.test_web import chat, expected, stream, submit

pytest_plugins = ["tests.brokers"]


def test_submissions_go_on_after_a_broker_restart(
    rabbit_node: RabbitNode,
    start_web: WebFactory,
    start_worker: Any,
    worker_env: dict[str, str],
    names: dict[str, str],
) -> None:
    """Fresh and chosen uids alike: the web process's connections died with the
    broker, and the next submission takes new ones (202, then the answer)."""
    env = {**isolated(worker_env, names, "private"), "RABBITMQ_URL": rabbit_node.url}
    start_worker("private", env=env)
    web = start_web("private", env=env)
    before = submit(web, chat("before", uid=f"mine-{new_uid()}"))
    assert stream(web, before).content == expected("before")

    rabbit_node.restart_app()

    for prompt, uid in (("chosen", f"mine-{new_uid()}"), ("fresh", None)):
        fields = {"uid": uid} if uid else {}
        accepted = submit(web, chat(prompt, **fields))
        assert stream(web, accepted, timeout=60).content == expected(prompt)
