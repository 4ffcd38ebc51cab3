"""Bot detection gives crawlerdetect's verdicts at a bounded cost per User-Agent (#16)."""

from __future__ import annotations

import ipaddress
import random
import time

from crawlerdetect import CrawlerDetect
from hypothesis import given, settings
from hypothesis import strategies as st

from app.ingest.enrich import BotDetector, Crawlers, client_ip

BROWSERS = [
    "Mozilla/5.0 (X11; Linux x86_64; rv:130.0) Gecko/20100101 Firefox/130.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/128.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8 Build/AP2A.240805.005; wv) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Version/4.0 Chrome/127.0.6533.103 Mobile Safari/537.36 "
    "[FB_IAB/FB4A;FBAV/475.0.0.51.110;]",
    "YandexSearch/24.1 (Android)",
]
BOTS = [
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, "
    "like Gecko) Chrome/128.0.0.0 Mobile Safari/537.36 (compatible; Googlebot/2.1; "
    "+http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "curl/8.5.0",
    "python-requests/2.32.3",
    "facebookexternalhit/1.1",
]
#: User-Agents made to be slow for a backtracking matcher: 1,000 characters, as ingest keeps.
CRAFTED = [
    "".join(random.Random(1).choice("ab") for _ in range(1000)),
    (("a" * 8 + "-") * 120)[:1000],
    "Mozilla/5.0 " + "a" * 988,
]

crawlers = Crawlers()
reference = CrawlerDetect()


def test_same_verdicts_as_crawlerdetect_on_known_agents() -> None:
    for agent in BROWSERS + CRAFTED:
        assert not crawlers.match(agent), agent
    for agent in BOTS:
        assert crawlers.match(agent), agent
    for agent in BROWSERS + BOTS + CRAFTED:
        assert crawlers.match(agent) == reference.is_crawler(agent), agent


# Printable ASCII and pieces of real agents: what a User-Agent header carries.
pieces = st.sampled_from(["Mozilla/5.0 ", "(", ")", "; ", "bot", "Yandex", "Search", "Bot", "/"])
agents = st.lists(st.text(st.characters(min_codepoint=32, max_codepoint=126)) | pieces).map("".join)


@settings(max_examples=300, deadline=None)
@given(agents)
def test_same_verdicts_as_crawlerdetect_on_any_agent(agent: str) -> None:
    assert crawlers.match(agent) == reference.is_crawler(agent)


def best_of(runs: int, agent: str) -> float:
    """The fastest of `runs` uncached checks (the least disturbed by the rest of the host)."""
    detector = BotDetector()
    timings = []
    for i in range(runs):
        began = time.perf_counter()
        detector.reason(f"{agent} {i}")  # a new string each time: never from the cache
        timings.append(time.perf_counter() - began)
    return min(timings)


def test_a_crafted_agent_costs_about_what_a_normal_one_does() -> None:
    """A ratio within one run, not a speed goal: crawlerdetect's own matcher took 40-150x."""
    normal = max(best_of(20, agent) for agent in BROWSERS[:4])
    for agent in CRAFTED:
        assert best_of(20, agent) < 3 * normal, agent[:40]


def test_the_client_cannot_push_the_proxys_hop_out_of_forwarded_for() -> None:
    """A client writes the left of X-Forwarded-For; a proxy adding its own header line puts
    its hop on the right (ingest joins repeated headers). Only the right-most 32 hops count:
    with the left-most 32, forty forged hops chose the client's IP (a review)."""
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    forged = ", ".join(f"203.0.113.{i}" for i in range(40))
    assert client_ip("10.0.0.5", f"{forged}, 198.51.100.7", trusted) == "198.51.100.7"
    assert client_ip("10.0.0.5", f"{forged}, 198.51.100.7, 10.0.0.9", trusted) == "198.51.100.7"
