"""The peer of the benchmark: LiteLLM's proxy, in a venv the benchmark makes itself.

:func:`install_litellm` creates the venv (``~/.cache/chatqueue-bench/litellm-venv``,
or ``$CHATQUEUE_BENCH_CACHE/litellm-venv``) and installs ``litellm[proxy]``
into it with pip, once; :class:`LiteLLM` runs ``litellm --config`` in front of
the development LLM, one worker process, no database, ``LITELLM_LOG=ERROR``
and a master key of the run's own (it refuses to start without one).

LiteLLM rewrites the model name, so each entry of its ``model_list`` is named
after a development LLM behaviour string (``bench;delay=...;tokens=...``) and
sends exactly that string on: the same behaviour reaches the LLM both ways.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import venv
from collections.abc import Sequence
from pathlib import Path

from chatqueue_testing.harness import Process, free_port, wait_for_http

CACHE = Path(os.environ.get("CHATQUEUE_BENCH_CACHE") or Path.home() / ".cache" / "chatqueue-bench")
VENV = CACHE / "litellm-venv"
REQUIREMENT = "litellm[proxy]"


class PeerUnavailable(RuntimeError):
    """LiteLLM could not be installed or started; the message says why."""


def install_litellm(timeout: float = 1200) -> Path:
    """The ``litellm`` executable of the benchmark's own venv, installed if missing."""
    exe = VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"  installing {REQUIREMENT} into {VENV} (once; a few minutes)...", flush=True)
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
        done = subprocess.run(
            [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", REQUIREMENT],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise PeerUnavailable(f"cannot install {REQUIREMENT} into {VENV}: {exc!r}") from exc
    if done.returncode != 0 or not exe.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise PeerUnavailable(
            f"pip install {REQUIREMENT!r} into {VENV} failed (exit {done.returncode}): "
            + " / ".join(tail)
        )
    return exe


def litellm_version() -> str:
    done = subprocess.run(
        [
            str(VENV / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


class LiteLLM:
    """``litellm --config`` in front of the development LLM at ``llm_base_url``."""

    def __init__(self, llm_base_url: str, models: Sequence[str], run: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = f"sk-{run}"
        self.headers = {"Authorization": f"Bearer {self.key}"}
        model_list = [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": llm_base_url,
                    "api_key": "bench",
                },
            }
            for model in models
        ]
        # JSON is YAML: no YAML writer needed.
        fd, config = tempfile.mkstemp(prefix=f"{run}-litellm-", suffix=".yaml")
        with os.fdopen(fd, "w") as out:
            json.dump({"model_list": model_list}, out)
        self.config = Path(config)
        self.process: Process | None = None

    def start(self, exe: Path, timeout: float = 180) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OPENAI", "DATABASE_URL", "LITELLM", "VIRTUAL_ENV"))
        }
        env.update(LITELLM_MASTER_KEY=self.key, LITELLM_LOG="ERROR", NO_DOCS="True")
        env["PATH"] = f"{exe.parent}:{env.get('PATH', '')}"
        argv = [str(exe), "--config", str(self.config), "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--num_workers", "1"]
        self.process = Process(argv, env, "litellm", detached=True, cwd=CACHE)
        try:
            wait_for_http(
                self.url + "/health/liveliness", self.process, lambda s, _: s == 200, timeout
            )
        except AssertionError as exc:
            raise PeerUnavailable(f"LiteLLM did not start: {str(exc)[-1500:]}") from exc

    def pids(self) -> list[int]:
        """The proxy and its children (uvicorn's worker, if it forks one)."""
        if self.process is None:
            return []
        return [self.process.pid, *self.process.children()]

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            if self.process.proc.returncode in (0, -15):
                self.process.remove_log()
        self.config.unlink(missing_ok=True)


if __name__ == "__main__":
    from bench.run import main

    sys.exit(main(["--only", "peer", *sys.argv[1:]]))
