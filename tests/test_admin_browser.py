"""The admin dashboard in a real headless Chromium: live pages follow the proxy's work.

Set OLLAMAMQ_SCREENSHOTS=1 to refresh the screenshots in docs/ (else they go to tmp_path).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import gevent
import openai
import pytest
import requests
from gevent.event import Event
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import WAIT_LIMIT
from tests.test_clients import HI

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DOCS = Path(__file__).resolve().parent.parent / "docs"
PASSWORD = "correct horse"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--window-size=1280,900",
)

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (scripts/install-system-deps.sh)",
)


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a fresh profile; Selenium Manager never downloads anything."""
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: docs/ when refreshing them, else the test's own directory."""
    return DOCS if os.environ.get("OLLAMAMQ_SCREENSHOTS") == "1" else tmp_path


def waiter(driver: webdriver.Chrome) -> WebDriverWait:
    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, WAIT_LIMIT, poll_frequency=0.1, ignored_exceptions=ignored)


def text_of(driver: webdriver.Chrome, css: str) -> str | None:
    """An element's text, read in one step: fragments are swapped in every 2 s."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e && e.textContent.trim();", css
    )


def click(driver: webdriver.Chrome, css: str) -> None:
    """Click the element, retrying if a refresh replaced it in between."""

    def clicked(d: webdriver.Chrome) -> bool:
        d.find_element(By.CSS_SELECTOR, css).click()
        return True

    waiter(driver).until(clicked)


def confirm(driver: webdriver.Chrome) -> None:
    """Accept the page's confirm() dialog."""
    waiter(driver).until(EC.alert_is_present()).accept()


def screenshot(driver: webdriver.Chrome, directory: Path, page: str) -> None:
    """The whole page: the window is resized to its height first."""
    chrome = driver.execute_script("return window.outerHeight - window.innerHeight")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, chrome + max(640, height))
    assert driver.save_screenshot(str(directory / f"admin-{page}.png"))
    driver.set_window_size(1280, 900)


def log_in(driver: webdriver.Chrome, url: str, shots: Path) -> None:
    driver.get(f"{url}/admin/")
    waiter(driver).until(EC.url_contains("/admin/login"))
    screenshot(driver, shots, "login")
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    waiter(driver).until(lambda d: text_of(d, "main h1") == "Overview")


def chat(url: str, user: str) -> int:
    """A streamed chat read to its end; the number of records received."""
    body = {"model": "llama3", "messages": [{"role": "user", "content": "Tell me a story."}]}
    headers = {"X-User-ID": user}
    with requests.post(f"{url}/api/chat", json=body, headers=headers, stream=True) as response:
        return sum(1 for _ in response.iter_lines())


@pytest.mark.parametrize("config", [{"ADMIN_PASSWORD": PASSWORD}])
def test_queue_then_users_follow_a_slow_stream(proxy, fake, browser, shots):
    fake.tokens, fake.token_delay = 60, 0.05  # a 3-second stream
    fake.gate = Event()  # held before its first byte until the page shows the others waiting
    log_in(browser, proxy, shots)
    streams = [gevent.spawn(chat, proxy, "alice")]
    browser.get(f"{proxy}/admin/queue")
    waiter(browser).until(lambda d: text_of(d, "table.active tr[data-user=alice]"))
    streams += [gevent.spawn(chat, proxy, user) for user in ("bob", "carol")]
    wait = waiter(browser)
    wait.until(
        lambda d: text_of(d, ".group[data-user=bob]") and text_of(d, ".group[data-user=carol]")
    )
    fake.gate.set()
    wait.until(lambda d: int(text_of(d, "tr[data-user=alice] [data-col=tokens]") or 0) > 0)
    screenshot(browser, shots, "queue")

    click(browser, ".group[data-user=carol] button")  # cancel carol's waiting request
    confirm(browser)
    wait.until(lambda d: text_of(d, ".group[data-user=carol]") is None)

    browser.get(f"{proxy}/admin/users")
    wait.until(lambda d: text_of(d, "tr[data-user=alice]"))
    long_wait = WebDriverWait(browser, 2 * WAIT_LIMIT, poll_frequency=0.1)
    long_wait.until(lambda d: text_of(d, "tr[data-user=alice] [data-col=tokens_out]") == "60")
    long_wait.until(lambda d: text_of(d, "tr[data-user=bob] [data-col=served]") == "1")
    click(browser, "tr[data-user=carol] button")  # block carol
    confirm(browser)
    wait.until(lambda d: "blocked" in (text_of(d, "tr[data-user=carol]") or ""))
    screenshot(browser, shots, "users")

    browser.get(f"{proxy}/admin/")
    wait.until(lambda d: text_of(d, "[data-total=served]") == "2")
    screenshot(browser, shots, "overview")
    browser.get(f"{proxy}/admin/settings")
    assert text_of(browser, "tr[data-setting=ADMIN_PASSWORD] .value") == "********"
    screenshot(browser, shots, "settings")
    assert [g.get(timeout=WAIT_LIMIT) for g in streams][0] > 60


@pytest.mark.parametrize(
    "config", [{"ADMIN_PASSWORD": PASSWORD, "PULL_ATTEMPTS": 1, "PULL_RETRY_DELAY": 0}]
)
def test_processing_the_queue_fills_the_progress_bar(proxy, app, fake, browser, shots):
    # Each record comes 1.1 s after the last, so the first third is saved (pulls.SAVE_EVERY_S);
    # then the second pull holds at the gate until the page has shown it.
    fake.fail_pulls, fake.pull_chunks, fake.token_delay = 1, 3, 1.1
    fake.pull_gate = Event()
    for model in ("phi3:mini", "mistral:7b", "gemma2:2b"):
        queued = requests.post(f"{proxy}/api/pull", json={"model": model, "stream": False})
        assert queued.json()["status"] == "queued"
    log_in(browser, proxy, shots)
    browser.get(f"{proxy}/admin/downloads")
    mistral = "tr[data-job='2']"
    click(browser, "#process-all")

    wait = waiter(browser)
    wait.until(lambda d: text_of(d, f"{mistral} [data-col=status]") == "downloading")
    wait.until(lambda d: text_of(d, f"{mistral} [data-col=percent]") == "33.3%")
    assert text_of(browser, "tr[data-job='1'] [data-col=status]") == "failed"
    assert text_of(browser, "tr[data-job='3'] [data-col=status]") == "pending"
    screenshot(browser, shots, "downloads")

    fake.token_delay = 0.05
    fake.pull_gate.set()
    wait.until(lambda d: text_of(d, f"{mistral} [data-col=percent]") == "100.0%")
    wait.until(lambda d: text_of(d, f"{mistral} [data-col=status]") == "completed")
    bar = browser.find_element(By.CSS_SELECTOR, f"{mistral} .progress")
    assert bar.get_attribute("aria-valuenow") == "100.0"
    app.extensions["ollamamq.pulls"].wait()


@pytest.mark.parametrize("config", [{"ADMIN_PASSWORD": PASSWORD}])
def test_a_key_made_on_the_keys_page_works_until_it_is_revoked_there(proxy, browser, shots):
    log_in(browser, proxy, shots)
    browser.get(f"{proxy}/admin/keys")
    browser.find_element(By.NAME, "user").send_keys("dana")
    browser.find_element(By.NAME, "note").send_keys("notebook")
    browser.find_element(By.CSS_SELECTOR, "#create-key button[type=submit]").click()
    waiter(browser).until(lambda d: text_of(d, "#created-key"))
    key = text_of(browser, "#created-key")
    assert key.startswith("omq_") and browser.find_element(By.CSS_SELECTOR, "[data-copy]")
    screenshot(browser, shots, "keys")
    with openai.OpenAI(base_url=f"{proxy}/v1", api_key=key, max_retries=0) as client:
        reply = client.chat.completions.create(model="llama3", messages=HI)
        assert reply.choices[0].message.content
        browser.get(f"{proxy}/admin/keys")  # reloaded: the key is never shown again
        assert text_of(browser, "#created-key") is None and key not in browser.page_source
        assert text_of(browser, "tr[data-key] .status") == "active"
        click(browser, "tr[data-key] form button")
        confirm(browser)
        waiter(browser).until(lambda d: text_of(d, "tr[data-key] .status") == "revoked")
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="llama3", messages=HI)
