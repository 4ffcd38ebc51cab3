import ipaddress
import os
import subprocess
import sys

import pytest

from app.errors import SettingsError
from app.settings import Settings


def test_an_unset_variable_gives_the_fields_own_default() -> None:
    """The defaults are written once, on the fields: from_env keeps no copy of its own that
    could drift from them (and nothing is configured that was not asked for)."""
    s = Settings.from_env({})
    assert s == Settings()
    assert s.database_url is None and s.redis_url is None and s.secret is None


def test_values_are_parsed() -> None:
    s = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://u@h/db",
            "REDIS_URL": "redis://h:1/0",
            "SITEWIRE_KEY_PREFIX": "prod-eu",
            "SITEWIRE_SECRET": "s" * 40,
            "SITEWIRE_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1",
            "SITEWIRE_LOG_LEVEL": "debug",
            "SITEWIRE_LOG_FORMAT": "JSON",
        }
    )
    assert s.key_prefix == "prod-eu"
    assert ipaddress.ip_address("10.1.2.3") in s.trusted_proxies[0]
    assert s.log_level == "DEBUG"
    assert s.log_format == "json"


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("DATABASE_URL", "mysql://x", "must start with"),
        ("REDIS_URL", "http://x", "must start with"),
        ("SITEWIRE_KEY_PREFIX", "a:b*", "letters, digits"),
        ("SITEWIRE_SECRET", "short", "at least 32"),
        ("SITEWIRE_MAX_BATCH_EVENTS", "lots", "must be an integer"),
        ("SITEWIRE_MAX_BATCH_EVENTS", "0", "at least 1"),
        ("SITEWIRE_LISTEN_BACKLOG", "0", "at least 1"),
        ("SITEWIRE_TRUSTED_PROXIES", "10.0.0.0/8,nope", "'nope' is not an IP"),
        ("SITEWIRE_LOG_LEVEL", "LOUD", "must be DEBUG"),
        ("SITEWIRE_LOG_FORMAT", "yaml", "must be json, text or auto"),
    ],
)
def test_bad_value_names_the_variable(variable: str, value: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: value})
    assert info.value.variable == variable
    assert str(info.value).startswith(variable)
    assert fragment in str(info.value)


def test_cli_fails_fast_with_the_variable_name() -> None:
    env = {**os.environ, "DATABASE_URL": "postgresql://x/y", "SITEWIRE_RATE_IP_PER_MIN": "many"}
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "ingest"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "SITEWIRE_RATE_IP_PER_MIN must be an integer" in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "hidden", "shown"),
    [
        ("SITEWIRE_SECRET", "hunter2-is-my-password", "hunter2", "got 22 characters"),
        ("DATABASE_URL", "mysql://app:s3cret@db/x", "s3cret", "mysql://***@db/x"),
        ("DATABASE_URL", "mysql://app:s3@cr/et@db/x", "cr/et", "mysql://***@db/x"),
        ("DATABASE_URL", "mysql://db/x?user=a&password=s3cret", "s3cret", "password=***"),
        ("REDIS_URL", "http://:s3cret@cache:6379", "s3cret", "http://***@cache:6379"),
    ],
)
def test_a_refused_secret_is_not_repeated(
    variable: str, value: str, hidden: str, shown: str
) -> None:
    """Error messages end up in terminals, CI logs and log collectors."""
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: value})
    assert hidden not in str(info.value) and shown in str(info.value)
