"""Dagster over event, device and suppression models: their assets, metadata and the
events' lookback check, materialized against the emulator and a real DuckDB warehouse."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from cio_retl.emulator import Emulator
from cio_retl.warehouse import create_engine
from dagster_cio_retl.assets import EVENTS_IN_LOOKBACK, NO_STUCK_ROWS, build_model_assets
from dagster_cio_retl.resources import CustomerIOResource, WarehouseResource
from tests.test_dagster import API_KEY, NO_DELAY, SITE_ID, checks, materialize, metadata
from tests.test_events import DAY, MODELS, NOW, _tables, seconds

pytestmark = pytest.mark.dagster

ORDERS = dg.AssetKey(["customerio", "orders"])
USERS = dg.AssetKey(["customerio", "users"])
DEVICES = dg.AssetKey(["customerio", "devices"])
ERASURES = dg.AssetKey(["customerio", "erasures"])


def test_event_device_and_suppression_assets(tmp_path: Path) -> None:
    url = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA app"))
    for table in _tables("app"):
        table.create(engine)
    recent, old = NOW - DAY, NOW - 40 * DAY
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO app.users VALUES ('u1', 'pro'), ('u2', 'free')"))
        conn.execute(
            sa.text("INSERT INTO app.orders VALUES ('o1', 'u1', :r, 3), ('o0', 'u1', :o, 1)"),
            {"r": recent, "o": old},  # o0: older than the 30-day lookback, never sent
        )
        conn.execute(sa.text("INSERT INTO app.devices VALUES ('u1', 't1', 'ios', NULL, '1')"))
        conn.execute(sa.text("INSERT INTO app.erasures VALUES ('u2')"))
    engine.dispose()
    folder = tmp_path / "models"
    folder.mkdir()
    for name, text in MODELS.items():
        (folder / name).write_text(text.format(s="app"))
    assets = build_model_assets(folder, retry_policy=NO_DELAY)
    specs = {spec.key: spec for a in assets for spec in a.specs}
    assert {d.asset_key for d in specs[ORDERS].deps} >= {USERS}  # a person's events after them
    assert {d.asset_key for d in specs[DEVICES].deps} >= {USERS}
    assert specs[ORDERS].metadata["lookback_days"].value == 30
    assert specs[ORDERS].metadata["event_key"].text == "order_id"

    with Emulator(site_id=SITE_ID, api_key=API_KEY) as emulator:
        resources = {
            "customerio": CustomerIOResource(
                site_id=SITE_ID, api_key=API_KEY, track_api_url=emulator.url
            ),
            "warehouse": WarehouseResource(warehouse_url=url, models_dir=str(folder)),
        }
        result = materialize(assets, resources)
        assert result.success
        orders = metadata(result, ORDERS)
        assert orders["events_sent"] == 1 and orders["created"] == 1
        assert orders["newest_event_sent"] == seconds(recent)
        assert metadata(result, USERS)["skipped_suppressed"] == 1
        assert metadata(result, DEVICES)["created"] == 1
        assert metadata(result, ERASURES)["created"] == 1
        found = checks(result)
        lookback = found[ORDERS, EVENTS_IN_LOOKBACK]
        assert not lookback.passed and lookback.severity is dg.AssetCheckSeverity.WARN
        assert lookback.metadata["events_never_sent"].value == 1
        assert "1 events older than 30 days were never sent" in lookback.description
        assert found[ORDERS, NO_STUCK_ROWS].passed
        assert (DEVICES, EVENTS_IN_LOOKBACK) not in found
        assert len(emulator.workspace.events("id")["u1"]) == 1

        # The next materialization sends nothing new, and the events asset says so.
        again = materialize(assets, resources)
        assert again.success and metadata(again, ORDERS)["events_sent"] == 0
        assert "newest_event_sent" not in metadata(again, ORDERS)
        assert len(emulator.workspace.events("id")["u1"]) == 1
