"""The documents say what the code does.

- The README's pika and curl examples run as written, taken from the README's
  own text, against a real worker and a real web front: only the names a test
  run needs of its own (its input queue, response queue prefix and TTL, the
  web front's port) are put in place of the defaults, visibly, below.
- docs/configuration.md is what ``python -m config`` prints, so a setting
  added to config/settings.py without regenerating the page fails here.
- The README stays short, every relative link in the README and docs/ leads
  to a file (and heading) that exists, and neither holds development history.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.support import Process, Web

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
CONFIGURATION = ROOT / "docs" / "configuration.md"

# What the development LLM of the tests answers to the README's question.
PARIS = "The capital of France is Paris."
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
# The words of development history; written so that this line is no instance of them.
HISTORY = re.compile(r"st[o]p [0-9]|so[a]k run|def[e]ct [0-9]|iss[u]e [0-9]", re.IGNORECASE)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def code_blocks(path: Path, language: str) -> list[str]:
    """The fenced code blocks of ``path`` in ``language``, in order."""
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def readme_block(language: str, marker: str) -> str:
    """The one README block of ``language`` that holds ``marker``."""
    found = [block for block in code_blocks(README, language) if marker in block]
    assert len(found) == 1, f"README.md has {len(found)} {language} blocks with {marker!r}"
    return found[0]


def substitute(text: str, replacements: dict[str, str]) -> str:
    """``text`` with each key replaced by its value; each key must be there,
    so an example that stops naming a default fails here instead of running
    against the defaults."""
    for old, new in replacements.items():
        assert old in text, f"the README's example no longer holds {old!r}"
        text = text.replace(old, new)
    return text


def run(argv: list[str], timeout: float = 60) -> str:
    done = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{argv[:2]} exited {done.returncode}:\n{done.stderr}"
    return done.stdout


def run_bash(block: str, web: Web) -> str:
    """A README shell block, as a user pastes it, against the test's web front."""
    script = substitute(block, {"localhost:8080": f"localhost:{web.port}"})
    return run(["bash", "-e", "-o", "pipefail", "-c", script])


def sse_data(output: str) -> list[str]:
    return [line.removeprefix("data: ") for line in output.splitlines() if line.startswith("data:")]


def content(payloads: list[str]) -> str:
    """The text of streamed ``chat.completion.chunk`` payloads (``[DONE]`` last)."""
    assert payloads and payloads[-1] == "[DONE]", payloads[-3:]
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}, chunks
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# --- the README's examples --------------------------------------------------------------------


def test_the_readme_pika_example_prints_the_answer(worker: Process, names: dict[str, str]) -> None:
    code = readme_block("python", "import pika")
    ttl_ms = int(names["RESPONSE_QUEUE_TTL"]) * 1000
    code = substitute(
        code,
        {
            # The run's own queues in place of the defaults the README names.
            'routing_key="default-queue"': f'routing_key="{names["RABBITMQ_QUEUE"]}"',
            'f"response_{uid}"': f'f"{names["RESPONSE_QUEUE_PREFIX"]}{{uid}}"',
            '"x-expires": 600000': f'"x-expires": {ttl_ms}',
            "amqp://guest:guest@localhost:5672/": names["RABBITMQ_URL"],
        },
    )
    printed = run([sys.executable, "-c", code])
    assert printed == PARIS + "\n"
    assert f"it prints `{PARIS}`" in README.read_text()


def test_the_readme_submit_and_stream_prints_the_events(web: Web) -> None:
    output = run_bash(readme_block("bash", "response_url"), web)
    ids = [int(line[4:]) for line in output.splitlines() if line.startswith("id: ")]
    payloads = sse_data(output)
    assert ids == list(range(len(payloads))), "one id: per event, from 0"
    assert content(payloads) == PARIS


def test_the_readme_drop_in_streams_as_openai_does(web: Web) -> None:
    output = run_bash(readme_block("bash", "/openai/v1/chat/completions"), web)
    assert "id: " not in output  # OpenAI sends no event ids
    assert content(sse_data(output)) == PARIS


def test_the_readme_health_check_answers_ok(web: Web) -> None:
    output = run_bash(readme_block("bash", "/healthz"), web)
    health = json.loads(output)
    assert health["status"] == "ok"
    assert health["broker"]["ok"] and health["llm"]["ok"]


def test_every_curl_command_of_the_readme_is_run_above() -> None:
    tested = ("response_url", "/openai/v1/chat/completions", "/healthz")
    for block in code_blocks(README, "bash"):
        if "curl" in block:
            assert sum(marker in block for marker in tested) == 1, block


# --- docs/configuration.md ------------------------------------------------------------------


def test_configuration_md_is_what_python_m_config_prints() -> None:
    printed = run([sys.executable, "-m", "config"])
    assert CONFIGURATION.read_text() == printed, (
        "docs/configuration.md is out of date: run `python -m config > docs/configuration.md`"
    )
    assert "| `RABBITMQ_URL` |" in printed  # a table of the settings, not an empty page
    run([sys.executable, "-m", "config", "--check"])


# --- the documents themselves ---------------------------------------------------------------


def test_the_readme_is_at_most_400_lines() -> None:
    assert len(README.read_text().splitlines()) <= 400


def headings(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``path`` (code blocks left out)."""
    text = FENCE.sub("", path.read_text())
    titles = re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", t.strip().lower()).replace(" ", "-") for t in titles}


def test_every_relative_link_leads_to_a_file_and_heading() -> None:
    for page in [README, *DOCS]:
        text = FENCE.sub("", page.read_text())
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: {target} leads nowhere"
            if anchor:
                assert anchor in headings(linked), f"{page.name}: no heading for {target}"


def test_no_tracked_file_holds_development_history() -> None:
    """Code, comments, tests and documents say what is, not how it came to be:
    history lives in commit messages and, for users, in CHANGELOG.md."""
    listed = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    found = {}
    for name in listed:
        path = ROOT / name
        if name == "CHANGELOG.md" or not path.is_file():
            continue
        try:
            hits = HISTORY.findall(path.read_text())
        except UnicodeDecodeError:
            continue
        if hits:
            found[name] = hits
    assert not found, found
