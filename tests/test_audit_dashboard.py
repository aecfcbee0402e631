"""The dashboard's "Last configuration changes" panel, in a real browser: it reads
`/api/v1/audit` with the page's token, with or without the finops extension."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.helpers import free_port, webhook_to_file

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "audit-dashboard-token"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def test_the_panel_shows_the_start_and_a_refused_reload(browser, daemon_factory):
    daemon = daemon_factory(webhook_to_file(
        free_port(), service={"admin": {"listen": "127.0.0.1:{admin}", "auth_token": TOKEN}}))
    daemon.start()
    daemon.config.write_text(daemon.config.read_text().replace("exporters: [file]",
                                                               "exporters: [nowhere]"))
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload refused" not in daemon.log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{daemon.admin_port}/?token={TOKEN}")
        page.wait_for_selector("#audit:not([hidden]) #table-audit tbody tr:nth-child(2)",
                               timeout=15_000)
        rows = [r.inner_text() for r in page.query_selector_all("#table-audit tbody tr")]
    finally:
        page.close()
    assert "refused" in rows[0] and "names exporter 'nowhere'" in rows[0]
    assert "start" in rows[1] and "+ receiver webhook" in rows[1]
    assert daemon.stop() == 0
