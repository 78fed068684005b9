"""The upstreams: the OpenAI-compatible servers chatqueue calls, and the models each serves.

Without ``UPSTREAMS_FILE`` there is one upstream, ``default``, built from
``OPENAI_URL``, ``OPENAI_API_KEY`` and ``LLM_MAX_IN_FLIGHT``; it serves every
model. ``UPSTREAMS_FILE`` names a TOML file of ``[[upstream]]`` tables::

    [[upstream]]
    name = "local"                      # 1 to 64 of A-Z a-z 0-9 - _ .
    url = "http://localhost:11434/v1"
    api_key = "none"                    # or api_key_env = "LOCAL_KEY"
    models = ["llama*", "qwen*"]        # fnmatch patterns, case-sensitive
    max_in_flight = 4                   # LLM calls at once, whole deployment; 0: no limit
    rpm = 600                           # optional: calls started per minute, evenly spaced
    fallback = ["openai"]               # optional: tried in order when this one fails
    forward_service_tier = false        # optional: send the request's service_tier on

A request is served by the first upstream one of whose patterns matches its
``model``; a model no upstream serves ends in ``model_not_found`` (404). A
file that cannot be used stops the process at start with a
:class:`~config.settings.ConfigError` naming the file, the table and the key.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard
from urllib.parse import urlsplit

DEFAULT = "default"
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_KEYS = frozenset(
    {
        "name",
        "url",
        "api_key",
        "api_key_env",
        "models",
        "max_in_flight",
        "rpm",
        "fallback",
        "forward_service_tier",
    }
)


class UpstreamsError(ValueError):
    """An ``UPSTREAMS_FILE`` that cannot be used; the message names the file,
    the table and the key."""


@dataclass(frozen=True)
class Upstream:
    """One OpenAI-compatible server and the share of it chatqueue may use."""

    name: str
    url: str
    api_key: str
    models: tuple[str, ...] = ("*",)
    max_in_flight: int = 0  # 0: no limit
    rpm: int = 0  # 0: no limit
    fallback: tuple[str, ...] = ()
    forward_service_tier: bool = False

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    @property
    def listed_models(self) -> list[str]:
        """The patterns that name one model (no wildcard), for ``GET /models``."""
        return [p for p in self.models if not any(c in p for c in "*?[")]


@dataclass(frozen=True)
class Upstreams:
    """Every upstream of the deployment, in the order requests are matched."""

    all: tuple[Upstream, ...]

    def route(self, model: str) -> Upstream | None:
        """The upstream that serves ``model``, or None."""
        return next((u for u in self.all if u.serves(model)), None)

    def get(self, name: str) -> Upstream | None:
        return next((u for u in self.all if u.name == name), None)

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.all]


def default_upstreams(url: str, api_key: str, max_in_flight: int) -> Upstreams:
    return Upstreams((Upstream(DEFAULT, url, api_key, ("*",), max_in_flight),))


def load_upstreams(path: str, environ: Mapping[str, str]) -> Upstreams:
    """The upstreams of the TOML file at ``path`` (``api_key_env`` read in ``environ``)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise UpstreamsError(f"UPSTREAMS_FILE {path}: cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UpstreamsError(f"UPSTREAMS_FILE {path}: not valid TOML: {exc}") from None
    extra = sorted(set(data) - {"upstream"})
    if extra:
        raise UpstreamsError(
            f"UPSTREAMS_FILE {path}: unknown top-level key {extra[0]!r}; "
            "the file holds [[upstream]] tables only"
        )
    tables = data.get("upstream")
    if not isinstance(tables, list) or not tables:
        raise UpstreamsError(
            f"UPSTREAMS_FILE {path}: no [[upstream]] table; add at least one, with the keys "
            "name, url, api_key (or api_key_env), models and max_in_flight"
        )
    upstreams = [_upstream(path, i, table, environ) for i, table in enumerate(tables, 1)]
    names = [u.name for u in upstreams]
    for i, u in enumerate(upstreams, 1):
        if u.name in names[: i - 1]:
            where = _where(path, i, u.name)
            raise UpstreamsError(f"{where}, key 'name': {u.name!r} is used by an earlier table")
    for i, u in enumerate(upstreams, 1):
        where = _where(path, i, u.name)
        for other in u.fallback:
            if other == u.name:
                raise UpstreamsError(
                    f"{where}, key 'fallback': an upstream cannot fall back on itself"
                )
            if other not in names:
                raise UpstreamsError(
                    f"{where}, key 'fallback': no upstream is named {other!r} "
                    f"(the names are {', '.join(names)})"
                )
    return Upstreams(tuple(upstreams))


def _where(path: str, index: int, name: str | None) -> str:
    named = f" (name {name!r})" if name else ""
    return f"UPSTREAMS_FILE {path}: [[upstream]] #{index}{named}"


def _upstream(path: str, index: int, table: Any, environ: Mapping[str, str]) -> Upstream:
    if not isinstance(table, dict):
        raise UpstreamsError(f"{_where(path, index, None)}: must be a table")
    name = table.get("name")
    where = _where(path, index, name if isinstance(name, str) else None)

    def bad(key: str, why: str) -> UpstreamsError:
        return UpstreamsError(f"{where}, key {key!r}: {why}")

    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise bad(unknown[0], f"unknown key; the keys are {', '.join(sorted(_KEYS))}")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise bad("name", "required: 1 to 64 characters of A-Z a-z 0-9 - _ .")
    url = table.get("url")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad("url", "required: a URL like http://localhost:11434/v1")
    if "api_key" in table and "api_key_env" in table:
        raise bad("api_key_env", "give api_key or api_key_env, not both")
    if "api_key_env" in table:
        var = table["api_key_env"]
        if not isinstance(var, str) or not var:
            raise bad("api_key_env", "must be the name of an environment variable")
        if var not in environ:
            raise bad("api_key_env", f"the environment variable {var} is not set")
        api_key = environ[var]
    elif "api_key" in table:
        api_key = table["api_key"]
        if not isinstance(api_key, str):
            raise bad("api_key", "must be a string")
    else:
        raise bad(
            "api_key",
            'required: the key sent to this server (api_key = "none" if it takes none), '
            "or api_key_env",
        )
    models = table.get("models")
    if (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, str) and m for m in models)
    ):
        raise bad("models", 'required: a list of model names or fnmatch patterns, e.g. ["llama*"]')
    limit = table.get("max_in_flight")
    if not _whole(limit, 0):
        raise bad("max_in_flight", "required: a whole number of at least 0 (0: no limit)")
    rpm = table.get("rpm", 0)
    if "rpm" in table and not _whole(rpm, 1):
        raise bad("rpm", "must be a whole number of at least 1 (calls started per minute)")
    fallback = table.get("fallback", [])
    if not isinstance(fallback, list) or not all(isinstance(f, str) for f in fallback):
        raise bad("fallback", "must be a list of upstream names")
    forward = table.get("forward_service_tier", False)
    if not isinstance(forward, bool):
        raise bad("forward_service_tier", "must be true or false")
    return Upstream(
        name=name,
        url=str(url),
        api_key=api_key,
        models=tuple(models),
        max_in_flight=limit,
        rpm=rpm,
        fallback=tuple(fallback),
        forward_service_tier=forward,
    )


def _whole(value: Any, least: int) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least
