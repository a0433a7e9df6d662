"""The demo page in a real headless Chromium, on the real cluster with a lagging replica."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import waitress

from examples.flask_app import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
REQUIRE_ENV = "REPLICATED_REQUIRE_BROWSER"


def _require_browser():
    if CHROMIUM and CHROMEDRIVER:
        return
    reason = (
        "Chromium and chromedriver were not found; install them (Debian: apt-get install "
        "chromium chromium-driver) to run the browser test."
    )
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} {REQUIRE_ENV}=1 is set, so this fails instead of skipping.")
    pytest.skip(reason)


@pytest.fixture
def demo_url(postgresql_backend):
    """The Flask demo on the primary and the 500 ms lagging replica, over real HTTP."""
    app = create_app(postgresql_backend.url("primary"), postgresql_backend.url("lagging"))
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=4)
    threading.Thread(target=server.run, daemon=True).start()
    yield f"http://127.0.0.1:{server.effective_port}/"
    server.close()
    server.task_dispatcher.shutdown()
    for engine in app.extensions["sqlalchemy"]._app_engines[app].values():
        engine.dispose()


@pytest.fixture
def browser(tmp_path):
    """A factory of browsers, each a new visitor (its own profile, so its own cookies)."""
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers = []

    def open_browser():
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        profile = tmp_path / f"profile{len(drivers)}"
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
        ):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        drivers.append(driver)
        return driver

    yield open_browser
    for driver in drivers:
        driver.quit()


def test_a_visitor_sees_their_new_item_and_another_reads_the_replica(demo_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    name = f"browser-item-{os.getpid()}"
    writer = browser()
    writer.get(demo_url)
    assert writer.find_element(By.ID, "node").text == "slave (replica)"
    writer.find_element(By.ID, "name").send_keys(name)
    writer.find_element(By.ID, "add").click()
    WebDriverWait(writer, 10).until(
        lambda d: d.current_url == demo_url and d.find_elements(By.CSS_SELECTOR, "#items li")
    )
    items = [li.text for li in writer.find_elements(By.CSS_SELECTOR, "#items li")]
    assert name in items
    assert writer.find_element(By.ID, "node").text == "master (primary)"
    assert writer.find_element(By.ID, "reason").text == (
        "the client wrote and no replica has replayed it yet"
    )
    visitor = browser()
    visitor.get(demo_url)
    assert visitor.find_element(By.ID, "node").text == "slave (replica)"
    assert visitor.find_element(By.ID, "reason").text == "read-only request"
