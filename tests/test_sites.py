import os
import subprocess
import sys

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app import tokens
from app.errors import InvalidSiteId
from app.settings import Settings
from app.store.sites import (
    SiteCache,
    SiteExists,
    create_site,
    get_site,
    is_valid_site_id,
    validate_site_id,
)
from tests.support import BROWSER

SECRET = "test-secret-" + "x" * 32


@pytest.mark.parametrize("site", ["example.com", "a.b-c.io", "x", "shop1.example.co.uk"])
def test_valid_site_ids(site: str) -> None:
    assert validate_site_id(site) == site


@pytest.mark.parametrize(
    "site",
    [
        "",
        "Example.com",
        "a*",
        "a?b",
        "[abc]",
        "a:b",
        "{a}",
        "a b",
        "-a.com",
        "a-.com",
        "a..b",
        ".a",
        "a/b",
        "é.com",
        "a" * 64 + ".com",
        ("a." * 127) + "com",
    ],
)
def test_invalid_site_ids(site: str) -> None:
    with pytest.raises(InvalidSiteId):
        validate_site_id(site)


@given(st.text(max_size=80))
def test_valid_ids_never_contain_pattern_or_key_characters(site: str) -> None:
    if is_valid_site_id(site):
        assert not set(site) & set("*?[]{}:\\ /")


async def test_create_and_get(pool: asyncpg.Pool) -> None:
    created = await create_site(pool, "create-test.example.org", ("www.other.org",))
    assert created.next_offset == 1 and len(created.epoch) == 8
    fetched = await get_site(pool, "create-test.example.org")
    assert fetched == created
    with pytest.raises(SiteExists):
        await create_site(pool, "create-test.example.org")


async def test_the_cache_reads_many_sites_at_once_and_keeps_known_ones_under_a_flood(
    pool: asyncpg.Pool,
) -> None:
    """A batch naming many sites costs one query for those not cached, and ids nobody
    registered (from the internet) are evicted before the sites in use (an outside test: one
    client inventing ids cleared the whole cache every ~1,000 requests)."""
    known = [f"cache{i}-{os.getpid()}.example.org" for i in range(3)]
    for site in known:
        await create_site(pool, site)
    cache = SiteCache(pool, max_entries=50)
    unknown = [f"nobody{i}.example.org" for i in range(40)]
    assert cache.cached([*known, *unknown]) == {}
    found = await cache.read_many([*known, *unknown])
    assert {s for s, v in found.items() if v is not None} == set(known)
    assert all(found[s] is None for s in unknown)
    await pool.execute("DELETE FROM sites WHERE id = $1", known[0])  # cached: still answered
    assert cache.cached(known)[known[0]] is not None
    for round_ in range(5):  # 200 more invented ids, 40 at a time
        await cache.read_many([f"flood{round_}-{i}.example.org" for i in range(40)])
    assert len(cache._entries) <= 50
    assert all(cache._entries[s][1] is not None for s in known)


async def test_a_batch_with_an_unreadable_site_keeps_its_cached_ones(
    pool: asyncpg.Pool, settings: Settings
) -> None:
    """A review: one site the registry could not be read for refused the whole batch 503,
    cached sites included. Now only the unread sites wait; the others are answered."""
    from app.ingest.app import Client, _refused_sites, create_app

    site = f"cached-{os.getpid()}.example.org"
    await create_site(pool, site)
    app = create_app(settings)
    async with app.api.router.lifespan_context(app.api):
        state = app.state.ingest
        # A registry read through a pool that is gone: cached sites still answer.
        gone = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1)
        state.sites = SiteCache(gone)
        await state.sites.read_many([site])  # cached now
        await gone.close()
        client = Client("203.0.113.9", BROWSER, None)
        refused = await _refused_sites(state, client, {site, "typo.example"})
    assert set(refused) == {"typo.example"}
    assert refused["typo.example"].code.code == "storage_unavailable"


async def test_database_refuses_invalid_id_even_bypassing_python(pool: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute("INSERT INTO sites (id, epoch) VALUES ('a*b', 'e')")


def _cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url, "SITEWIRE_SECRET": SECRET}
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_create_and_list(database_url: str) -> None:
    created = _cli(database_url, "sites", "create", "cli-site.example.net")
    assert created.returncode == 0, created.stderr
    assert "created site cli-site.example.net" in created.stdout
    again = _cli(database_url, "sites", "create", "cli-site.example.net")
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = _cli(database_url, "sites", "create", "Bad*Site")
    assert bad.returncode == 2 and "invalid site id" in bad.stderr
    listed = _cli(database_url, "sites", "list")
    assert listed.returncode == 0 and "cli-site.example.net" in listed.stdout
    assert "Bad*Site" not in listed.stdout


def test_cli_token_for_a_registered_site(database_url: str) -> None:
    assert _cli(database_url, "sites", "create", "token-site.example.net").returncode == 0
    done = _cli(database_url, "sites", "token", "token-site.example.net", "--ttl", "60")
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    tokens.verify(SECRET, token, "token-site.example.net")
    with pytest.raises(tokens.InvalidToken):
        tokens.verify(SECRET, token, "other.example.net")


def test_cli_token_refuses_a_site_that_is_not_registered(database_url: str) -> None:
    """The gateway would refuse such a viewer (unknown_site): no token is printed."""
    done = _cli(database_url, "sites", "token", "nosuch.example")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "Error: site nosuch.example is not registered: register it first "
        "(sitewire sites create nosuch.example)"
    ]
