"""Guardrails: a model's changeset too big for its max_delete_pct / max_change_pct headers
stops the run before anything is sent (a dry run only reports it); and the plan a pre-send
approval (``SyncOptions.approve``) judges beside them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from cio_retl.diff import ChangeCounts
from cio_retl.errors import GuardrailError
from cio_retl.models import Model
from cio_retl.options import SyncOptions
from cio_retl.records import RejectionCode, RowChange
from cio_retl.report import EXAMPLES_PER_CODE, ModelReport, PlannedChanges


def judge_guardrails(
    models: Sequence[Model],
    counts: Mapping[str, ChangeCounts],
    reports: Mapping[str, ModelReport],
    options: SyncOptions,
    count_real_updates: Callable[[Model], int],
) -> dict[str, ChangeCounts]:
    """Each model's verdict, in its report's ``guardrail``; returns the counts each verdict
    judged (with the rows that really changed when a guardrail tripped on moved
    fingerprints)."""
    judged = dict(counts)
    for model in models:
        reason = guardrail_problem(model, judged[model.name])
        if reason and judged[model.name].changed and not options.full_resync:
            # A fingerprint also moves when only the SQL's shape does (a column
            # reordered, a DuckDB upgrade): before stopping a run, count the rows whose
            # normalized attributes really changed. Only paid when a guardrail trips.
            judged[model.name] = replace(judged[model.name], changed=count_real_updates(model))
            reason = guardrail_problem(model, judged[model.name])
        reports[model.name].guardrail = reason
    return judged


def enforce_guardrails(
    models: Sequence[Model],
    reports: Mapping[str, ModelReport],
    options: SyncOptions,
    *,
    approved: bool = True,
) -> None:
    """Stop before sending anything if a model would delete or change too much of what
    Customer.io holds; a dry run only reports it, and a refused approval (``approved``
    false) has stopped the run already. ``--force`` lets one run through."""
    problems = [
        f"{m.name}: {reports[m.name].guardrail}" for m in models if reports[m.name].guardrail
    ]
    if problems and approved and not options.force and not options.dry_run:
        raise GuardrailError(
            "guardrail stopped the run before anything was sent:\n  "
            + "\n  ".join(problems)
            + "\nIf this is intended, rerun with --force, or raise the model's "
            "-- max_delete_pct / -- max_change_pct header."
        )
    if options.force:
        for model in models:
            reports[model.name].guardrail = None


def guardrail_problem(model: Model, counts: ChangeCounts) -> str | None:
    """Why this changeset is too big for the model's guardrails, or None.

    Shares are of the acknowledged rows (the snapshot), so a first sync is never stopped;
    deletes count only where they are sent (mirror mode, relationships).
    """
    if counts.snapshot_rows == 0:
        return None
    deletes = counts.removed if model.deletes_removed else 0
    delete_pct = 100 * deletes / counts.snapshot_rows
    if delete_pct > model.max_delete_pct:
        return (
            f"{deletes:,} of {counts.snapshot_rows:,} synced rows ({delete_pct:.1f}%) would be "
            f"deleted, over max_delete_pct {model.max_delete_pct:g}"
        )
    change_pct = 100 * (counts.changed + deletes) / counts.snapshot_rows
    if change_pct > model.max_change_pct:
        return (
            f"{counts.changed + deletes:,} of {counts.snapshot_rows:,} synced rows "
            f"({change_pct:.1f}%) would change, over max_change_pct {model.max_change_pct:g}"
        )
    return None


def planned_changes(
    model: Model, counts: ChangeCounts, key_rejections: Callable[[Model, int], list[RowChange]]
) -> PlannedChanges:
    """What an approval judges of ``model``: the counts its guardrail judged, and the first
    few rows of bad keys (read by ``key_rejections`` only when the counts found some)."""
    examples: list[tuple[str | None, str]] = []
    if counts.null_keys or counts.duplicate_keys:
        found = key_rejections(model, 2 * EXAMPLES_PER_CODE)
        for code in (RejectionCode.DUPLICATE_KEY, RejectionCode.NULL_KEY):
            rejected = [c for c in found if c.rejection and c.rejection.code is code]
            examples += [(c.key, str(c.rejection)) for c in rejected[:EXAMPLES_PER_CODE]]
    return PlannedChanges(
        creates=counts.new,
        updates=counts.changed,
        deletes=counts.removed if model.deletes_removed else 0,
        null_keys=counts.null_keys,
        duplicate_keys=counts.duplicate_keys,
        key_examples=tuple(examples),
    )
