"""Fixtures: a real RabbitMQ (queue names of this run only), the development
LLM over a real socket, real ``celery -A app worker`` processes and real web
fronts started from the Procfile lines, and private RabbitMQ nodes for the
tests that restart, kill or alarm a broker.

Nothing here starts a process or a node until a test asks for it:

- ``rabbit_node``: a private node (:class:`chatqueue_testing.rabbitnode.RabbitNode`)
  of its own name, port, config and data, shared by the session and started by
  the first test that uses it (about 6 s). After each test it is put back as
  it was: started again if the test killed it, its app started if the test
  stopped it, the alarms the test raised cleared.
- ``private_stack``: ``private_stack(name, web=True, **env)`` starts a
  worker (and a web front) of queue names of their own on ``rabbit_node``;
- ``rabbit_cluster``: three private nodes joined into one cluster
  (:class:`chatqueue_testing.rabbitnode.RabbitCluster`), the same way; its
  ``failover_url`` is the nodes' URLs joined by ``;`` as kombu takes them.

The private nodes skip the test when ``rabbitmq-server`` is not installed, and
are stopped and removed at the end of the session.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from chatqueue_testing.harness import stop_all
from chatqueue_testing.rabbitnode import RabbitCluster, RabbitNode, available
from config import load_settings
from devllm.testing import DevLLM
from tests.support import (
    RABBITMQ_URL,
    RUN,
    TOKENS,
    Broker,
    PrivateStack,
    Process,
    Web,
    WebFactory,
    WorkerFactory,
    delete_queues,
    environ,
    isolated,
    procfile_command,
    stop_webs,
    wait_for_consumer,
)

NOT_INSTALLED = "rabbitmq-server is not installed (apt-get install rabbitmq-server)"


@pytest.fixture(scope="session")
def llm() -> Iterator[DevLLM]:
    with DevLLM(token_delay=0.002, tokens=TOKENS) as server:
        yield server


@pytest.fixture(scope="session")
def names() -> dict[str, str]:
    """Queue names of this test run, so runs never see each other's messages."""
    return {
        "RABBITMQ_URL": RABBITMQ_URL,
        "RABBITMQ_QUEUE": f"cq-{RUN}-input",
        "RESPONSE_QUEUE_PREFIX": f"cq-{RUN}-response_",
        "CHATQUEUE_NAMESPACE": f"cq-{RUN}",
        "RESPONSE_QUEUE_TTL": "120",
    }


@pytest.fixture(scope="session")
def worker_env(names: dict[str, str], llm: DevLLM) -> dict[str, str]:
    return environ(
        **names,
        OPENAI_URL=llm.base_url,
        OPENAI_MODEL="devllm",
        # No limit of calls in flight, but where a test sets one
        # (tests/test_capacity.py): the others are about other things.
        LLM_MAX_IN_FLIGHT="0",
        LLM_READ_TIMEOUT="3",
        LLM_MAX_RETRIES="2",
        LOG_LEVEL="info",
        # Workers stopped at the end of a test hand back what they still stream
        # soon (tests/test_shutdown.py sets its own grace).
        WORKER_SHUTDOWN_GRACE="2",
    )


@pytest.fixture(scope="session")
def start_worker(worker_env: dict[str, str]) -> Iterator[WorkerFactory]:
    """Start a real worker from the Procfile line; all are stopped at the end."""
    started: list[Process] = []
    envs: list[dict[str, str]] = []

    def start(name: str = "w", env: dict[str, str] | None = None, **extra: str) -> Process:
        argv = [*procfile_command("worker"), "--hostname", f"{name}-{RUN}-{len(started)}@%h"]
        merged = {**(env or worker_env), **extra}
        proc = Process(argv, merged, f"worker-{name}")
        started.append(proc)
        envs.append(merged)
        wait_for_consumer(merged["RABBITMQ_URL"], merged["RABBITMQ_QUEUE"], proc=proc)
        return proc

    yield start
    stop_all(started)
    # The queues of workers started on names of their own (the run's are
    # deleted by _delete_run_queues).
    _delete_queues(
        {
            queue
            for env in envs
            if env["RABBITMQ_URL"] == RABBITMQ_URL  # a private node goes with its data
            for queue in load_settings(env).deployment_queues
        }
    )


@pytest.fixture
def own_worker(start_worker: WorkerFactory) -> Iterator[WorkerFactory]:
    """``start_worker`` for one test: the workers it starts stop when the test
    ends, so that a session of many deployments holds few connections at once."""
    mine: list[Process] = []

    def start(*args: Any, **kwargs: Any) -> Process:
        proc = start_worker(*args, **kwargs)
        mine.append(proc)
        return proc

    yield start
    # The test is over and its deployment is its own: no warm shutdown to
    # wait for (seconds each); RabbitMQ sees the connections go at once.
    for proc in mine:
        if proc.alive:
            proc.proc.kill()
    for proc in mine:
        proc.proc.wait(10)


def _delete_queues(queues: set[str]) -> None:
    delete_queues(RABBITMQ_URL, queues)  # a missing queue is fine


@pytest.fixture(scope="session")
def worker(start_worker: WorkerFactory) -> Process:
    return start_worker("main")


@pytest.fixture
def broker(names: dict[str, str]) -> Iterator[Broker]:
    client = Broker(RABBITMQ_URL, names)
    yield client
    client.close()


@pytest.fixture(scope="session", autouse=True)
def _delete_run_queues(names: dict[str, str]) -> Iterator[None]:
    yield
    _delete_queues(set(load_settings(names).deployment_queues))


# --- the web front ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def web_env(worker_env: dict[str, str]) -> dict[str, str]:
    """The worker's settings, plus a short keep-alive so tests see the pings,
    and a short wait for a reader that left (so its cancel is seen soon)."""
    return {
        **worker_env,
        "SSE_KEEPALIVE": "1",
        "WEB_ANSWER_TIMEOUT": "30",
        "WEB_RESUME_GRACE": "0.5",
    }


@pytest.fixture(scope="session")
def start_web(web_env: dict[str, str], worker: Process) -> Iterator[WebFactory]:
    """Start a real ``gunicorn web:app`` from the Procfile line (with a worker to
    answer it); all are stopped at the end."""
    started: list[Web] = []

    def start(name: str = "web", env: dict[str, str] | None = None, **extra: str) -> Web:
        server = Web({**(env or web_env), **extra}, f"web-{name}")
        started.append(server)
        server.wait_ready()
        return server

    yield start
    stop_webs(started)


@pytest.fixture
def own_web(start_web: WebFactory) -> Iterator[WebFactory]:
    """``start_web`` for one test: the web fronts it starts stop when it ends."""
    mine: list[Web] = []

    def start(*args: Any, **kwargs: Any) -> Web:
        server = start_web(*args, **kwargs)
        mine.append(server)
        return server

    yield start
    stop_webs(mine)


@pytest.fixture(scope="session")
def web(start_web: WebFactory, worker: Process) -> Web:
    """The web front with the default settings (one gevent worker process)."""
    return start_web("main")


@pytest.fixture(scope="session")
def down_web(start_web: WebFactory) -> Web:
    """A web front whose RabbitMQ is not there (nothing listens on port 1)."""
    return start_web("down", RABBITMQ_URL="amqp://guest:guest@127.0.0.1:1/")


@pytest.fixture(scope="session")
def keyed_web(start_web: WebFactory, worker: Process) -> Web:
    """A web front with ``API_KEYS``."""
    return start_web("keyed", API_KEYS="key-alice,key-bob")


# --- private RabbitMQ nodes ---------------------------------------------------------------


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
    start_worker: WorkerFactory,
    start_web: WebFactory,
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
