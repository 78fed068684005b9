"""Fixtures of private RabbitMQ nodes, for tests that restart, kill or alarm a broker.

A pytest plugin module: enable it with ``pytest_plugins = ["tests.brokers"]``.
Nothing here starts a node until a test asks for one:

- ``rabbit_node``: a private node (:class:`chatqueue_testing.rabbitnode.RabbitNode`) of
  its own name, port, config and data, shared by the session and started by
  the first test that uses it (about 6 s). After each test it is put back as
  it was: started again if the test killed it, its app started if the test
  stopped it, the alarms the test raised cleared.
- ``private_stack``: ``private_stack(name, web=True, **env)`` starts a
  worker (and a web front) of queue names of their own on ``rabbit_node``;
- ``rabbit_cluster``: three private nodes joined into one cluster
  (:class:`chatqueue_testing.rabbitnode.RabbitCluster`), the same way; its
  ``failover_url`` is the nodes' URLs joined by ``;`` as kombu takes them.

Both skip the test when ``rabbitmq-server`` is not installed, and are
stopped and removed at the end of the session.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from chatqueue_testing.rabbitnode import RabbitCluster, RabbitNode, available
from tests.support import PrivateStack
from tests.test_durability import isolated

NOT_INSTALLED = "rabbitmq-server is not installed (apt-get install rabbitmq-server)"


@pytest.fixture(scope="session")
def rabbit_node_session() -> Iterator[RabbitNode]:
    if not available():
        pytest.skip(NOT_INSTALLED)
    with RabbitNode("test") as node:
        yield node


@pytest.fixture
def rabbit_node(rabbit_node_session: RabbitNode) -> Iterator[RabbitNode]:
    """The session's private node, put back as it was after the test."""
    rabbit_node_session.reset()
    yield rabbit_node_session
    rabbit_node_session.reset()


@pytest.fixture
def private_stack(
    rabbit_node: RabbitNode,
    start_worker: Any,
    start_web: Any,
    worker_env: dict[str, str],
    names: dict[str, str],
) -> Callable[..., PrivateStack]:
    """``private_stack(name, web=True, **env)``: a worker, and a web front
    unless ``web`` is false, on the private node, with an input queue and a
    namespace of their own (``name``) and the settings ``env`` on top."""

    def start(name: str, web: bool = True, **env: str) -> PrivateStack:
        settings = {**isolated(worker_env, names, name), "RABBITMQ_URL": rabbit_node.url, **env}
        worker = start_worker(name, env=settings)
        front = start_web(name, env=settings) if web else None
        return PrivateStack(settings, worker, front)

    return start


@pytest.fixture(scope="session")
def rabbit_cluster_session() -> Iterator[RabbitCluster]:
    if not available():
        pytest.skip(NOT_INSTALLED)
    directory = Path(tempfile.mkdtemp(prefix="cq-rabbit-cluster-"))
    # Names of this run (a node name is machine-wide); down() removes the directory.
    with RabbitCluster(directory, name=f"test{os.getpid()}") as cluster:
        yield cluster


@pytest.fixture
def rabbit_cluster(rabbit_cluster_session: RabbitCluster) -> Iterator[RabbitCluster]:
    """The session's private three-node cluster, its nodes all up after the test."""
    rabbit_cluster_session.reset()
    yield rabbit_cluster_session
    rabbit_cluster_session.reset()
