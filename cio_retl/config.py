"""Settings read from the environment once, at the edge, into a frozen value.

The API key is held in :class:`Secret`, whose ``repr``/``str`` never show it, so a settings
object can be logged or put in an error message without leaking credentials.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cio_retl.errors import ConfigError

# The workspace limit of Customer.io's current Track API reference: 1000 requests per second
# (the same as cio_retl.ratelimit.RateSpec's default).
DEFAULT_RATE_LIMIT = "1000/1"

TRACK_HOSTS = {"us": "https://track.customer.io", "eu": "https://track-eu.customer.io"}
DEFAULT_WAREHOUSE_FILE = "cio_retl.duckdb"
STATE_SCHEMA = "cio_retl"
RATE_BUDGETS = ("auto", "local", "shared")  # see cio_retl.state.budget.budget_for


@dataclass(frozen=True, slots=True)
class Secret:
    """A string that refuses to be printed."""

    _value: str = field(repr=False)

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True, slots=True)
class Settings:
    warehouse_url: str
    state_url: str
    models_dir: Path
    track_api_url: str
    region: str = "us"
    site_id: str | None = None
    api_key: Secret | None = None
    # Schema of the state tables; another name lets several deployments (or parallel test
    # runs) share one database without sharing snapshots.
    state_schema: str = STATE_SCHEMA
    # The workspace's request limit, and which budget enforces it (cio_retl.state.budget):
    # "local" to this process, "shared" through the state store, or "auto".
    rate_limit: str = DEFAULT_RATE_LIMIT
    rate_budget: str = "auto"

    @property
    def state_is_warehouse(self) -> bool:
        """True when the diff can join warehouse rows with the snapshot in one database."""
        return self.state_url == self.warehouse_url

    def require_credentials(self) -> tuple[str, str]:
        if not self.site_id or not self.api_key:
            raise ConfigError(
                "CIO_SITE_ID and CIO_API_KEY must be set to send (a --dry-run needs neither)"
            )
        return self.site_id, self.api_key.get()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and check every setting; a bad value is a :class:`ConfigError` naming the
        variable, the value's problem and what is allowed, before anything runs."""
        env = os.environ if env is None else env
        region = _choice(env, "CIO_REGION", tuple(TRACK_HOSTS), "us")
        warehouse_url = _database_url(env, "CIO_RETL_WAREHOUSE_URL") or (
            f"duckdb:///{DEFAULT_WAREHOUSE_FILE}"
        )
        api_key = _credential(env, "CIO_API_KEY")
        return cls(
            warehouse_url=warehouse_url,
            state_url=_database_url(env, "CIO_RETL_STATE_URL") or warehouse_url,
            models_dir=Path(env.get("CIO_RETL_MODELS_DIR") or "sql"),
            track_api_url=_track_api_url(env) or TRACK_HOSTS[region],
            region=region,
            site_id=_credential(env, "CIO_SITE_ID"),
            api_key=Secret(api_key) if api_key else None,
            state_schema=_schema_name(env, "CIO_RETL_STATE_SCHEMA") or STATE_SCHEMA,
            rate_limit=_rate_limit(env, "CIO_RETL_RATE_LIMIT") or DEFAULT_RATE_LIMIT,
            rate_budget=_choice(env, "CIO_RETL_RATE_BUDGET", RATE_BUDGETS, "auto"),
        )


def _setting(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value, stripped; unset and empty alike mean "the default"."""
    value = env.get(name)
    return value.strip() if value and value.strip() else None


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = (_setting(env, name) or default).lower()
    if value not in allowed:
        raise ConfigError(
            f"{name}={env.get(name)!r} is not a known value; allowed: {', '.join(allowed)}"
        )
    return value


def _credential(env: Mapping[str, str], name: str) -> str | None:
    """A Site ID or API key, never echoed: a pasted newline or space is a clear error here,
    not a 401 from Customer.io later."""
    value = env.get(name)
    if not value:
        return None
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ConfigError(
            f"{name} contains whitespace or control characters (a pasted newline?); "
            "allowed: the value exactly as Customer.io shows it"
        )
    return value


# Backends cio-retl has dialect support for (cio_retl.dialects), with the URL form to give.
URL_FORMS = {
    "duckdb": "duckdb:///PATH/TO/FILE.duckdb",
    "postgresql": "postgresql+psycopg://USER:PASSWORD@HOST:5432/DATABASE",
    "snowflake": "snowflake://USER:PASSWORD@ACCOUNT/DATABASE/SCHEMA?warehouse=WAREHOUSE",
}


def _database_url(env: Mapping[str, str], name: str) -> str | None:
    """The form of a SQLAlchemy URL, checked without importing any driver: the driver is
    checked where the engine is made (cio_retl.warehouse.create_engine)."""
    value = _setting(env, name)
    if value is None:
        return None
    from sqlalchemy.engine import make_url  # the engine's own URL parser; no driver import
    from sqlalchemy.exc import ArgumentError

    forms = "; ".join(URL_FORMS.values())
    try:
        url = make_url(value)
    except ArgumentError:
        raise ConfigError(
            f"{name} is not a SQLAlchemy URL (scheme://...); allowed: {forms}"
        ) from None
    backend = url.get_backend_name()
    if backend == "postgres":  # SQLAlchemy dropped this alias in 1.4
        raise ConfigError(f"{name}: use postgresql+psycopg://, not postgres://; allowed: {forms}")
    if backend not in URL_FORMS:
        raise ConfigError(f"{name}: {backend!r} databases are not supported; allowed: {forms}")
    return value


def _track_api_url(env: Mapping[str, str]) -> str | None:
    name = "CIO_TRACK_API_URL"
    value = _setting(env, name)
    if value is None:
        return None
    parts = urlsplit(value)
    allowed = "https://HOST[:PORT][/PATH] (http:// for a local emulator or proxy)"
    if "@" in parts.netloc:  # never echoed: user info may hold a password
        raise ConfigError(
            f"{name} must not hold user info (credentials go in CIO_SITE_ID / CIO_API_KEY); "
            f"allowed: {allowed}"
        )
    try:
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ConfigError(
            f"{name}={value!r} is not an http(s) URL with a host and a valid port; "
            f"allowed: {allowed}"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"{name}={value!r} has a query or fragment; allowed: {allowed}")
    return value.rstrip("/")


# Unquoted in every supported database, and within PostgreSQL's 63 bytes (it silently
# truncates longer identifiers: PostgreSQL docs, "Identifiers and Key Words").
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _schema_name(env: Mapping[str, str], name: str) -> str | None:
    value = _setting(env, name)
    if value is not None and not _SCHEMA_NAME.match(value):
        raise ConfigError(
            f"{name}={value!r} is not a plain schema name; allowed: 1 to 63 letters, digits "
            "and underscores, not starting with a digit"
        )
    return value


# REQUESTS/SECONDS, as cio_retl.ratelimit.RateSpec.parse reads it.
RATE_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*s?\s*$")


def _rate_limit(env: Mapping[str, str], name: str) -> str | None:
    """``REQUESTS/SECONDS``, both positive (the form cio_retl.ratelimit.RateSpec reads)."""
    value = _setting(env, name)
    if value is None:
        return None
    match = RATE_SPEC.match(value)
    if not match or int(match.group(1)) < 1 or float(match.group(2)) <= 0:
        raise ConfigError(
            f"{name}={value!r} is not a rate limit; allowed: REQUESTS/SECONDS, both positive, "
            f"e.g. {DEFAULT_RATE_LIMIT}"
        )
    return value
