"""The demo warehouse: a small, seeded database (DuckDB, PostgreSQL or Snowflake) that the
models in ``sql/`` read: users, companies, memberships, the users' orders (sent as
``order_completed`` events) and their push devices.

``cio-retl demo`` builds it, syncs it to the local emulator, edits a few rows and syncs again,
so anyone can see in a minute that the second run sends only what changed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

PLANS = ("free", "starter", "pro", "enterprise")
ROLES = ("member", "admin", "billing")
CURRENCIES = ("EUR", "USD", "GBP")
FIRST = (
    "Ada",
    "Grace",
    "Alan",
    "Edsger",
    "Barbara",
    "Ken",
    "Margaret",
    "Linus",
    "Frances",
    "Dennis",
)
LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Thompson", "Hamilton", "Torvalds")


@dataclass(frozen=True, slots=True)
class DemoSize:
    users: int = 500
    companies: int = 40
    deleted_users: int = 10


def create_demo_warehouse(
    engine: Engine, size: DemoSize | None = None, seed: int = 7, *, schema: str = "demo"
) -> None:
    """(Re)create ``schema`` with users, companies and memberships.

    DuckDB, PostgreSQL and Snowflake get the same rows; only the nested ``preferences``
    column has each database's own type (STRUCT, JSONB, OBJECT).
    """
    size = size or DemoSize()
    rng = random.Random(seed)
    companies = [
        {
            "company_id": f"co-{i:04d}",
            "name": f"{rng.choice(LAST)} & {rng.choice(LAST)} {('Ltd', 'Inc', 'GmbH', 'SAS')[i % 4]}",
            "plan": rng.choice(PLANS),
            "seats": rng.randint(1, 500),
            "founded_on": f"{rng.randint(1990, 2024)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        }
        for i in range(size.companies)
    ]
    users = []
    memberships = []
    for i in range(size.users):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        users.append(
            {
                "user_id": i + 1,
                "email": f"{first.lower()}.{last.lower()}.{i}@example.com",
                "first_name": first,
                "last_name": last if rng.random() > 0.05 else None,
                "plan": rng.choice(PLANS),
                "lifetime_value": f"{rng.randint(0, 500_000) / 100:.2f}",
                "is_admin": rng.random() < 0.1,
                "created_at": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
                f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00",
                "newsletter": rng.random() < 0.6,
                "deleted": i < size.deleted_users,
            }
        )
        for company in rng.sample(companies, k=rng.choice((0, 1, 1, 1, 2))):
            memberships.append(
                {"user_id": i + 1, "company_id": company["company_id"], "role": rng.choice(ROLES)}
            )
    # Orders and devices draw from their own seeded stream, so the other tables' rows are the
    # same as before they existed.
    extra = random.Random(seed + 1)
    orders: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    for user in users:
        for _ in range(extra.choice((0, 1, 1, 2, 3))):
            orders.append(
                {
                    "order_id": f"ord-{len(orders) + 1:05d}",
                    "user_id": user["user_id"],
                    "completed_at": f"2025-{extra.randint(1, 12):02d}-{extra.randint(1, 28):02d} "
                    f"{extra.randint(0, 23):02d}:{extra.randint(0, 59):02d}:"
                    f"{extra.randint(0, 59):02d}.{extra.randint(0, 999):03d}",
                    "total": f"{extra.randint(500, 50_000) / 100:.2f}",
                    "currency": extra.choice(CURRENCIES),
                }
            )
        if extra.random() < 0.3:
            devices.append(
                {
                    "user_id": user["user_id"],
                    "device_token": f"tok-{extra.getrandbits(64):016x}",
                    "platform": extra.choice(("ios", "android")),
                    "last_used": f"2025-{extra.randint(1, 12):02d}-{extra.randint(1, 28):02d} "
                    f"{extra.randint(0, 23):02d}:00:00",
                    "app_version": f"3.{extra.randint(0, 9)}.{extra.randint(0, 9)}",
                }
            )
    types = _TYPES.get(engine.dialect.name, _TYPES["duckdb"])
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
        conn.execute(
            sa.text(
                f"CREATE TABLE {schema}.companies (company_id VARCHAR PRIMARY KEY, name VARCHAR,"
                " plan VARCHAR, seats INTEGER, founded_on DATE)"
            )
        )
        conn.execute(
            sa.text(
                f"CREATE TABLE {schema}.users (user_id INTEGER PRIMARY KEY, email VARCHAR,"
                " first_name VARCHAR, last_name VARCHAR, plan VARCHAR,"
                " lifetime_value DECIMAL(12, 2), is_admin BOOLEAN, created_at TIMESTAMP,"
                f" preferences {types.preferences}, deleted_at TIMESTAMP)"
            )
        )
        conn.execute(
            sa.text(
                f"CREATE TABLE {schema}.memberships (user_id INTEGER, company_id VARCHAR,"
                " role VARCHAR, PRIMARY KEY (user_id, company_id))"
            )
        )
        _insert(
            conn,
            f"{schema}.companies",
            "v.company_id, v.name, v.plan, CAST(v.seats AS INTEGER), CAST(v.founded_on AS DATE)",
            companies,
        )
        _insert(
            conn,
            f"{schema}.users",
            "CAST(v.user_id AS INTEGER), v.email, v.first_name, CAST(v.last_name AS VARCHAR),"
            " v.plan, CAST(v.lifetime_value AS DECIMAL(12, 2)), CAST(v.is_admin AS BOOLEAN),"
            f" CAST(v.created_at AS TIMESTAMP), {types.preferences_value},"
            " CASE WHEN v.deleted THEN CAST('2025-01-01' AS TIMESTAMP) END",
            users,
        )
        _insert(
            conn,
            f"{schema}.memberships",
            "CAST(v.user_id AS INTEGER), v.company_id, v.role",
            memberships,
        )
        conn.execute(
            sa.text(
                f"CREATE TABLE {schema}.orders (order_id VARCHAR PRIMARY KEY, user_id INTEGER,"
                " completed_at TIMESTAMP, total DECIMAL(10, 2), currency VARCHAR)"
            )
        )
        conn.execute(
            sa.text(
                f"CREATE TABLE {schema}.devices (user_id INTEGER, device_token VARCHAR,"
                " platform VARCHAR, last_used TIMESTAMP, app_version VARCHAR,"
                " PRIMARY KEY (user_id, device_token))"
            )
        )
        _insert(
            conn,
            f"{schema}.orders",
            "v.order_id, CAST(v.user_id AS INTEGER), CAST(v.completed_at AS TIMESTAMP),"
            " CAST(v.total AS DECIMAL(10, 2)), v.currency",
            orders,
        )
        _insert(
            conn,
            f"{schema}.devices",
            "CAST(v.user_id AS INTEGER), v.device_token, v.platform,"
            " CAST(v.last_used AS TIMESTAMP), v.app_version",
            devices,
        )


@dataclass(frozen=True, slots=True)
class _DemoTypes:
    preferences: str  # the column type of users.preferences (a nested value)
    preferences_value: str  # building it from v.newsletter


_TYPES = {
    "duckdb": _DemoTypes(
        "STRUCT(newsletter BOOLEAN, locale VARCHAR)",
        "struct_pack(newsletter := CAST(v.newsletter AS BOOLEAN), locale := 'en')",
    ),
    "postgresql": _DemoTypes(
        "JSONB", "jsonb_build_object('newsletter', CAST(v.newsletter AS BOOLEAN), 'locale', 'en')"
    ),
    "snowflake": _DemoTypes(
        "OBJECT",
        "object_construct('newsletter', CAST(v.newsletter AS BOOLEAN), 'locale', 'en')",
    ),
}


def _insert(conn: Connection, table: str, select: str, rows: list[dict[str, Any]]) -> None:
    """Portable multi-row insert: ``INSERT ... SELECT <select> FROM (VALUES ...) AS v``.

    One statement per 200 rows, not one per row (Snowflake's VALUES also forbids the
    function calls that build nested values, so they go in the SELECT).
    """
    columns = list(rows[0])
    for start in range(0, len(rows), 200):
        chunk = rows[start : start + 200]
        values = ", ".join(
            "(" + ", ".join(f":p{i}_{c}" for c in range(len(columns))) + ")"
            for i in range(len(chunk))
        )
        params = {
            f"p{i}_{c}": row[column]
            for i, row in enumerate(chunk)
            for c, column in enumerate(columns)
        }
        conn.execute(
            sa.text(
                f"INSERT INTO {table} SELECT {select}"
                f" FROM (VALUES {values}) AS v({', '.join(columns)})"
            ),
            params,
        )


@dataclass(frozen=True, slots=True)
class DemoEdits:
    """What :func:`edit_demo_warehouse` changed, to compare with what the next sync sends."""

    users_changed: tuple[str, ...]
    companies_changed: tuple[str, ...]
    memberships_removed: tuple[tuple[str, str], ...]
    orders_added: tuple[str, ...] = ()  # new order ids: one event each
    devices_changed: tuple[str, ...] = ()  # device tokens whose row changed: add_device again
    orders_edited: tuple[str, ...] = ()  # sent orders changed afterwards: an event is sent once

    @property
    def entities(self) -> int:
        """Items the next sync sends: one per changed row, one per new event."""
        return (
            len(self.users_changed)
            + len(self.companies_changed)
            + len(self.memberships_removed)
            + len(self.orders_added)
            + len(self.devices_changed)
        )

    @property
    def rows(self) -> int:
        """Warehouse rows edited: every sent item's row, and the edited orders (not resent)."""
        return self.entities + len(self.orders_edited)


def edit_demo_warehouse(engine: Engine, *, schema: str = "demo") -> DemoEdits:
    """A few realistic edits: an upgrade, a cleared field, a renamed company, a member leaving,
    a new order, an edited one (never resent), an app update on a device.

    Reads the affected keys before each change (Snowflake has no ``RETURNING``).
    """
    with engine.begin() as conn:

        def emails(where: str) -> list[str]:
            return [
                r[0]
                for r in conn.execute(
                    sa.text(f"SELECT email FROM {schema}.users WHERE {where} ORDER BY user_id")
                )
            ]

        upgraded = emails("user_id IN (11, 12, 13)")
        conn.execute(
            sa.text(
                f"UPDATE {schema}.users SET plan = 'enterprise',"
                " lifetime_value = lifetime_value + 1000 WHERE user_id IN (11, 12, 13)"
            )
        )
        cleared = emails("user_id = 14")
        conn.execute(sa.text(f"UPDATE {schema}.users SET first_name = NULL WHERE user_id = 14"))
        conn.execute(
            sa.text(
                f"UPDATE {schema}.companies SET name = name || ' (renamed)'"
                " WHERE company_id = 'co-0001'"
            )
        )
        removed = conn.execute(
            sa.text(
                f"SELECT u.email, m.user_id, m.company_id FROM {schema}.memberships AS m"
                f" JOIN {schema}.users AS u ON u.user_id = m.user_id"
                " WHERE u.deleted_at IS NULL ORDER BY m.user_id, m.company_id LIMIT 1"
            )
        ).all()
        for _, user_id, company_id in removed:
            conn.execute(
                sa.text(
                    f"DELETE FROM {schema}.memberships"
                    " WHERE user_id = :user_id AND company_id = :company_id"
                ),
                {"user_id": user_id, "company_id": company_id},
            )
        # A new order (an event: sent once), and an app update on one device (add_device
        # again, with every field). Orders that were sent and then change are never resent.
        conn.execute(
            sa.text(
                f"INSERT INTO {schema}.orders VALUES ('ord-new-1', 12,"
                " CAST('2025-12-30 10:00:00' AS TIMESTAMP), CAST(129.99 AS DECIMAL(10, 2)), 'EUR')"
            )
        )
        edited_order = conn.execute(
            sa.text(f"SELECT MIN(order_id) FROM {schema}.orders")
        ).scalar_one()
        conn.execute(
            sa.text(f"UPDATE {schema}.orders SET total = total + 1 WHERE order_id = :order_id"),
            {"order_id": edited_order},
        )
        updated_device = conn.execute(
            sa.text(
                f"SELECT d.device_token FROM {schema}.devices AS d"
                f" JOIN {schema}.users AS u ON u.user_id = d.user_id"
                " WHERE u.deleted_at IS NULL ORDER BY d.user_id, d.device_token LIMIT 1"
            )
        ).scalar_one()
        conn.execute(
            sa.text(
                f"UPDATE {schema}.devices SET app_version = '4.0.0' WHERE device_token = :token"
            ),
            {"token": updated_device},
        )
    return DemoEdits(
        users_changed=tuple(sorted(upgraded + cleared)),
        companies_changed=("co-0001",),
        memberships_removed=tuple((email, company_id) for email, _, company_id in removed),
        orders_added=("ord-new-1",),
        devices_changed=(updated_device,),
        orders_edited=(edited_order,),
    )
