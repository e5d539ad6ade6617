"""The data contract: what happens to the messy 1% of rows and to broken models.

Rule: a bad row is rejected alone with a reason naming the model, its key and the limit; the
good rows still go; the emulator (as strict as the spec) never sees an invalid item; a bad
model stops the run before anything is sent.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cio_retl.cli import main
from cio_retl.config import Settings
from cio_retl.emulator import Emulator
from cio_retl.errors import GuardrailError, ModelError
from cio_retl.state import StateStore
from cio_retl.sync import Outcome
from tests.conftest import sync

# (key, SQL expression of the `note` column, expected: None = accepted, else a reason fragment)
ROWS: list[tuple[str | None, str, str | None]] = [
    ("ok-plain", "'fine'", None),
    ("ok-unicode", "'héllo 🎉 \"quoted\" \\\\ back'", None),
    ("ok-value-at-limit", "repeat('v', 1000)", None),
    ("value-over-limit", "repeat('v', 1001)", "1001 bytes, over the 1000-byte limit"),
    ("ok-multibyte-at-limit", "repeat('é', 500)", None),  # 1000 bytes
    ("multibyte-over-limit", "repeat('é', 500) || 'x'", "1001 bytes, over the 1000-byte limit"),
    ("ok-nan", "CAST('NaN' AS DOUBLE)", None),  # NaN -> NULL -> no attribute
    ("infinite", "CAST('Infinity' AS DOUBLE)", "infinite number"),
    ("binary", "CAST('\\xAA' AS BLOB)", "binary values"),
    ("ok-big-int", "CAST(170141183460469231731687303715884105727 AS HUGEINT)", None),
    ("ok-json", 'CAST(\'{"a": [1, 2, {"b": null}]}\' AS JSON)', None),
    (
        "json-over-limit",
        "to_json(list_transform(range(200), lambda x: 'abcd'))",
        "over the 1000-byte limit",
    ),
    ("dup", "'first'", "2 rows share this key"),
    ("dup", "'second'", "2 rows share this key"),
    ("", "'empty key'", "is empty"),
    ("   ", "'blank key'", "is empty"),
    ("x" * 150, "'key at limit'", None),
    ("y" * 151, "'key over limit'", "151 bytes, over the 150-byte limit"),
    ("line\nbreak", "'control char in key'", "control characters"),
    ("ok-timestamp-tz", "TIMESTAMPTZ '2024-01-02 03:04:05+02'", None),
    ("ok-interval", "INTERVAL '90 minutes'", None),
]


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.sql"
    path.write_text(text)
    return path


@pytest.fixture
def corpus(demo_engine: Engine) -> None:
    """One table per value type, so each bad value keeps its real database type."""
    with demo_engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS corpus"))
        for i, (key, note, _) in enumerate(ROWS):
            key_sql = (
                "NULL"
                if key is None
                else "'" + key.replace("'", "''").replace("\n", "' || chr(10) || '") + "'"
            )
            conn.execute(
                sa.text(f"CREATE TABLE corpus.r{i} AS SELECT {key_sql} AS user_id, {note} AS v{i}")
            )
        conn.execute(
            sa.text(
                "CREATE TABLE corpus.nullkey AS SELECT CAST(NULL AS VARCHAR) AS user_id, 'x' AS v0"
            )
        )


def column(key: str) -> str:
    """Each kind of value has its own column, so it keeps its own database type."""
    return f"v{next(i for i, (k, _, _) in enumerate(ROWS) if k == key)}"


def union_sql() -> str:
    return " UNION ALL BY NAME ".join(f"SELECT * FROM corpus.r{i}" for i in range(len(ROWS))) + (
        " UNION ALL BY NAME SELECT * FROM corpus.nullkey"
    )


def test_bad_rows_corpus(
    settings: Settings, models_dir: Path, demo_engine: Engine, corpus: None, emulator: Emulator
) -> None:
    write(
        models_dir,
        "people",
        f"-- kind: person\n-- identifier: id\n-- key: user_id\n{union_sql()}\n",
    )
    report = sync(replace(settings, models_dir=models_dir))
    people = report.models[0]
    reasons = dict(people.rejections)
    expected_rejected = {k for k, _, why in ROWS if why}
    assert report.outcome is Outcome.REJECTED
    assert set(reasons) == expected_rejected | {None}  # None: the NULL key
    assert "is NULL" in reasons[None]
    for key, _, why in ROWS:
        if why:
            assert why in reasons[key], (key, reasons[key])
    accepted = {k for k, _, why in ROWS if not why}
    workspace = emulator.workspace.people_by("id")
    assert set(workspace) == accepted
    assert emulator.invalid_items == []  # nothing invalid ever reached Customer.io
    assert workspace["ok-unicode"][column("ok-unicode")] == 'héllo 🎉 "quoted" \\\\ back'
    assert workspace["ok-nan"] == {"id": "ok-nan"}  # NaN -> NULL -> no attribute
    assert (
        workspace["ok-big-int"][column("ok-big-int")] == "170141183460469231731687303715884105727"
    )
    assert workspace["ok-json"][column("ok-json")] == {"a": [1, 2, {"b": None}]}
    assert workspace["ok-timestamp-tz"][column("ok-timestamp-tz")] == 1704157445
    assert workspace["ok-interval"][column("ok-interval")] == 5400
    # Stored with model, key and reason (a NULL key cannot be stored, it is reported).
    stored = {r["key"]: r for r in StateStore(demo_engine).rejections("people")}
    assert set(stored) == expected_rejected
    assert all(r["model"] == "people" and r["reason"] for r in stored.values())


def test_limits_per_person_and_item(
    settings: Settings, models_dir: Path, demo_engine: Engine, emulator: Emulator
) -> None:
    """300 attributes per person (the identifier counts), 32 KB per item."""
    cols_299 = ", ".join(f"{i} AS a{i}" for i in range(299))
    cols_300 = ", ".join(f"{i} AS a{i}" for i in range(300))
    big = ", ".join(f"repeat('z', 900) AS b{i}" for i in range(40))  # ~36 KB item
    with demo_engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE main.wide AS SELECT 'at-limit' AS user_id, {cols_299}"))
        conn.execute(
            sa.text(f"CREATE TABLE main.wider AS SELECT 'over-limit' AS user_id, {cols_300}")
        )
        conn.execute(sa.text(f"CREATE TABLE main.big AS SELECT 'huge' AS user_id, {big}"))
    write(
        models_dir,
        "wide",
        "-- kind: person\n-- identifier: id\n-- key: user_id\nselect * from main.wide\n",
    )
    write(
        models_dir,
        "wider",
        "-- kind: person\n-- identifier: id\n-- key: user_id\nselect * from main.wider\n",
    )
    write(
        models_dir,
        "big",
        "-- kind: person\n-- identifier: id\n-- key: user_id\nselect * from main.big\n",
    )
    report = sync(replace(settings, models_dir=models_dir))
    by_model = {m.model: m for m in report.models}
    assert by_model["wide"].created == 1  # 299 columns + the id attribute = 300
    assert "301 attributes, over the 300-attribute limit" in by_model["wider"].rejections[0][1]
    assert "over the 32768-byte limit per item" in by_model["big"].rejections[0][1]
    assert set(emulator.workspace.people_by("id")) == {"at-limit"}
    assert emulator.invalid_items == []


RELATIONSHIP = (
    "-- kind: relationship\n-- person_identifier: email\n-- person_key: email\n"
    "-- object_type_id: 1\n-- object_key: company_id\n"
)


def test_bad_relationship_and_object_rows(
    settings: Settings, models_dir: Path, demo_engine: Engine, emulator: Emulator
) -> None:
    write(
        models_dir,
        "orgs",
        "-- kind: object\n-- object_type_id: 1\n-- key: company_id\n"
        "select * from (values ('acme', 'Acme'), ('', 'no id'), (repeat('o', 151), 'long')) t(company_id, name)\n",
    )
    write(
        models_dir,
        "members",
        RELATIONSHIP
        + "select * from (values ('a@x.io', 'acme', 'admin'), ('not an email', 'acme', 'x'),"
        " ('b@x.io', NULL, 'x')) t(email, company_id, role)\n",
    )
    report = sync(replace(settings, models_dir=models_dir))
    orgs, members = report.models  # objects sync before relationships
    assert orgs.created == 1 and orgs.rejected == 2
    assert members.created == 1 and members.rejected == 2
    reasons = " | ".join(r for _, r in members.rejections)
    assert "is not an email address" in reasons and "key is NULL (company_id)" in reasons
    assert emulator.invalid_items == []
    assert len(emulator.workspace.relationships) == 1


BROKEN: dict[str, tuple[str, str]] = {
    "unknown_header": (
        "-- kind: person\n-- identifer: id\n-- key: k\nselect 1 as k\n",
        "unknown header key 'identifer'",
    ),
    "missing_kind": (
        "-- identifier: id\n-- key: k\nselect 1 as k\n",
        "missing required header key 'kind'",
    ),
    "wrong_kind": ("-- kind: people\nselect 1 as k\n", "kind must be one of"),
    "key_not_in_result": (
        "-- kind: person\n-- identifier: id\n-- key: user_id\nselect 1 as k\n",
        "key column(s) ['user_id'] not in the result",
    ),
    "sql_fails": (
        "-- kind: person\n-- identifier: id\n-- key: k\nselect k from no_such_table\n",
        "SQL failed",
    ),
    "reserved_column": (
        "-- kind: person\n-- identifier: id\n-- key: k\nselect 1 as k, 2 as __cio_key\n",
        "reserved column names",
    ),
    "reserved_prefix": (  # a name the payload SQL adds to the model's columns
        "-- kind: person\n-- identifier: id\n-- key: k\nselect 1 as k, '{}' as __cio_pay_attrs\n",
        "reserved column names ['__cio_pay_attrs']",
    ),
    "identifier_clash": (
        "-- kind: person\n-- identifier: id\n-- key: user_id\nselect 1 as user_id, 2 as id\n",
        "would overwrite the identifier attribute",
    ),
    "long_column": (
        f"-- kind: person\n-- identifier: id\n-- key: k\nselect 1 as k, 2 as {'c' * 151}\n",
        "over the 150-byte limit for attribute names",
    ),
    "bad_object_type": (
        "-- kind: object\n-- object_type_id: companies\n-- key: k\nselect 1 as k\n",
        "object_type_id must be",
    ),
    "not_a_select": (
        "-- kind: person\n-- identifier: id\n-- key: k\ndrop table demo.users\n",
        "must be one SELECT",
    ),
    "bad_guardrail": (
        "-- kind: person\n-- identifier: id\n-- key: k\n-- max_delete_pct: 150\nselect 1 as k\n",
        "percentage from 0 to 100",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_models_exit_2_before_sending(
    case: str,
    models_dir: Path,
    demo_engine: Engine,
    emulator: Emulator,
    env_for_cli: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    demo_engine.dispose()
    text, message = BROKEN[case]
    write(models_dir, "a_good", "-- kind: person\n-- identifier: id\n-- key: k\nselect 'u1' as k\n")
    write(models_dir, case, text)
    monkeypatch.setenv("CIO_RETL_MODELS_DIR", str(models_dir))
    assert main(["sync"]) == 2
    err = capsys.readouterr().err
    assert f"{case}.sql:" in err and message in err
    assert [r for r in emulator.requests if r.path == "/api/v2/batch"] == []


def test_two_models_with_one_name(models_dir: Path, settings: Settings) -> None:
    (models_dir / "sub").mkdir()
    for folder in (models_dir, models_dir / "sub"):
        write(folder, "users", "-- kind: person\n-- identifier: id\n-- key: k\nselect 1 as k\n")
    with pytest.raises(ModelError, match="two models are named 'users'"):
        sync(replace(settings, models_dir=models_dir))


@pytest.fixture
def env_for_cli(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    monkeypatch.setenv("CIO_RETL_WAREHOUSE_URL", settings.warehouse_url)
    monkeypatch.setenv("CIO_TRACK_API_URL", settings.track_api_url)
    monkeypatch.setenv("CIO_SITE_ID", settings.site_id or "")
    monkeypatch.setenv("CIO_API_KEY", settings.api_key.get() if settings.api_key else "")
    for name in ("CIO_RETL_STATE_URL", "CIO_REGION", "CIO_RETL_STATE_SCHEMA"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("policy", ["remove", "keep"])
def test_schema_changes(
    settings: Settings, models_dir: Path, demo_engine: Engine, emulator: Emulator, policy: str
) -> None:
    """A new column is sent for every row once; a removed column removes its attribute
    (default) or, with `-- removed_columns: keep`, leaves it alone."""
    header = f"-- kind: person\n-- identifier: id\n-- key: k\n-- removed_columns: {policy}\n-- max_change_pct: 100\n"
    with demo_engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE main.p AS SELECT 'u' || i AS k, 'free' AS plan, i AS score FROM range(5) r(i)"
            )
        )
    s = replace(settings, models_dir=models_dir)
    write(models_dir, "p", header + "select k, plan from main.p\n")
    assert sync(s).models[0].created == 5
    write(models_dir, "p", header + "select k, plan, score from main.p\n")  # column added
    before = len(emulator.requests)
    added = sync(s)
    assert added.models[0].updated == 5
    items = [i for r in emulator.requests[before:] if r.body for i in r.body["batch"]]
    assert all(set(i["attributes"]) == {"score"} for i in items)
    write(models_dir, "p", header + "select k, score from main.p\n")  # column removed
    removed = sync(s)
    people = emulator.workspace.people_by("id")
    if policy == "remove":
        assert removed.models[0].updated == 5
        assert all("plan" not in attrs for attrs in people.values())
    else:
        assert removed.models[0].updated == 0
        assert all(attrs["plan"] == "free" for attrs in people.values())
    # A NULL still removes, whatever the policy.
    with demo_engine.begin() as conn:
        conn.execute(sa.text("UPDATE main.p SET score = NULL WHERE k = 'u1'"))
    sync(s)
    assert "score" not in emulator.workspace.people_by("id")["u1"]


def test_identifier_semantics(
    settings: Settings, models_dir: Path, demo_engine: Engine, emulator: Emulator
) -> None:
    """Keyed by id, a new email is an attribute update; keyed by email, a new email is a new
    person, and the old one is deleted only in mirror mode."""
    with demo_engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE main.u AS SELECT 1 AS user_id, 'old@x.io' AS email, 'pro' AS plan"
            )
        )
    s = replace(settings, models_dir=models_dir)
    write(
        models_dir,
        "by_id",
        "-- kind: person\n-- identifier: id\n-- key: user_id\n-- max_change_pct: 100\n"
        "select * from main.u\n",
    )
    write(
        models_dir,
        "by_email",
        "-- kind: person\n-- identifier: email\n-- key: email\n-- mode: mirror\n"
        "-- max_delete_pct: 100\n-- max_change_pct: 100\nselect email, plan from main.u\n",
    )
    sync(s)
    with demo_engine.begin() as conn:
        conn.execute(sa.text("UPDATE main.u SET email = 'new@x.io'"))
    report = {m.model: m for m in sync(s).models}
    assert report["by_id"].updated == 1 and report["by_id"].created == 0
    assert emulator.workspace.person(id="1").attributes["email"] == "new@x.io"  # type: ignore[union-attr]
    assert report["by_email"].created == 1 and report["by_email"].deleted == 1
    assert emulator.workspace.person(email="new@x.io") is not None
    assert emulator.workspace.person(email="old@x.io") is None


def test_change_guardrail_counts_real_changes_not_moved_fingerprints(
    settings: Settings, models_dir: Path, demo_engine: Engine, emulator: Emulator
) -> None:
    """Reordering a model's columns moves every row's fingerprint but changes nothing Customer.io
    holds: no guardrail stop and nothing sent. A real mass change is still stopped."""
    with demo_engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE main.g AS SELECT 'u' || i AS k, 'free' AS plan, i AS n FROM range(20) r(i)"
            )
        )
    s = replace(settings, models_dir=models_dir)
    header = "-- kind: person\n-- identifier: id\n-- key: k\n"
    write(models_dir, "g", header + "select k, plan, n from main.g\n")
    assert sync(s).models[0].created == 20
    write(models_dir, "g", header + "select n, plan, k from main.g\n")  # same data, new shape
    before = len(emulator.requests)
    reordered = sync(s)
    assert reordered.outcome is Outcome.SYNCED and reordered.models[0].guardrail is None
    assert [r for r in emulator.requests[before:] if r.path == "/api/v2/batch"] == []
    assert sync(s).models[0].planned == 0  # the fingerprints were refreshed
    with demo_engine.begin() as conn:
        conn.execute(sa.text("UPDATE main.g SET plan = 'pro'"))
    with pytest.raises(GuardrailError, match="20 of 20 synced rows"):
        sync(s)
