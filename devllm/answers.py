"""Deterministic answers of the development LLM.

The answer depends only on the last user message, so a test anywhere in the
project computes the content the server will stream with :func:`reply_tokens`:

    >>> "".join(reply_tokens([{"role": "user", "content": "What is the capital of France?"}], 12))
    'The capital of France is Paris.'

A few prompts have canned answers (:data:`CANNED`, matched ignoring case and
surrounding spaces); any other prompt gets a filler sentence of ``n_tokens``
words picked from :data:`WORDS`, seeded by a SHA-256 of the prompt so that it is
the same in every process (unlike ``hash()``, which is salted per process).

A token is a word piece carrying its leading space (``" Paris"``, ``"."``),
so ``"".join(tokens)`` is the content.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CANNED: dict[str, str] = {
    "what is the capital of france?": "The capital of France is Paris.",
    "tell me a joke.": "Why do programmers prefer dark mode? Because light attracts bugs.",
    "tell me a short story about a brave knight.": (
        "Sir Aldric rode out at dawn to face the dragon that haunted the valley."
        " He found it sleeping, shared his bread with it, and they guarded"
        " the villagers together ever after. The valley still sings of them."
    ),
    "say hello.": "Hello!",
}

WORDS: tuple[str, ...] = (
    "river", "lantern", "quiet", "orbit", "maple", "signal", "harbor", "copper",
    "meadow", "thunder", "velvet", "compass", "ember", "glacier", "pixel", "saffron",
    "tunnel", "whisper", "anchor", "falcon", "garden", "horizon", "island", "jasmine",
    "kettle", "lighthouse", "marble", "nectar", "oasis", "pepper", "quartz", "ribbon",
    "summit", "timber", "umbrella", "violet", "willow", "yonder", "zephyr", "beacon",
)  # fmt: skip

_TOKEN = re.compile(r"\s*[\w'\u2019-]+|\s*[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Split ``text`` into word pieces with their leading spaces (lossless for single spaces)."""
    return _TOKEN.findall(text)


def message_text(message: Mapping[str, Any]) -> str:
    """The text of one chat message: a string content, or its ``text`` parts joined."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


def last_user_text(messages: Iterable[Mapping[str, Any]]) -> str:
    """The text of the last message whose role is ``user`` (empty if there is none)."""
    text = ""
    for message in messages:
        if message.get("role") == "user":
            text = message_text(message)
    return text


def filler_tokens(prompt: str, n_tokens: int) -> list[str]:
    """``n_tokens`` words derived from ``prompt``, the same in every process."""
    if n_tokens <= 0:
        return []
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    start = int.from_bytes(digest[:4], "big") % len(WORDS)
    # An odd stride is coprime with 40 words, so a sentence cycles through all of them.
    stride = 2 * (digest[4] % 10) + 1
    words = [WORDS[(start + i * stride) % len(WORDS)] for i in range(n_tokens)]
    tokens = [words[0].capitalize()] + [" " + word for word in words[1:]]
    tokens[-1] += "."
    return tokens


def reply_tokens(messages: Sequence[Mapping[str, Any]], n_tokens: int) -> list[str]:
    """The tokens the development LLM answers to ``messages``.

    The canned answer of the last user message if it has one (whatever
    ``n_tokens``), otherwise a filler sentence of ``n_tokens`` tokens.
    ``max_tokens`` is applied afterwards, by the server.
    """
    prompt = last_user_text(messages)
    canned = CANNED.get(" ".join(prompt.split()).lower())
    if canned is not None:
        return tokenize(canned)
    return filler_tokens(prompt, n_tokens)


def count_prompt_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    """A deterministic estimate of the prompt's size, for ``usage.prompt_tokens``."""
    return sum(len(tokenize(message_text(message))) + 3 for message in messages)
