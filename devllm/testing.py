"""Run the development LLM in a subprocess, for tests.

    with DevLLM(token_delay=0.005) as llm:
        client = OpenAI(base_url=llm.base_url, api_key="unused", max_retries=0)
        ...
        assert llm.stats()["streams_completed"] == 1

    with DevLLM(slots=2, over="429", retry_after=0.5) as llm:
        ...
        assert llm.traffic()["max_in_flight"] <= 2

``python -m devllm`` runs with this interpreter (``sys.executable``) on a free
loopback port (``--port 0``: the server picks it and logs it, so two test
processes never race for one). Its output goes to a temporary file, read by
:meth:`DevLLM.output` and quoted in the error if the server does not start.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from devllm.settings import DEFAULT_TOKEN_DELAY, DEFAULT_TOKENS, Over

_LISTENING = re.compile(r"listening on (http://\S+?)/v1\b")
_IDLE = re.compile(r"stays idle")
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


class DevLLMError(RuntimeError):
    """The development LLM did not start, or did not answer."""


class DevLLM:
    """A ``python -m devllm`` subprocess: start it, talk to it, stop it.

    ``token_delay`` and ``tokens`` default to the server's own defaults; the
    attributes of the same names say what the server uses, so a test computes
    the expected content with ``reply_tokens(messages, llm.tokens)``.
    ``slots``, ``over`` and ``retry_after`` pass ``--slots``, ``--over`` and
    ``--retry-after`` (see :mod:`devllm.slots`); :meth:`traffic` reads ``/stats``.
    With ``standby=URL`` the process runs ``--standby URL``: :meth:`start`
    returns once it either serves (``idle`` is False, ``url`` is where) or
    stays idle (``idle`` is True).
    """

    def __init__(
        self,
        *,
        token_delay: float | None = None,
        tokens: int | None = None,
        api_key: str | None = None,
        slots: int | None = None,
        over: Over | None = None,
        retry_after: float | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        standby: str | None = None,
        log_level: str = "info",
        extra_args: tuple[str, ...] = (),
        startup_timeout: float = 20.0,
    ) -> None:
        args = [sys.executable, "-m", "devllm", "--log-level", log_level]
        if standby is None:
            args += ["--host", host, "--port", str(port)]
        else:
            args += ["--standby", standby]
        if token_delay is not None:
            args += ["--token-delay", str(token_delay)]
        if tokens is not None:
            args += ["--tokens", str(tokens)]
        if api_key is not None:
            args += ["--api-key", api_key]
        if slots is not None:
            args += ["--slots", str(slots)]
        if over is not None:
            args += ["--over", over]
        if retry_after is not None:
            args += ["--retry-after", str(retry_after)]
        self.args = [*args, *extra_args]
        self.api_key = api_key
        self.token_delay = DEFAULT_TOKEN_DELAY if token_delay is None else token_delay
        self.tokens = DEFAULT_TOKENS if tokens is None else tokens
        self.startup_timeout = startup_timeout
        self.idle = False
        self.returncode: int | None = None
        self._url: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None
        self._final_output = ""
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the server and wait until ``/health`` answers (or it settles on idling)."""
        if self._process is not None:
            raise DevLLMError("this DevLLM is already started")
        fd, name = tempfile.mkstemp(prefix="devllm-", suffix=".log")
        os.close(fd)
        self._log_path = Path(name)
        with open(name, "ab") as log:
            self._process = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=_PACKAGE_ROOT,
            )
        try:
            self._wait_started()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_started(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise DevLLMError(
                    f"the development LLM exited with status {self._process.returncode}"
                    f" before serving; its output:\n{self.output()}"
                )
            output = self.output()
            if self._url is None and (match := _LISTENING.search(output)):
                self._url = match.group(1)
            if self._url is not None and self._healthy():
                return
            if self._url is None and _IDLE.search(output):
                self.idle = True
                return
            time.sleep(0.05)
        raise DevLLMError(
            f"the development LLM did not answer within {self.startup_timeout}s;"
            f" its output:\n{self.output()}"
        )

    def _healthy(self) -> bool:
        try:
            return self._get("/health").get("status") == "ok"
        except OSError:
            return False

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 5 s) and keep its output."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            self.returncode = process.returncode
        if self._log_path is not None:
            self._final_output = self._read_log()
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (for CPU and memory figures)."""
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # --- where and what --------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, the server's root."""
        if self._url is None:
            raise DevLLMError("the development LLM is not serving (not started, or idle)")
        return self._url

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, the ``base_url`` of an OpenAI client."""
        return self.url + "/v1"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def output(self) -> str:
        """What the server has logged so far (all of it, after :meth:`stop`)."""
        return self._read_log() if self._log_path is not None else self._final_output

    def _read_log(self) -> str:
        assert self._log_path is not None
        return self._log_path.read_bytes().decode("utf-8", errors="replace")

    def stats(self) -> dict[str, Any]:
        """The server's counters and last request bodies (``GET /_stats``)."""
        return self._get("/_stats")

    def traffic(self, since: float | None = None) -> dict[str, Any]:
        """The load and outcomes of chat completions (``GET /stats``).

        ``in_flight``, ``max_in_flight``, ``received``, ``served``, ``refused``,
        ``interrupted``, ... and ``received_log``, the ``time.time()`` of each
        request received (only those at or after ``since`` if given).
        """
        return self._get("/stats" if since is None else f"/stats?since={since!r}")

    def reset(self) -> None:
        """Zero the counters of ``/_stats`` and ``/stats`` and the ``times=N`` counts."""
        self._request("/stats/reset", method="POST")

    def _get(self, path: str) -> dict[str, Any]:
        return self._request(path, method="GET")

    def _request(self, path: str, *, method: str) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url + path, method=method, data=b"" if method == "POST" else None
        )
        with self._opener.open(request, timeout=5) as response:
            body: dict[str, Any] = json.load(response)
        return body
