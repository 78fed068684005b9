"""The playground page in a real headless Chromium (Debian's chromium and
chromium-driver, installed here when missing), driven with selenium."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from devllm.answers import reply_tokens
from tests.support import (
    Web,
    WebFactory,
    WorkerFactory,
    chat,
    isolated,
    new_uid,
    stream,
    submit,
)

PACKAGES = ("chromium", "chromium-driver")


def _binaries() -> tuple[str | None, str | None]:
    return shutil.which("chromium"), shutil.which("chromedriver")


def ensure_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing Debian's packages if needed."""
    browser, driver = _binaries()
    if browser and driver:
        return browser, driver
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium and chromium-driver are missing and cannot be installed here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-qq", *PACKAGES]
    if subprocess.run(command, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"could not install {' '.join(PACKAGES)}: {done.stderr[-500:]}")
    browser, driver = _binaries()
    if not (browser and driver):
        pytest.skip("chromium or chromedriver still missing after installing their packages")
    return browser, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, chromedriver = ensure_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--window-size=390,844",  # a phone
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def send(
    driver: WebDriver,
    prompt: str,
    model: str,
    api_key: str = "",
    while_streaming: Callable[[], object] | None = None,
) -> list[str]:
    """Type the options and a prompt, press Send; the answer's text as it grew
    (``while_streaming()`` is called once, when it has begun to show)."""
    driver.find_element(By.CSS_SELECTOR, "#options summary").click()
    for field, value in (("model", model), ("api-key", api_key)):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    driver.find_element(By.CSS_SELECTOR, "#options summary").click()
    before = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    driver.find_element(By.ID, "prompt").send_keys(prompt)
    driver.find_element(By.ID, "send").click()
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answers = driver.find_elements(By.CSS_SELECTOR, ".message.assistant")
        if len(answers) > before:
            # The state first: text read after "done" is the final text.
            done = answers[-1].get_attribute("data-state") == "done"
            text = answers[-1].text
            if not seen or seen[-1] != text:
                seen.append(text)
            if text and while_streaming is not None:
                while_streaming()
                while_streaming = None
            if done:
                return seen
        time.sleep(0.03)
    raise AssertionError(f"the answer never finished; seen: {seen}")


def test_a_prompt_streams_into_the_page(browser: WebDriver, web: Web) -> None:
    browser.get(web.url + "/")
    assert browser.title == "chatqueue playground"
    viewport = browser.find_element(By.CSS_SELECTOR, 'meta[name="viewport"]')
    assert "width=device-width" in (viewport.get_attribute("content") or "")
    assert browser.find_element(By.ID, "send").is_displayed()

    prompt = "Write about the sea, slowly."
    seen = send(browser, prompt, model="m;delay=0.15;tokens=12")
    expected = "".join(reply_tokens([{"role": "user", "content": prompt}], 12))
    assert seen[-1] == expected
    # Token by token: the page showed the answer growing, not in one piece.
    partial = [text for text in seen if text and text != expected]
    assert len(partial) >= 4, seen
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert all(expected.startswith(text) for text in partial)
    user = browser.find_elements(By.CSS_SELECTOR, ".message.user")
    assert user[-1].text == prompt
    assert not browser.find_elements(By.CSS_SELECTOR, ".message.error")


def test_the_page_works_with_api_keys(browser: WebDriver, keyed_web: Web) -> None:
    browser.get(keyed_web.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(keyed_web.url + "/")
    send(browser, "Say hello.", model="gpt-4o")
    error = browser.find_elements(By.CSS_SELECTOR, ".message.error")
    assert error and "API key" in error[-1].text

    errors = len(error)
    seen = send(browser, "Say hello.", model="gpt-4o", api_key="key-alice")
    error = browser.find_elements(By.CSS_SELECTOR, ".message.error")
    assert len(error) == errors, error[-1].text
    assert seen[-1] == "Hello!", seen


@pytest.mark.slow  # it restarts the web front
def test_the_page_resumes_a_stream_cut_by_a_web_restart(
    browser: WebDriver, start_web: WebFactory
) -> None:
    """The web worker process is killed mid-answer: the page reads the answer
    again with Last-Event-ID from the new one, and shows it whole, once."""
    web = start_web("playground-resume", WEB_RESUME_GRACE="30")
    browser.get(web.url + "/")
    prompt = "Tell a long story."
    old = web.worker_pids()

    def kill_the_worker() -> None:
        os.kill(old[0], signal.SIGKILL)

    seen = send(browser, prompt, model="m;delay=0.2;tokens=40", while_streaming=kill_the_worker)
    expected = "".join(reply_tokens([{"role": "user", "content": prompt}], 40))
    assert seen[-1] == expected
    assert all(expected.startswith(text) for text in seen)
    assert web.worker_pids() != old
    answer = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
    assert int(answer.get_attribute("data-resumes") or 0) >= 1
    assert not browser.find_elements(By.CSS_SELECTOR, ".message.error")


def test_the_page_shows_its_place_while_it_waits(
    browser: WebDriver,
    own_worker: WorkerFactory,
    own_web: WebFactory,
    worker_env: dict[str, str],
    names: dict[str, str],
) -> None:
    """One slot, held by a long answer: the page shows "waiting: N ahead" (its
    SSE ``queue`` events) until its own answer streams in."""
    env = {**isolated(worker_env, names, f"playground-{new_uid()[:6]}"), "LLM_MAX_IN_FLIGHT": "1"}
    own_worker("playground", env=env)
    web = own_web("playground", env=env)
    hog = submit(web, chat("hog", model="m;tokens=40;delay=0.05"))
    browser.get(web.url + "/")
    prompt = "Wait your turn."
    seen = send(browser, prompt, model="m;tokens=5")
    assert "waiting: 0 ahead" in [text.split(",")[0] for text in seen], seen
    assert seen[-1] == "".join(reply_tokens([{"role": "user", "content": prompt}], 5))
    assert stream(web, hog).content
