"""Guardrails: a model's changeset too big for its max_delete_pct / max_change_pct headers
stops the run before anything is sent (a dry run only reports it)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from cio_retl.diff import ChangeCounts
from cio_retl.errors import GuardrailError
from cio_retl.models import Kind, Mode, Model
from cio_retl.options import SyncOptions
from cio_retl.report import ModelReport


def check_guardrails(
    models: Sequence[Model],
    counts: Mapping[str, ChangeCounts],
    reports: Mapping[str, ModelReport],
    options: SyncOptions,
    count_real_updates: Callable[[Model], int],
) -> None:
    """Stop before sending anything if a model would delete or change too much of what
    Customer.io holds; a dry run only reports it. ``--force`` lets one run through."""
    problems = []
    for model in models:
        model_counts = counts[model.name]
        reason = guardrail_problem(model, model_counts)
        if reason and model_counts.changed and not options.full_resync:
            # A fingerprint also moves when only the SQL's shape does (a column
            # reordered, a DuckDB upgrade): before stopping a run, count the rows whose
            # normalized attributes really changed. Only paid when a guardrail trips.
            reason = guardrail_problem(
                model, replace(model_counts, changed=count_real_updates(model))
            )
        if reason:
            reports[model.name].guardrail = reason
            problems.append(f"{model.name}: {reason}")
    if problems and not options.force and not options.dry_run:
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
    deletes = counts.removed if model.mode is Mode.MIRROR or model.kind is Kind.RELATIONSHIP else 0
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
