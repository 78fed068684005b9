"""The typed settings object and its loader."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, TypeVar
from urllib.parse import urlsplit

from config.upstreams import Upstreams, UpstreamsError, default_upstreams, load_upstreams

T = TypeVar("T")

LOG_LEVELS = ("debug", "info", "warn", "warning", "error")
QUEUE_TYPES = ("classic", "quorum")
# Queue and exchange names go on the wire and into RabbitMQ: keep them tame.
_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}$")


class ConfigError(ValueError):
    """A setting from the environment is missing or malformed."""


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        parts = urlsplit(raw)
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(
                f"expected a URL starting with {' or '.join(s + '://' for s in schemes)}"
            )
        return raw

    return parse


def _url_list(*schemes: str) -> Callable[[str], str]:
    """One URL, or several joined by ``;``: kombu's failover list (each
    connection tries them in turn, and moves on when its node goes away)."""
    one = _url(*schemes)

    def parse(raw: str) -> str:
        urls = [u.strip() for u in raw.split(";")]
        if not all(urls):
            raise ValueError("an empty URL in the ';'-separated list")
        for u in urls:
            one(u)
        return ";".join(urls)

    return parse


def _queue_type(raw: str) -> str:
    value = raw.strip().lower()
    if value not in QUEUE_TYPES:
        raise ValueError(f"must be one of {', '.join(QUEUE_TYPES)}")
    return value


def _name(raw: str) -> str:
    if not _NAME.match(raw):
        raise ValueError("use 1 to 200 characters of A-Z a-z 0-9 - _ . :")
    return raw


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be a whole number of at least 1")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be a whole number of at least 0")
    return value


def _seconds(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be a number of seconds greater than 0")
    return value


def _non_negative_seconds(raw: str) -> float:
    value = float(raw)
    if not value >= 0:
        raise ValueError("must be a number of seconds, 0 or more")
    return value


def _log_level(raw: str) -> str:
    value = raw.strip().lower()
    if value not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return "warning" if value == "warn" else value


def _keys(raw: str) -> frozenset[str]:
    return frozenset(k.strip() for k in raw.split(",") if k.strip())


def _key_tiers(raw: str) -> tuple[tuple[str, str], ...]:
    caps: dict[str, str] = {}
    for pair in raw.split(","):
        if not pair.strip():
            continue
        key, eq, tier = pair.partition("=")
        if not eq or not key.strip() or tier.strip() not in ("priority", "default", "flex"):
            raise ValueError("use key=tier pairs joined by ',' (tier: priority, default or flex)")
        caps[key.strip()] = tier.strip()
    return tuple(caps.items())


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _env(parse: Callable[[str], T], default: str, doc: str, *, secret: bool = False) -> Any:
    """A field read from the environment variable of the same name (upper case)."""
    return field(default=parse(default), metadata={"parse": parse, "doc": doc, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """All of chatqueue's settings. Field ``foo_bar`` is read from ``FOO_BAR``."""

    rabbitmq_url: str = _env(
        _url_list("amqp", "amqps"),
        "amqp://guest:guest@localhost:5672/",
        "the RabbitMQ broker; on a cluster, the nodes' URLs joined by ';' (each process "
        "connects to the first that answers, and moves to another when its node goes away)",
        secret=True,
    )
    rabbitmq_queue: str = _env(_name, "default-queue", "the input queue clients publish to")
    rabbitmq_queue_type: str = _env(
        _queue_type,
        "classic",
        "classic or quorum: the type of chatqueue's own queues (input, waiting, running, "
        "slots, ledger, dispatcher, dead-letter; quorum: replicated over a cluster's nodes; "
        "an existing queue keeps its type, see docs/operations.md)",
    )
    response_queue_type: str = _env(
        _queue_type,
        "classic",
        "classic or quorum: the type of the response queues (quorum: an answer outlives the "
        "loss of one cluster node, at a cost; see docs/operations.md)",
    )
    response_queue_prefix: str = _env(_name, "response_", "response queue name = prefix + uid")
    response_queue_ttl: int = _env(
        _positive_int, "600", "seconds an unread response queue lives (x-expires)"
    )
    chatqueue_namespace: str = _env(
        _name,
        "chatqueue",
        "prefix of chatqueue's own queues and exchanges: <ns>.waiting, <ns>.running, "
        "<ns>.slots, <ns>.ledger, <ns>.dispatcher (each with .<input queue> after it but for "
        "the default input queue), <ns>.dead-letter, <ns>.cancel, <ns>.accepted, "
        "<ns>.metrics, <ns>.replies.<token>",
    )
    max_body_bytes: int = _env(_positive_int, "1048576", "largest request body accepted, in bytes")
    input_prefetch: int = _env(
        _positive_int, "64", "unacknowledged input messages one worker takes at a time"
    )
    publish_pool_size: int = _env(
        _positive_int,
        "32",
        "broker connections a process keeps for hand-offs, and again as many for answer streams",
    )
    openai_api_key: str = _env(str, "dummy-token", "key sent to the LLM server", secret=True)
    openai_url: str = _env(
        _url("http", "https"),
        "http://localhost:11434/v1",
        "base URL of the OpenAI-compatible LLM server",
    )
    openai_model: str = _env(str, "deepseek-r1:8b", "model used when a request names none")
    llm_max_in_flight: int = _env(
        _non_negative_int,
        "4",
        "LLM calls the default upstream may have at once, summed over every worker of the "
        "deployment (0: no limit); the rest wait in RabbitMQ. Sized for a local server: Ollama "
        "serves 1 to 4 at once by default (see docs/capacity.md to size it)",
    )
    upstreams_file: str = _env(
        str,
        "",
        "a TOML file of [[upstream]] tables, each an LLM server with its models and limits "
        "(docs/capacity.md); empty: one upstream, default, from OPENAI_URL, OPENAI_API_KEY "
        "and LLM_MAX_IN_FLIGHT, serving every model",
    )
    queue_timeout: float = _env(
        _seconds,
        "300",
        "seconds a request may wait for its LLM call to start (a request's own queue_timeout "
        "overrides it); past it, it ends with the error code queue_timeout",
    )
    dispatch_window: int = _env(
        _positive_int,
        "10000",
        "waiting requests the dispatcher holds and orders at once; more wait behind them, "
        "in arrival order",
    )
    llm_connect_timeout: float = _env(_seconds, "5", "seconds to connect to the LLM")
    llm_read_timeout: float = _env(
        _seconds, "60", "seconds the LLM may stay silent before the call fails"
    )
    llm_max_retries: int = _env(
        _non_negative_int,
        "3",
        "retries (exponential backoff) on 408/409/5xx, refused connections and timeouts "
        "before the first token (a 429, or a 503 with retry-after, pauses the upstream instead)",
    )
    llm_max_connections: int = _env(
        _positive_int, "2000", "HTTP connections one process keeps open to the LLM"
    )
    confirm_chunks: bool = _env(
        _bool,
        "false",
        "wait for the broker's confirm of every streamed chunk (slower); always so with "
        "RESPONSE_QUEUE_TYPE=quorum",
    )
    worker_shutdown_grace: float = _env(
        _non_negative_seconds,
        "30",
        "seconds a worker's streams in flight may go on after SIGTERM (warm shutdown); "
        "those still running then are handed back, to be answered again by another worker",
    )
    log_level: str = _env(_log_level, "info", "debug, info, warn or error")
    port: int = _env(_positive_int, "8080", "port of the web front")
    api_keys: frozenset[str] = _env(
        _keys, "", "comma-separated API keys for the web front; empty: no auth", secret=True
    )
    api_key_tiers: tuple[tuple[str, str], ...] = _env(
        _key_tiers,
        "",
        "the highest service_tier each API key may ask for, as key=tier pairs joined by ',' "
        "(tier: priority, default or flex; key * for every key not named); a request above "
        "its key's cap is served at the cap. Empty: no cap",
        secret=True,
    )
    web_concurrency: int = _env(
        _positive_int, "1", "gunicorn worker processes of the web front (gevent, one per core)"
    )
    web_worker_connections: int = _env(
        _positive_int, "10000", "concurrent connections (streams) one web worker process serves"
    )
    web_streams_per_connection: int = _env(
        _positive_int,
        "1000",
        "response streams the web front reads over one broker connection (one channel each)",
    )
    sse_keepalive: float = _env(
        _seconds,
        "15",
        "seconds between keep-alive comments (and WebSocket pings) of a silent stream",
    )
    web_accept_wait: float = _env(
        _seconds,
        "10",
        "seconds GET /v1/chat/response waits for the response queue of a uid the web front "
        "issued (a worker declares it when it accepts the request) before it answers 404; "
        "longer while RabbitMQ is away, the input queue has a backlog, or a worker says it "
        "holds the request",
    )
    web_resume_grace: float = _env(
        _seconds,
        "30",
        "seconds a response queue waits for its SSE reader to come back (Last-Event-ID) "
        "after it left mid-answer, before the LLM call is cancelled and the queue deleted",
    )
    web_reconnect_timeout: float = _env(
        _seconds,
        "60",
        "seconds a web stream waits for RabbitMQ to come back when its connection breaks, "
        "before it ends with an error (the answer stays in its queue)",
    )
    web_publish_timeout: float = _env(
        _seconds,
        "10",
        "seconds the web front waits for RabbitMQ to confirm a submitted request before it "
        "answers 503 (RabbitMQ holds publishes during a memory or disk alarm)",
    )
    web_reply_buffer: int = _env(
        _positive_int,
        "1048576",
        "bytes of a drop-in stream's or WebSocket answer a web process holds for a client "
        "that does not read it; past that the answer ends with reader_too_slow and its LLM "
        "call is cancelled",
    )
    web_answer_timeout: float = _env(
        _seconds,
        "600",
        "seconds the OpenAI drop-in waits for an answer to start before it answers 504",
    )
    # Metrics (app/metrics.py, web/metrics.py).
    metrics_interval: float = _env(
        _seconds,
        "5",
        "seconds between two snapshots of a process's metrics on <ns>.metrics (GET /metrics "
        "sums them)",
    )
    metrics_require_key: bool = _env(
        _bool, "false", "with API_KEYS, GET /metrics needs a key too (else it is open)"
    )

    def _own(self, kind: str) -> str:
        # Deployments that differ in input queue never share a queue of these
        # (the one with the default input queue keeps the plain names).
        name = f"{self.chatqueue_namespace}.{kind}"
        default = _field_default("rabbitmq_queue")
        return name if self.rabbitmq_queue == default else f"{name}.{self.rabbitmq_queue}"

    @property
    def task_queue(self) -> str:
        """Celery's task queue: the task messages of the LLM calls that run, one
        per slot taken (app/dispatcher.py)."""
        return self._own("running")

    @property
    def waiting_queue(self) -> str:
        """Accepted requests that wait for a slot of their upstream."""
        return self._own("waiting")

    @property
    def slots_queue(self) -> str:
        """The free slots of every upstream."""
        return self._own("slots")

    @property
    def ledger_queue(self) -> str:
        """How many slots each upstream has."""
        return self._own("ledger")

    @property
    def dispatcher_queue(self) -> str:
        """The baton of the one worker that dispatches (single active consumer)."""
        return self._own("dispatcher")

    @property
    def deployment_queues(self) -> list[str]:
        """Every durable queue of the deployment but the response and reply queues."""
        return [
            self.rabbitmq_queue,
            self.waiting_queue,
            self.task_queue,
            self.slots_queue,
            self.ledger_queue,
            self.dispatcher_queue,
            self.dead_letter_queue,
        ]

    @cached_property
    def upstreams(self) -> Upstreams:
        """The upstreams (config/upstreams.py): ``UPSTREAMS_FILE``'s, or ``default``."""
        if not self.upstreams_file:
            return default_upstreams(self.openai_url, self.openai_api_key, self.llm_max_in_flight)
        return load_upstreams(self.upstreams_file, os.environ)

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.chatqueue_namespace}.dead-letter"

    @property
    def accepted_exchange(self) -> str:
        return f"{self.chatqueue_namespace}.accepted"

    @property
    def cancel_exchange(self) -> str:
        return f"{self.chatqueue_namespace}.cancel"

    @property
    def rabbitmq_urls(self) -> list[str]:
        """The broker's URLs, in the order a connection tries them."""
        return self.rabbitmq_url.split(";")

    @property
    def queue_arguments(self) -> dict[str, str]:
        """The arguments of every declare of the input, task and dead-letter queues
        (RabbitMQ refuses a declare whose ``x-queue-type`` differs from the queue's).
        Classic queues are declared without it, as they always were."""
        return type_argument(self.rabbitmq_queue_type)

    def tier_cap(self, key: str | None) -> str | None:
        """The highest service tier ``key`` may ask for (None: no cap)."""
        caps = dict(self.api_key_tiers)
        return caps.get(key or "", caps.get("*"))

    def response_queue(self, uid: str) -> str:
        return f"{self.response_queue_prefix}{uid}"

    @property
    def reply_queue_prefix(self) -> str:
        """The names of the web processes' reply queues begin so (web/publisher.py)."""
        return f"{self.chatqueue_namespace}.replies."

    @property
    def lanes_confirm(self) -> bool:
        """Whether the streamed answers wait for the broker's confirm of each
        message: with ``CONFIRM_CHUNKS``, and always with quorum response queues.
        On RabbitMQ 3.10, a channel whose first publish to a quorum queue comes
        while the queue's leader has just died (its node killed) and before a
        new one is elected sends all it publishes there to the dead leader, and
        nothing says so: only a confirm that does not come shows it
        (tests/test_cluster.py lost one answer in about fifteen runs so)."""
        return self.confirm_chunks or self.response_queue_type == "quorum"

    @classmethod
    def documented(cls) -> list[tuple[str, str, str]]:
        """(variable, default, meaning) for each setting, for docs/configuration.md."""
        return [(f.name.upper(), _raw_default(f.default), f.metadata["doc"]) for f in fields(cls)]


def type_argument(queue_type: str) -> dict[str, str]:
    """The declare argument of a queue type (none for classic, RabbitMQ's default)."""
    return {} if queue_type == "classic" else {"x-queue-type": queue_type}


def _field_default(name: str) -> Any:
    return next(f.default for f in fields(Settings) if f.name == name)


def _raw_default(value: object) -> str:
    if isinstance(value, frozenset):
        return ",".join(sorted(value))
    if isinstance(value, tuple):
        return ",".join(f"{k}={v}" for k, v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``environ`` (default: ``os.environ``).

    Raises :class:`ConfigError` naming every variable that is wrong.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    problems: list[str] = []
    for f in fields(Settings):
        var = f.name.upper()
        raw = env.get(var)
        if raw is None:
            continue
        try:
            values[f.name] = f.metadata["parse"](raw)
        except ValueError as exc:
            shown = "<hidden>" if f.metadata["secret"] else repr(raw)
            problems.append(f"{var}={shown}: {exc} ({f.metadata['doc']})")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    settings = Settings(**values)
    if settings.upstreams_file:
        try:
            # Read now, so that a bad file stops the process at start.
            upstreams = load_upstreams(settings.upstreams_file, env)
        except UpstreamsError as exc:
            raise ConfigError(f"invalid configuration:\n  {exc}") from None
        settings.__dict__["upstreams"] = upstreams  # the cached_property's value
    return settings
