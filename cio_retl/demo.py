"""The demo warehouse: a small, seeded DuckDB database that the models in ``sql/`` read.

``cio-retl demo`` builds it, syncs it to the local emulator, edits a few rows and syncs again,
so anyone can see in a minute that the second run sends only what changed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

PLANS = ("free", "starter", "pro", "enterprise")
ROLES = ("member", "admin", "billing")
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


def create_demo_warehouse(engine: Engine, size: DemoSize | None = None, seed: int = 7) -> None:
    """(Re)create schema ``demo`` with users, companies and memberships."""
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
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA IF EXISTS demo CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA demo"))
        conn.execute(
            sa.text(
                "CREATE TABLE demo.companies (company_id VARCHAR PRIMARY KEY, name VARCHAR,"
                " plan VARCHAR, seats INTEGER, founded_on DATE)"
            )
        )
        conn.execute(
            sa.text(
                "CREATE TABLE demo.users (user_id INTEGER PRIMARY KEY, email VARCHAR, first_name VARCHAR,"
                " last_name VARCHAR, plan VARCHAR, lifetime_value DECIMAL(12, 2), is_admin BOOLEAN,"
                " created_at TIMESTAMP, preferences STRUCT(newsletter BOOLEAN, locale VARCHAR),"
                " deleted_at TIMESTAMP)"
            )
        )
        conn.execute(
            sa.text(
                "CREATE TABLE demo.memberships (user_id INTEGER, company_id VARCHAR, role VARCHAR,"
                " PRIMARY KEY (user_id, company_id))"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO demo.companies VALUES"
                " (:company_id, :name, :plan, :seats, CAST(:founded_on AS DATE))"
            ),
            companies,
        )
        conn.execute(
            sa.text(
                "INSERT INTO demo.users VALUES (:user_id, :email, :first_name, :last_name, :plan,"
                " CAST(:lifetime_value AS DECIMAL(12, 2)), :is_admin, CAST(:created_at AS TIMESTAMP),"
                " {'newsletter': :newsletter, 'locale': 'en'},"
                " CASE WHEN :deleted THEN TIMESTAMP '2025-01-01' END)"
            ),
            users,
        )
        conn.execute(
            sa.text("INSERT INTO demo.memberships VALUES (:user_id, :company_id, :role)"),
            memberships,
        )


@dataclass(frozen=True, slots=True)
class DemoEdits:
    """What :func:`edit_demo_warehouse` changed, to compare with what the next sync sends."""

    users_changed: tuple[str, ...]
    companies_changed: tuple[str, ...]
    memberships_removed: tuple[tuple[str, str], ...]

    @property
    def entities(self) -> int:
        return len(self.users_changed) + len(self.companies_changed) + len(self.memberships_removed)


def edit_demo_warehouse(engine: Engine) -> DemoEdits:
    """A few realistic edits: an upgrade, a cleared field, a renamed company, a member leaving."""
    with engine.begin() as conn:
        upgraded = [
            r[0]
            for r in conn.execute(
                sa.text(
                    "UPDATE demo.users SET plan = 'enterprise', lifetime_value = lifetime_value + 1000"
                    " WHERE user_id IN (11, 12, 13) RETURNING email"
                )
            )
        ]
        cleared = [
            r[0]
            for r in conn.execute(
                sa.text(
                    "UPDATE demo.users SET first_name = NULL WHERE user_id = 14 RETURNING email"
                )
            )
        ]
        renamed = [
            r[0]
            for r in conn.execute(
                sa.text(
                    "UPDATE demo.companies SET name = name || ' (renamed)'"
                    " WHERE company_id = 'co-0001' RETURNING company_id"
                )
            )
        ]
        removed = conn.execute(
            sa.text(
                "DELETE FROM demo.memberships WHERE (user_id, company_id) IN ("
                " SELECT m.user_id, m.company_id FROM demo.memberships m"
                " JOIN demo.users u USING (user_id) WHERE u.deleted_at IS NULL"
                " ORDER BY m.user_id, m.company_id LIMIT 1) RETURNING user_id, company_id"
            )
        ).all()
        emails: dict[int, str] = {
            user_id: email
            for user_id, email in conn.execute(
                sa.text("SELECT user_id, email FROM demo.users WHERE user_id IN :ids").bindparams(
                    sa.bindparam("ids", expanding=True)
                ),
                {"ids": [r[0] for r in removed] or [-1]},
            )
        }
    return DemoEdits(
        users_changed=tuple(sorted(upgraded + cleared)),
        companies_changed=tuple(renamed),
        memberships_removed=tuple((emails[u], c) for u, c in removed),
    )
