"""The command line of ``python -m devllm``."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from urllib.parse import urlsplit

from devllm.settings import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_RETRY_AFTER,
    DEFAULT_TOKEN_DELAY,
    DEFAULT_TOKENS,
    OVER_MODES,
    Settings,
)

LOG_LEVELS = ("debug", "info", "warning", "error")


def _url(raw: str) -> str:
    parts = urlsplit(raw)
    try:
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{raw!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{raw!r}: expected a URL like http://localhost:11434/v1")
    return raw


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devllm",
        description=(
            "The chatqueue development LLM: an OpenAI-compatible server with canned answers"
            " (not a real model), for tests, benchmarks and trying chatqueue out. Behaviour"
            " on demand through the model string: see devllm/server.py."
        ),
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (%(default)s)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port to bind, 0 for any (%(default)s)"
    )
    parser.add_argument(
        "--token-delay",
        type=float,
        default=DEFAULT_TOKEN_DELAY,
        metavar="SECONDS",
        help="seconds before each token (%(default)s)",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=DEFAULT_TOKENS,
        metavar="N",
        help="answer length for prompts without a canned answer (%(default)s)",
    )
    parser.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ (none)"
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=0,
        metavar="N",
        help="serve at most N chat completions at a time, streamed or not (0: no limit)",
    )
    parser.add_argument(
        "--over",
        choices=OVER_MODES,
        default="queue",
        help=(
            "what a request finds when all --slots are busy: queue (wait for a slot, first"
            " come first served, as llama.cpp and vLLM), interrupt (take the slot of the"
            " oldest running stream, which ends with [DONE] and no finish_reason, as"
            " llama-cpp-python), 503 (at once, as Ollama past its queue), 429 (at once, with"
            " retry-after, as TGI and OpenAI) (%(default)s)"
        ),
    )
    parser.add_argument(
        "--retry-after",
        type=float,
        default=DEFAULT_RETRY_AFTER,
        metavar="SECONDS",
        help="the retry-after of the 429 that --over 429 answers (%(default)s)",
    )
    parser.add_argument(
        "--standby",
        type=_url,
        nargs="?",
        default=False,
        const=None,
        metavar="URL",
        help=(
            "serve at URL (instead of --host/--port) only if no LLM answers at URL/models"
            " and URL is on this machine; otherwise stay idle until stopped. Without URL:"
            " chatqueue's OPENAI_URL"
        ),
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    return parser


def _openai_url() -> str:
    """chatqueue's OPENAI_URL, read where chatqueue reads its settings."""
    from config import load_settings

    return load_settings().openai_url


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = Settings(
            host=args.host,
            port=args.port,
            token_delay=args.token_delay,
            tokens=args.tokens,
            api_key=args.api_key,
            slots=args.slots,
            over=args.over,
            retry_after=args.retry_after,
        )
    except ValueError as exc:
        parser.error(str(exc))
    # Imported here: the server pulls in gevent and Flask, which --help does not need.
    from devllm.server import serve
    from devllm.standby import run_standby

    if args.standby is not False:
        run_standby(args.standby or _openai_url(), settings)
    else:
        serve(settings)
    return 0
