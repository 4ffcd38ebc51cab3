"""The tracking script and the dashboard in a real browser (Debian's Chromium via Playwright),
against real ingest and gateway processes."""

from __future__ import annotations

import asyncio
import gzip
import http.server
import secrets
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.gateway.aggregates import _source
from app.store.sites import create_site
from app.web.assets import Asset
from tests.clients import post_batches, post_events
from tests.processes import ROOT, AppProcess
from tests.support import BROWSER, FAST, SECRET, eventually, token, unavailable
from workers.embedded import free_port

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
# A real desktop Chrome: the headless UA would (rightly) be dropped as automation.
DESKTOP_UA = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
if shutil.which(CHROMIUM) is None:  # a skip on a laptop, a failure under CI (.ci/run has it)
    unavailable("Chromium is not installed (apt-get install -y chromium)", module=True)

from playwright.async_api import Browser, Page, async_playwright  # noqa: E402


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                # A visitor's browser: navigator.webdriver is false, as for a person.
                "--disable-blink-features=AutomationControlled",
            ],
        )  # fmt: skip
        yield b
        await b.close()


class CustomerPages:
    """Serves the customer's test pages on their own origin (127.0.0.1:<port>)."""

    def __init__(self, pages: dict[str, str]) -> None:
        self.pages = pages
        self.port = free_port()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = outer.pages.get(self.path.split("?")[0].split("#")[0], outer.pages["/"])
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> CustomerPages:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def snippet(site: str, ingest: str, extra: str = "data-allow-localhost") -> str:
    return f"""<!doctype html><html><head><title>Shop</title>
<script>window.sitewire=window.sitewire||function(){{(sitewire.q=sitewire.q||[]).push(arguments)}};
sitewire("Early", {{props: {{when: "before-load"}}}});</script>
<script defer data-site="{site}" data-api="{ingest}/api/event" {extra}
        data-outbound data-downloads src="{ingest}/script.js"></script></head>
<body><h1>Shop</h1>
<a id="out" href="https://partner.example.org/deal?token=s3cret#top"
   onclick="event.preventDefault()">partner</a>
<a id="dl" href="/files/price-list.pdf?X-Amz-Signature=abc"
   onclick="event.preventDefault()">price list</a>
</body></html>"""


@pytest.fixture
async def shop(pool: asyncpg.Pool) -> str:
    site_id = f"shop{secrets.token_hex(3)}.example.com"
    await create_site(pool, site_id, ("127.0.0.1",))  # the test page's origin
    return site_id


async def stored(pool: asyncpg.Pool, site: str, count: int, timeout: float = 15) -> list[Any]:
    """The site's rows once there are `count` (a deadline, not a speed check)."""

    async def enough() -> list[Any]:
        rows = await pool.fetch(
            "SELECT name, path, props, event_id FROM events WHERE site = $1 ORDER BY site_offset",
            site,
        )
        return rows if len(rows) >= count else []

    return await eventually(enough, timeout, 0.05, f"{count} events stored of {site}")


@pytest.fixture
def artifacts() -> Iterator[Path]:
    ARTIFACTS.mkdir(exist_ok=True)
    yield ARTIFACTS


async def test_tracking_script_pageviews_spa_navigation_and_custom_events(
    spawn: Callable[..., AppProcess], browser: Browser, pool: asyncpg.Pool, shop: str
) -> None:
    ingest = spawn("ingest", **FAST)
    with CustomerPages({"/": snippet(shop, ingest.url)}) as pages:
        context = await browser.new_context(user_agent=DESKTOP_UA)
        page = await context.new_page()
        await page.goto(pages.url + "/")
        await page.wait_for_function("typeof window.sitewire === 'function' && !window.sitewire.q")
        await page.evaluate("history.pushState({}, '', '/pricing')")
        await page.evaluate("history.replaceState({}, '', '/pricing')")  # same URL: no pageview
        await page.evaluate("location.hash = '#/plans'")  # hash routing
        await page.wait_for_function("location.hash === '#/plans'")
        await page.evaluate("sitewire('Signup', {props: {plan: 'pro', seats: 3}})")
        await page.click("#out")
        await page.click("#dl")
        rows = await stored(pool, shop, 7)
        await context.close()
    names = [(r["name"], r["path"]) for r in rows]
    assert sorted(names) == sorted(
        [
            ("Early", "/"),
            ("pageview", "/"),
            ("pageview", "/pricing"),
            ("pageview", "/pricing#/plans"),
            ("Signup", "/pricing#/plans"),
            ("Outbound Link: Click", "/pricing#/plans"),
            ("File Download", "/pricing#/plans"),
        ]
    )
    assert len({r["event_id"] for r in rows}) == len(rows) == 7  # each arrived once
    props = {r["name"]: r["props"] for r in rows}
    assert '"plan": "pro"' in props["Signup"] and '"before-load"' in props["Early"]
    # A link's query and fragment are not sent: they may hold a token or a signature (an
    # outside tester's click on the demo's dashboard link stored its viewer token).
    assert props["Outbound Link: Click"] == '{"url": "https://partner.example.org/deal"}'
    assert props["File Download"] == f'{{"url": "{pages.url}/files/price-list.pdf"}}'


async def test_the_readme_snippet_sends_its_pageview_and_custom_event(
    spawn: Callable[..., AppProcess], browser: Browser, pool: asyncpg.Pool, shop: str
) -> None:
    """The README's "Track a site" block as a page, as a newcomer pastes it (an outside tester
    found its custom event thrown away: `sitewire` was called before the deferred script ran).
    Only the ingest's address and the site are changed, and localhost allowed."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Track a site", 1)[1].split("```html\n", 1)[1].split("```", 1)[0]
    ingest = spawn("ingest", **FAST)
    page_html = block.replace("https://ingest.example.com", ingest.url).replace(
        'data-site="example.com"', f'data-site="{shop}" data-allow-localhost'
    )
    assert shop in page_html and ingest.url in page_html
    with CustomerPages({"/": page_html}) as pages:
        context = await browser.new_context(user_agent=DESKTOP_UA)
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(pages.url + "/")
        rows = await stored(pool, shop, 2)
        await context.close()
    assert sorted(r["name"] for r in rows) == ["Signup", "pageview"]
    assert errors == []


async def test_script_skips_automation_localhost_and_opted_out_visitors(
    spawn: Callable[..., AppProcess], browser: Browser, pool: asyncpg.Pool, shop: str
) -> None:
    ingest = spawn("ingest", **FAST)
    pages = {
        "/": snippet(shop, ingest.url, extra=""),  # no data-allow-localhost: local page
        "/allowed": snippet(shop, ingest.url),
    }
    with CustomerPages(pages) as site_pages:
        context = await browser.new_context(user_agent=DESKTOP_UA)
        page = await context.new_page()
        await page.goto(site_pages.url + "/")
        await page.evaluate("sitewire('Signup')")
        # Opted out on this device:
        await page.evaluate("localStorage.setItem('sitewire_ignore', 'true')")
        await page.goto(site_pages.url + "/allowed")
        await page.evaluate("sitewire('Signup')")
        # Driven by automation (navigator.webdriver):
        await page.evaluate("localStorage.removeItem('sitewire_ignore')")
        await context.add_init_script(
            "Object.defineProperty(navigator, 'webdriver', {get: () => true})"
        )
        automated = await context.new_page()
        await automated.goto(site_pages.url + "/allowed")
        await automated.evaluate("sitewire('Signup')")
        # On purpose: time for a request the script should not have sent to be stored.
        await asyncio.sleep(1.0)
        await context.close()
    assert await pool.fetchval("SELECT count(*) FROM events WHERE site = $1", shop) == 0


async def test_script_is_small_and_served_first_party(spawn: Callable[..., AppProcess]) -> None:
    ingest = spawn("ingest", **FAST)
    asset = Asset.load("script.js", "application/javascript", 0)
    assert len(gzip.compress(asset.body, 9)) < 2048, "the tracking script must stay under 2 KB gz"
    async with httpx.AsyncClient() as client:
        r = await client.get(f"{ingest.url}/script.js", headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    assert r.headers["content-type"].startswith("application/javascript")
    assert r.content == asset.body


async def wait_rows(page: Page, count: int, timeout: float = 15) -> list[str]:
    await page.wait_for_function(
        f"document.querySelectorAll('[data-testid=rows] tr').length >= {count}",
        timeout=timeout * 1000,
    )
    names: list[str] = await page.eval_on_selector_all(
        "[data-testid=rows] tr td.path", "tds => tds.map(td => td.textContent)"
    )
    return names


async def test_dashboard_shows_live_events_and_resumes_after_a_cut(
    spawn: Callable[..., AppProcess],
    browser: Browser,
    pool: asyncpg.Pool,
    shop: str,
    artifacts: Path,
) -> None:
    ingest = spawn("ingest", **FAST)
    gateway = spawn("gateway", **FAST)
    with CustomerPages({"/": snippet(shop, ingest.url)}) as pages:
        visitor = await browser.new_context(user_agent=DESKTOP_UA)
        viewer = await browser.new_context(viewport={"width": 1100, "height": 700})
        dashboard = await viewer.new_page()
        await dashboard.goto(f"{gateway.url}/dashboard/{shop}?token={token(shop)}")
        await dashboard.wait_for_selector("[data-testid=status][data-state=live]")
        page = await visitor.new_page()
        await page.goto(pages.url + "/")
        await page.evaluate("history.pushState({}, '', '/checkout')")
        paths = await wait_rows(dashboard, 3)
        rows = await stored(pool, shop, 3)  # the browser's requests may commit in any order
        assert paths == [r["path"] for r in reversed(rows)]  # newest (highest offset) first
        # The analytics view shows the server's aggregates: the same numbers as GET /stats.
        await dashboard.wait_for_function(
            "document.querySelector('[data-testid=pageviews]').textContent === '2'"
        )
        stats = await _stats(gateway, shop)
        assert await dashboard.inner_text("[data-testid=visitors]") == str(stats["visitors_now"])
        assert await dashboard.inner_text("[data-testid=events]") == str(stats["events"]) == "3"
        pages = await dashboard.eval_on_selector_all(
            "[data-testid=pages] li .v", "els => els.map(e => e.textContent)"
        )
        assert pages == [p["value"] for p in stats["pages"]]
        assert await _chart_pageviews(dashboard) == stats["pageviews"] == 2

        # Cut the dashboard's connection: the gateway dies; events keep coming meanwhile.
        gateway.kill()
        await dashboard.wait_for_selector("[data-testid=status][data-state=connecting]")
        await post_events(ingest.url, shop, 3)
        replacement = await asyncio.to_thread(gateway.restarted)
        try:
            paths = await wait_rows(dashboard, 6, timeout=30)
            await dashboard.wait_for_selector("[data-testid=status][data-state=live]")
            assert paths[:3] == ["/p/2", "/p/1", "/p/0"]  # resumed: nothing missed
            assert len(paths) == 6  # and nothing twice
            # The chart moved with the new pageviews (counted by the replacement gateway).
            await dashboard.wait_for_function(f"({CHART_SUM}) === 5")
            # A page in a panel filters the log and the panels: the numbers of that page
            # alone, as the server counts them (GET /stats?page=/checkout).
            await dashboard.click("[data-testid=pages] li[data-filter='/checkout']")
            assert await wait_rows(dashboard, 1) == ["/checkout"]
            await dashboard.wait_for_selector("[data-testid=filters] .chip[data-filter=page]")
            await dashboard.wait_for_function(
                "document.querySelector('[data-testid=pageviews]').textContent === '1'"
            )
            only = await _stats(replacement, shop, page="/checkout")
            assert only["pageviews"] == 1 and only["filters"] == {"page": "/checkout"}
            assert await _panel(dashboard, "pages") == [p["value"] for p in only["pages"]]
            assert await _panel(dashboard, "sources") == [s["value"] for s in only["sources"]]
            await dashboard.fill("[data-testid=filter]", "checkout")
            assert await wait_rows(dashboard, 1) == ["/checkout"]
            await dashboard.fill("[data-testid=filter]", "")
            await dashboard.screenshot(path=str(artifacts / "dashboard-filtered.png"))
            # Removing the filter brings every event back, in the log and the panels.
            await dashboard.click("[data-testid=filters] .chip button")
            await dashboard.wait_for_function(
                "document.querySelector('[data-testid=pageviews]').textContent === '5'"
            )
            assert len(await wait_rows(dashboard, 6)) == 6
            await dashboard.screenshot(path=str(artifacts / "dashboard.png"))
            await dashboard.set_viewport_size({"width": 390, "height": 800})
            await dashboard.screenshot(path=str(artifacts / "dashboard-phone.png"))
        finally:
            replacement.stop()
        await visitor.close()
        await viewer.close()


async def test_dashboard_explains_a_missing_or_expired_token(
    spawn: Callable[..., AppProcess], browser: Browser, shop: str
) -> None:
    from app import tokens

    gateway = spawn("gateway", **FAST)
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(f"{gateway.url}/dashboard/{shop}")
    assert "needs a viewer token" in await page.inner_text("[data-testid=banner]")
    expired = tokens.issue(SECRET, shop, ttl_s=-10)
    await page.goto(f"{gateway.url}/dashboard/{shop}?token={expired}")
    await page.wait_for_selector("[data-testid=status][data-state=error]")
    assert "the token has expired" in await page.inner_text("[data-testid=banner]")
    # Another site's token on this site's dashboard (an outside tester read "missing, invalid
    # or expired" and looked for the fault in the wrong place).
    other = tokens.issue(SECRET, "other.example.com", ttl_s=600)
    await page.goto(f"{gateway.url}/dashboard/{shop}?token={other}")
    await page.wait_for_selector("[data-testid=status][data-state=error]")
    banner = await page.inner_text("[data-testid=banner]")
    assert "not valid for this site" in banner and f"sitewire sites token {shop}" in banner
    await context.close()


async def test_a_fast_stream_switches_the_log_to_a_sample_and_back(
    spawn: Callable[..., AppProcess], browser: Browser, site: str, artifacts: Path
) -> None:
    """More events than a person can read: the log shows a sample and says so, while the
    numbers still count every event; when the rate falls, every event is shown again."""
    ingest = spawn("ingest", **FAST)
    gateway = spawn("gateway", **FAST)
    context = await browser.new_context(viewport={"width": 1100, "height": 700})
    dashboard = await context.new_page()
    await dashboard.goto(f"{gateway.url}/dashboard/{site}?token={token(site)}")
    await dashboard.wait_for_selector("[data-testid=status][data-state=live]")
    total = 3000
    await post_batches(ingest.url, site, total)
    await dashboard.wait_for_selector("[data-testid=sampling].show")
    assert "sample" in await dashboard.inner_text("[data-testid=sampling]")
    await dashboard.wait_for_function(
        f"document.querySelector('[data-testid=events]').textContent === '{total}'",
        timeout=20_000,
    )
    shown = await dashboard.eval_on_selector_all("[data-testid=rows] tr", "els => els.length")
    assert shown < total / 4  # a sample, not the lot
    await dashboard.screenshot(path=str(artifacts / "dashboard-sampled.png"))
    # Calm again: the dashboard goes back to every event by itself.
    await dashboard.wait_for_selector(
        "[data-testid=sampling]:not(.show)", state="attached", timeout=15_000
    )
    await post_events(ingest.url, site, 2, start=9000)
    await dashboard.wait_for_function(  # both shown: no sample any more
        "[...document.querySelectorAll('[data-testid=rows] td.path')].slice(0, 2)"
        ".map(td => td.textContent).join() === '/p/9001,/p/9000'"
    )
    await context.close()


async def test_the_dashboard_holds_up_against_what_visitors_send(
    spawn: Callable[..., AppProcess], browser: Browser, shop: str
) -> None:
    """From an outside test: a malformed escape in `utm_source` threw in the dashboard (its
    filter then showed nothing, and live events after it were lost from the log); a goal with
    many props ran its panel tens of thousands of pixels long; a long path widened the log past
    the window. Sources are named as the server names them, a goal shows its three most used
    props (most used first), and the log keeps to the window's width."""
    ingest = spawn("ingest", **FAST)
    gateway = spawn("gateway", **FAST)
    odd = [
        "utm_source=%E0%A4%A",  # cut short: Python leaves it as it is
        "utm_source=%E0%A4%A4x",  # valid UTF-8
        "utm_source=%FFab+cd",  # an undecodable byte, and a "+"
        "utm_source=&utm_source=second",  # a blank one is skipped
        "x=1&utm_source=%20%20",  # blank once stripped: the referrer's host instead
        "utm%5Fsource=escaped",  # the server looks for "utm_source=" as written: (direct)
        "utm_source=%EF%BB%BFbom%1C",  # a byte-order mark kept; U+001C stripped, as Python does
        "utm_source=%E2%80%AEmoc.elgoog",  # a right-to-left override: shown as U+FFFD
    ]
    bodies: list[dict[str, Any]] = [
        {"site": shop, "name": "pageview", "url": f"https://{shop}/q?{q}"} for q in odd
    ]
    bodies.append({"site": shop, "name": "pageview", "url": f"https://{shop}/{'long' * 400}"})
    # A link between the shop's own pages: in no source, and no source filter shows it.
    bodies.append(
        {
            "site": shop,
            "name": "pageview",
            "url": f"https://{shop}/b",
            "referrer": f"https://{shop}/",
        }
    )
    props = {f"prop{i:02}-{'k' * 200}": "v" * 300 for i in range(25)}
    bodies.append({"site": shop, "name": "Signup", "url": f"https://{shop}/", "props": props})
    bodies += [
        {"site": shop, "name": "Signup", "url": f"https://{shop}/", "props": {"plan": p}}
        for p in ("pro", "pro", "team")
    ]
    bodies[-1]["props"]["404"] = "x"  # an integer-like key: JavaScript would put it first
    bodies[-1]["props"]["note"] = "\u202eexe.pdf"  # must not reorder the props beside it
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"{gateway.url}/dashboard/{shop}?token={token(shop)}")
    await page.wait_for_selector("[data-testid=status][data-state=live]")
    async with httpx.AsyncClient(headers={"User-Agent": BROWSER}, timeout=10) as client:
        r = await client.post(f"{ingest.url}/api/events", json=bodies)
        assert r.status_code == 202 and all(x["status"] == 202 for x in r.json()["results"])
    assert len(await wait_rows(page, len(bodies))) == len(bodies)
    stats = await _stats(gateway, shop)
    await page.wait_for_function(
        f"document.querySelector('[data-testid=events]').textContent === '{len(bodies)}'"
    )
    assert sorted(await _panel(page, "sources")) == sorted(s["value"] for s in stats["sources"])
    # Every source filters the log to the events (goals too) the server names so.
    for entry in stats["sources"]:
        events = sum(
            _source({"url": b["url"], "referrer": b.get("referrer")}) == entry["value"]
            for b in bodies
        )
        await page.click(f"[data-testid=sources] li[data-filter={_css_string(entry['value'])}]")
        assert len(await wait_rows(page, events)) == events, entry
        await page.click("[data-testid=filters] .chip button")
    await page.fill("[data-testid=filter]", "pageview")
    assert len(await wait_rows(page, 10)) == 10
    shown = await page.eval_on_selector_all(
        "[data-testid=goals] li.props", "els => els.map(e => e.textContent)"
    )
    signup = stats["goals"][0]
    assert [line.split(":")[0] for line in shown] == list(signup["props"])[:3]
    assert shown[0] == "plan: pro (2), team (1)"
    assert await page.evaluate("document.documentElement.scrollWidth") <= 1280
    time_cell = "document.querySelector('[data-testid=rows] td.time')"
    assert await page.evaluate(f"{time_cell}.scrollWidth <= {time_cell}.clientWidth")
    await page.fill("[data-testid=filter]", "")
    assert len(await wait_rows(page, len(bodies))) == len(bodies)
    isolated = (
        "[...document.querySelectorAll('[data-testid=rows] td.props')]"
        ".map(td => td.querySelectorAll('bdi').length)"
    )
    assert 3 in await page.evaluate(isolated)  # plan, 404 and note, each in its own <bdi>
    assert await page.evaluate("document.querySelector('[data-testid=goals]').offsetHeight") < 400
    assert errors == []
    await context.close()


def _css_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def _panel(page: Page, name: str) -> list[str]:
    values: list[str] = await page.eval_on_selector_all(
        f"[data-testid={name}] li .v", "els => els.map(e => e.textContent)"
    )
    return values


async def _stats(gateway: AppProcess, site: str, **filters: str) -> dict[str, Any]:
    params = {"token": token(site), **filters}
    async with httpx.AsyncClient(timeout=15) as client:
        r = await client.get(f"{gateway.url}/v1/sites/{site}/stats", params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


#: The pageviews the chart's 30 bars add up to.
CHART_SUM = (
    "[...document.querySelectorAll('#chart rect')]"
    ".reduce((n, r) => n + Number(r.dataset.pageviews), 0)"
)


async def _chart_pageviews(page: Page) -> int:
    total: int = await page.evaluate(CHART_SUM)
    return total
