"""Settings read from the environment once, at the edge, into a frozen value.

The API key is held in :class:`Secret`, whose ``repr``/``str`` never show it, so a settings
object can be logged or put in an error message without leaking credentials.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cio_retl.errors import ConfigError

TRACK_HOSTS = {"us": "https://track.customer.io", "eu": "https://track-eu.customer.io"}
DEFAULT_WAREHOUSE_FILE = "cio_retl.duckdb"
STATE_SCHEMA = "cio_retl"


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
    # The workspace's request limit, and which budget enforces it (cio_retl.ratelimit):
    # "local" to this process, "shared" through the state store, or "auto".
    rate_limit: str = "3000/3"
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
        env = os.environ if env is None else env
        region = env.get("CIO_REGION", "us").strip().lower() or "us"
        if region not in TRACK_HOSTS:
            raise ConfigError(f"CIO_REGION must be one of {sorted(TRACK_HOSTS)}, not {region!r}")
        warehouse_url = env.get("CIO_RETL_WAREHOUSE_URL") or f"duckdb:///{DEFAULT_WAREHOUSE_FILE}"
        api_key = env.get("CIO_API_KEY")
        return cls(
            warehouse_url=warehouse_url,
            state_url=env.get("CIO_RETL_STATE_URL") or warehouse_url,
            models_dir=Path(env.get("CIO_RETL_MODELS_DIR") or "sql"),
            track_api_url=(env.get("CIO_TRACK_API_URL") or TRACK_HOSTS[region]).rstrip("/"),
            region=region,
            site_id=env.get("CIO_SITE_ID") or None,
            api_key=Secret(api_key) if api_key else None,
            state_schema=env.get("CIO_RETL_STATE_SCHEMA") or STATE_SCHEMA,
            rate_limit=env.get("CIO_RETL_RATE_LIMIT") or "3000/3",
            rate_budget=(env.get("CIO_RETL_RATE_BUDGET") or "auto").strip().lower(),
        )
