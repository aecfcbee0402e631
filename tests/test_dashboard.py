"""The embedded dashboard at `/`, in a real browser, on a data set of known totals.

One daemon (`meterline run`, a process) for the module, with a clickhouse exporter on
chDB and an admin token: the generated data set (tests/clickhouse_data.py) goes in
through the webhook, and Debian's chromium, driven by Playwright, reads the page.
Every figure the page shows is checked against sums made in Python from the events.
Browser tests skip when /usr/bin/chromium is missing; the plain HTTP ones always run.
"""

from __future__ import annotations

import csv
import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from meterline.event import Event
from tests import agent_data
from tests import clickhouse_data as data
from tests.helpers import Daemon, free_port

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "s3cret-dashboard-token"
PIPELINE = """
receivers:
  webhook: {{listen: "127.0.0.1:{webhook}", max_body_mb: 64}}
exporters:
  clickhouse:
    endpoint: chdb://{data}/clickhouse
    batch: {{max_size: 5000, timeout: 20ms}}
service:
  data_dir: {data}
  admin: {{listen: "127.0.0.1:{admin}", auth_token: {token}}}
  pipelines: {{p: {{receivers: [webhook], exporters: [clickhouse]}}}}
extensions:
  finops:
    budgets:
      search-monthly: {{scope: {{team: search}}, period: month, limit_usd: 40}}
      per-team-weekly: {{per: team, window: 7d, limit_usd: 0.000001}}
"""


@dataclass
class Site:
    base: str
    events: list[Event]

    def get(self, path: str, token: str | None = TOKEN) -> tuple[int, dict[str, str], bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(self.base + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def expected(self, range_: str, **match: str) -> dict[str, float]:
        """The totals of the events in the window the API answers for `range_`."""
        return data.totals(e for e in self.events_in(range_)
                           if all(getattr(e, k) == v for k, v in match.items()))

    def events_in(self, range_: str) -> list[Event]:
        _, _, body = self.get(f"/api/v1/analytics/usage?range={range_}")
        return data.in_window(self.events, json.loads(body))


def post_events(webhook: int, events: list[Event]) -> None:
    """Send `events` to the webhook on port `webhook`; all must be accepted."""
    post = urllib.request.Request(f"http://127.0.0.1:{webhook}/v1/events",
                                  data=msgspec.json.encode(events),
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=30) as r:
        assert json.loads(r.read())["accepted"] == len(events)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("dashboard")
    webhook, admin = free_port(), free_port()
    config = tmp / "pipeline.yaml"
    config.write_text(PIPELINE.format(webhook=webhook, admin=admin, token=TOKEN,
                                      data=tmp / "data"))
    daemon = Daemon(config, admin, tmp)
    daemon.start(timeout=30)
    try:
        events = data.dataset(datetime.now(UTC))
        post_events(webhook, events)
        s = Site(f"http://127.0.0.1:{admin}", events)
        wanted = data.totals(events)["requests"]  # every event is within 90 days
        deadline = time.monotonic() + 30
        while json.loads(s.get("/api/v1/analytics/usage?range=90d")[2])["totals"][
                "requests"] != wanted:
            assert time.monotonic() < deadline, "the data set did not reach ClickHouse"
            time.sleep(0.05)
        yield s
    finally:
        assert daemon.stop() == 0


# --- plain HTTP ----------------------------------------------------------------------------
def test_the_page_is_html_served_without_a_token(site: Site) -> None:
    status, headers, body = site.get("/", token=None)
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b"static/dashboard.js" in body and b"static/vendor/chart.umd.min.js" in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]


@pytest.mark.parametrize(("path", "kind"), [
    ("/static/dashboard.js", "javascript"), ("/static/dashboard.css", "text/css"),
    ("/static/vendor/chart.umd.min.js", "javascript"),
    ("/static/vendor/chart.js-LICENSE.txt", "text/plain"),
])
def test_static_files_are_served_without_a_token_with_their_type(site: Site, path: str,
                                                                  kind: str) -> None:
    status, headers, body = site.get(path, token=None)
    assert status == 200
    assert kind in headers["Content-Type"]
    assert body


def test_nothing_outside_the_static_directory_is_served(site: Site) -> None:
    assert site.get("/static/../__init__.py", token=None)[0] in (403, 404)
    assert site.get("/static/%2e%2e/__init__.py", token=None)[0] in (403, 404)


def test_a_static_name_longer_than_the_file_system_takes_is_a_404(site: Site) -> None:
    assert site.get("/static/" + "a" * 300, token=None)[0] == 404  # (was an OSError: 500)


def test_the_api_the_page_reads_still_needs_the_token(site: Site) -> None:
    assert site.get("/api/v1/analytics/usage", token=None)[0] == 401
    assert site.get("/api/v1/analytics/usage", token="wrong")[0] == 401
    assert site.get("/api/v1/analytics/usage")[0] == 200


# --- in the browser ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium): "
                    "the dashboard's browser tests need it")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@dataclass
class Tab:
    page: Page
    errors: list[str]

    def refreshes(self) -> int:
        return int(self.page.evaluate("document.body.dataset.refreshes"))

    def wait_refreshed(self, after: int) -> None:
        self.page.wait_for_function(
            f"() => +document.body.dataset.refreshes > {after}"
            " && document.body.dataset.state === 'ready'", timeout=15_000)

    def choose(self, select: str, value: str) -> None:
        """Pick a filter and wait for the figures it asks for."""
        before = self.refreshes()
        self.page.select_option(select, value)
        self.wait_refreshed(before)

    def text(self, selector: str) -> str:
        return self.page.inner_text(selector).strip()

    def series(self, chart: str) -> dict[str, float]:
        """Each dataset's label and the sum of its points."""
        return self.page.evaluate(f"""Object.fromEntries(Chart.getChart('{chart}').data.datasets
            .map(d => [d.label, d.data.reduce((a, b) => a + (b || 0), 0)]))""")


@pytest.fixture
def tab(browser: Browser, site: Site) -> Iterator[Tab]:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield Tab(page, errors)
    context.close()


def opened(tab: Tab, site: Site, query: str = f"?token={TOKEN}") -> Tab:
    """The page, once its first figures are drawn."""
    tab.page.goto(site.base + "/" + query)
    tab.wait_refreshed(0)
    return tab


def failed(tab: Tab, url: str) -> Tab:
    """The page, once its first refresh has given up."""
    tab.page.goto(url)
    tab.page.wait_for_function("() => document.body.dataset.state === 'ready'")
    return tab


def shown(figure: float) -> str:
    return f"{figure:,.0f}"


def test_the_page_draws_the_seeded_traffic_without_errors(tab: Tab, site: Site) -> None:
    opened(tab, site)
    expected = site.expected("30d")
    assert tab.text("#tile-requests") == shown(expected["requests"])
    assert tab.text("#tile-tokens") == shown(expected["total_tokens"])
    assert tab.text("#tile-errors") == f"{round(expected['errors'] / expected['requests'], 4):.1%}"
    assert tab.text("#tile-providers") == "3"
    assert tab.text("#tile-latency").endswith(" ms")
    assert tab.text("#tile-percentiles").startswith("p50 ")
    per_provider = data.by(site.events_in("30d"), "provider")
    requests = tab.series("chart-requests")
    assert requests.pop("error rate %") > 0
    assert requests == {p: t["requests"] for p, t in per_provider.items()}
    assert tab.series("chart-spend") == {p: t["cost_usd"] for p, t in per_provider.items()}
    latency = tab.series("chart-latency")
    assert set(latency) == {"p50", "p95", "p99"} and all(v > 0 for v in latency.values())
    assert tab.page.locator("#table-models tbody tr").count() == len(
        data.by(site.events_in("30d"), "model"))
    assert "search-monthly" in tab.text("#table-budgets")
    assert tab.page.url == site.base + "/"  # the token left the address bar
    assert tab.errors == []


def test_a_budget_per_member_names_the_member_of_each_row(tab: Tab, site: Site) -> None:
    opened(tab, site)
    _, _, body = site.get("/api/v1/budgets")
    members = [b["member"] for b in json.loads(body) if b["budget"] == "per-team-weekly"]
    assert sorted(members) == ["search", "support"]  # every team spent past its limit
    rows = tab.page.locator("#table-budgets tbody tr").all_inner_texts()
    per_team = sorted(r.split("\t")[2] for r in rows if r.startswith("per-team-weekly"))
    assert per_team == ["team=search", "team=support"]
    assert any(r.startswith("search-monthly\tteam=search\t\u2013\t") for r in rows)
    assert tab.errors == []


def test_on_a_phone_wide_screen_the_page_does_not_overflow_sideways(tab: Tab,
                                                                   site: Site) -> None:
    tab.page.set_viewport_size({"width": 400, "height": 800})
    opened(tab, site)
    # wide tables scroll inside their panel; the charts shrink to the screen
    assert tab.page.evaluate("document.documentElement.scrollWidth") <= 400
    assert tab.page.locator("#chart-requests").bounding_box()["width"] < 400
    assert tab.errors == []


def test_the_range_filter_changes_the_figures(tab: Tab, site: Site) -> None:
    opened(tab, site)
    figures = {}
    for range_ in ("24h", "7d", "90d"):
        tab.choose("#range", range_)
        figures[range_] = tab.text("#tile-requests")
        assert figures[range_] == shown(site.expected(range_)["requests"])
        assert sum(tab.series("chart-requests").values()) > 0
    assert len(set(figures.values())) == 3
    assert tab.page.url.endswith("?range=90d")
    assert tab.errors == []


def test_a_link_with_a_range_of_its_own_shows_it_in_the_range_filter(tab: Tab,
                                                                      site: Site) -> None:
    opened(tab, site, f"?range=48h&token={TOKEN}")
    assert tab.page.eval_on_selector("#range", "s => s.options[s.selectedIndex].text") == (
        "Last 48h")
    assert tab.text("#tile-requests") == shown(site.expected("48h")["requests"])
    assert tab.errors == []


def test_the_provider_filter_narrows_the_figures(tab: Tab, site: Site) -> None:
    opened(tab, site)
    tab.choose("#provider", "anthropic")
    expected = site.expected("30d", provider="anthropic")
    assert tab.text("#tile-requests") == shown(expected["requests"])
    assert tab.text("#tile-providers") == "1"
    series = tab.series("chart-requests")
    assert set(series) == {"anthropic", "error rate %"}
    assert series["anthropic"] == expected["requests"]
    providers = tab.page.locator("#table-models tbody tr td:nth-child(2)").all_inner_texts()
    assert providers and set(providers) == {"anthropic"}
    assert tab.errors == []


def read_csv(tab: Tab, button: str) -> list[dict[str, Any]]:
    with tab.page.expect_download() as info:
        tab.page.click(button)
    return list(csv.DictReader(io.StringIO(Path(info.value.path()).read_text())))


def test_the_csv_download_holds_the_rows_shown(tab: Tab, site: Site) -> None:
    opened(tab, site)
    rows = read_csv(tab, "[data-csv=table-breakdown]")
    expected = data.by(site.events_in("30d"), "provider")
    assert {r["provider"]: (float(r["requests"]), float(r["cost USD"])) for r in rows} == {
        p: (t["requests"], t["cost_usd"]) for p, t in expected.items()}
    assert len(rows) == tab.page.locator("#table-breakdown tbody tr").count()

    tab.choose("#breakdown", "metadata")  # by the key the field holds
    before = tab.refreshes()
    tab.page.fill("#metadata-key", "customer")
    tab.page.press("#metadata-key", "Tab")
    tab.wait_refreshed(before)
    rows = read_csv(tab, "[data-csv=table-breakdown]")
    expected = data.by(site.events_in("30d"), "metadata.customer")
    assert {r["metadata.customer"] or None: float(r["cost USD"]) for r in rows} == {
        k: t["cost_usd"] for k, t in expected.items()}
    assert tab.errors == []


def test_without_a_token_the_page_asks_for_one(tab: Tab, site: Site) -> None:
    failed(tab, site.base + "/")
    assert tab.page.is_visible("#token-form")
    assert "requires a bearer token" in tab.text("#notice")
    assert tab.page.is_hidden("#content")
    before = tab.refreshes()
    tab.page.fill("#token-input", TOKEN)
    tab.page.click("#token-form button")
    tab.wait_refreshed(before)
    assert tab.text("#tile-requests") == shown(site.expected("30d")["requests"])
    assert tab.page.is_hidden("#token-form")


def test_without_the_finops_extension_the_page_says_so(tab: Tab, daemon_factory) -> None:
    daemon = daemon_factory(f"""
receivers: {{webhook: {{listen: "127.0.0.1:{free_port()}"}}}}
exporters: {{debug: {{}}}}
service:
  data_dir: {{data}}
  admin: {{listen: "127.0.0.1:{{admin}}"}}
  pipelines: {{p: {{receivers: [webhook], exporters: [debug]}}}}
""")
    daemon.start()
    try:
        failed(tab, f"http://127.0.0.1:{daemon.admin_port}/")
        assert "finops extension" in tab.text("#notice")
        assert tab.page.is_hidden("#content")
        assert [e for e in tab.errors if "404" not in e] == []
    finally:
        assert daemon.stop() == 0


AGENTS_PIPELINE = """
receivers:
  webhook: {{listen: "127.0.0.1:{webhook}"}}
  gateway:
    listen: "127.0.0.1:{gateway}"
    upstreams: {{openai: {{base_url: "http://127.0.0.1:9", default: true}}}}
    guardrails: {rules}
exporters:
  clickhouse: {{endpoint: "chdb://{{data}}/clickhouse", batch: {{timeout: 20ms}}}}
service:
  data_dir: {{data}}
  admin: {{listen: "127.0.0.1:{{admin}}"}}
  pipelines: {{p: {{receivers: [webhook, gateway], exporters: [clickhouse]}}}}
extensions: {{finops: {{}}}}
"""


def test_the_agents_and_guardrails_views_show_the_figures_of_known_events(
        browser: Browser, daemon_factory) -> None:
    webhook = free_port()
    daemon = daemon_factory(AGENTS_PIPELINE.format(
        webhook=webhook, gateway=free_port(), rules=json.dumps(agent_data.RULES)))
    daemon.start(timeout=30)
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        post_events(webhook, agent_data.events())
        tab = Tab(context.new_page(), [])
        tab.page.on("pageerror", lambda e: tab.errors.append(str(e)))
        base = f"http://127.0.0.1:{daemon.admin_port}/?range=24h"
        deadline = time.monotonic() + 30
        while True:  # until the events are in ClickHouse and the page has drawn them
            tab.page.goto(base)
            tab.wait_refreshed(0)
            if tab.text("#tile-runs") == "3" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert tab.text("#tile-runs") == "3"
        assert tab.text("#tile-run-cost") == "$5.75"
        assert tab.text("#tile-tool-calls") == "4"
        assert tab.text("#tile-mcp-connects") == "2"
        assert "average 50 ms" in tab.text("#tile-mcp-latency")
        assert tab.series("chart-agents") == {"USD": 5.75}
        agents = [row.split("\t") for row in
                  tab.page.locator("#table-agents tbody tr").all_inner_texts()]
        assert [(a[0], a[1], a[2]) for a in agents] == [("writer", "1", "$4.00"),
                                                         ("planner", "2", "$1.75")]
        tools = tab.page.locator("#table-tools tbody tr td:first-child").all_inner_texts()
        assert tools == ["search", "fetch"]
        assert "initialize" in tab.text("#table-mcp")
        assert (tab.text("#tile-models"), tab.text("#tile-rules")) == ("2", "4")
        assert (tab.text("#tile-blocked"), tab.text("#tile-modified")) == ("2", "2")
        assert tab.text("#tile-protected") == "2 protected"
        gpt = tab.page.locator("#table-guardrails tbody tr").first.inner_text().split("\t")
        assert gpt == ["gpt-4o", "yes", "3", "3", "2", "7", "2", "1", "28.6%"]
        assert "u1" in tab.text("#table-violations")
        assert tab.errors == []
    finally:
        context.close()
        assert daemon.stop() == 0


def test_calls_that_name_no_provider_are_not_counted_as_an_active_provider(
        tab: Tab, daemon_factory) -> None:
    webhook = free_port()
    daemon = daemon_factory("""
receivers: {webhook: {listen: "127.0.0.1:WEBHOOK"}}
exporters: {clickhouse: {endpoint: "chdb://{data}/clickhouse", batch: {timeout: 20ms}}}
service:
  data_dir: "{data}"
  admin: {listen: "127.0.0.1:{admin}"}
  pipelines: {p: {receivers: [webhook], exporters: [clickhouse]}}
extensions: {finops: {}}
""".replace("WEBHOOK", str(webhook)))
    daemon.start(timeout=30)
    try:
        now = time.time_ns()
        post_events(webhook, [
            Event(event_id="llm", timestamp=now - 60 * 10**9, provider="openai",
                  request_model="gpt-4o", status_code=200, input_tokens=10, output_tokens=5),
            Event(event_id="tool", timestamp=now - 50 * 10**9, operation="execute_tool",
                  tool_name="search", duration_ms=100.0)])
        base = f"http://127.0.0.1:{daemon.admin_port}/?range=24h"
        deadline = time.monotonic() + 30
        while True:  # until both events are in ClickHouse and the page has drawn them
            tab.page.goto(base)
            tab.wait_refreshed(0)
            drawn = (tab.text("#tile-requests") == "2"
                     and tab.page.locator("#provider option").count() == 2)
            if drawn or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert tab.text("#tile-requests") == "2"
        assert tab.page.locator("#provider option").all_inner_texts() == [
            "All providers", "openai"]
        assert tab.text("#tile-providers") == "1"
        assert tab.errors == []
    finally:
        assert daemon.stop() == 0
