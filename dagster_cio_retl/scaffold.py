"""``dg scaffold defs dagster_cio_retl.CustomerIOComponent <name>``: a ``defs.yaml`` and a
``sql/`` folder with one example model of each kind the engine syncs.

The examples read the tables ``cio-retl demo`` creates (schema ``demo``), so a scaffolded
component runs against the demo warehouse before it is pointed at real tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg

from cio_retl.models import Kind

ENV_VARS = {
    "warehouse_url": "CIO_RETL_WAREHOUSE_URL",
    "state_url": "CIO_RETL_STATE_URL",
    "site_id": "CIO_SITE_ID",
    "api_key": "CIO_API_KEY",
    "track_api_url": "CIO_TRACK_API_URL",
}
"""The attributes the scaffold reads from the environment, by the command line's names."""

# The one list of example models: the kind, its file, its text (a new kind adds one here).
EXAMPLE_MODELS: dict[Kind, tuple[str, str]] = {
    Kind.OBJECT: (
        "companies.sql",
        """\
-- Companies as Customer.io objects of the object type "1".
-- kind: object
-- key: company_id
-- object_type_id: 1
select company_id, name, plan, seats
from demo.companies
""",
    ),
    Kind.PERSON: (
        "users.sql",
        """\
-- Active users as Customer.io people, identified by email.
-- kind: person
-- identifier: email
-- key: email
select email, first_name, last_name, plan, created_at
from demo.users
where deleted_at is null
""",
    ),
    Kind.RELATIONSHIP: (
        "memberships.sql",
        """\
-- Which person belongs to which company, with their role there.
-- kind: relationship
-- person_identifier: email
-- person_key: email
-- object_type_id: 1
-- object_key: company_id
select u.email, m.company_id, m.role
from demo.memberships as m
join demo.users as u on u.user_id = m.user_id
where u.deleted_at is null
""",
    ),
    Kind.EVENT: (
        "signups.sql",
        """\
-- A "signed_up" event per user, sent once (events are append-only).
-- kind: event
-- identifier: email
-- key: email
-- event_key: user_id
-- name: signed_up
-- timestamp: created_at
select user_id, email, created_at, plan
from demo.users
where deleted_at is null
""",
    ),
    Kind.DEVICE: (
        "devices.sql",
        """\
-- Each user's push device (the demo has no device table: one is made up per user).
-- kind: device
-- identifier: email
-- key: email
-- token: device_token
-- platform: platform
select email, 'demo-token-' || cast(user_id as varchar) as device_token,
       case when user_id % 2 = 0 then 'ios' else 'android' end as platform
from demo.users
where deleted_at is null
""",
    ),
    Kind.SUPPRESSION: (
        "erasures.sql",
        """\
-- People who asked to be forgotten: suppressed, never identified again.
-- kind: suppression
-- identifier: email
-- key: email
select email
from demo.users
where deleted_at is not null
""",
    ),
}


def defs_yaml(type_name: str) -> str:
    """The scaffolded ``defs.yaml``: every URL and credential an ``{{ env.VAR }}`` template,
    listed under ``requirements.env`` for ``dg check yaml --validate-requirements``."""
    env = "\n".join(f'  {attr}: "{{{{ env.{var} }}}}"' for attr, var in ENV_VARS.items())
    required = "\n".join(f"    - {var}" for var in ENV_VARS.values())
    return f"""\
type: {type_name}

attributes:
  models_dir: sql
{env}
  region: us
  key_prefix: [customerio]
  schedules:
    customerio:
      cron: "0 6 * * *"
      timezone: UTC

requirements:
  env:
{required}
"""


def write_example_models(folder: Path) -> list[Path]:
    """One model file of each kind in ``EXAMPLE_MODELS``; existing files are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in EXAMPLE_MODELS.values():
        path = folder / name
        if not path.exists():
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


class CustomerIOScaffolder(dg.Scaffolder):  # type: ignore[type-arg]
    def scaffold(self, request: dg.ScaffoldRequest[Any]) -> None:
        if request.scaffold_format == "yaml" and not request.append:
            request.target_path.mkdir(parents=True, exist_ok=True)
            (request.target_path / "defs.yaml").write_text(
                defs_yaml(request.type_name), encoding="utf-8"
            )
        else:  # a Python component.py, or a document appended to an existing defs.yaml
            dg.scaffold_component(request, {"models_dir": "sql"})
        write_example_models(request.target_path / "sql")
