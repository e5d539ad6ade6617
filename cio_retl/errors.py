"""The error taxonomy: what stops a run, what is retried, and what rejects one row.

Four kinds of stop, each a base class here: configuration or model errors (:class:`ConfigError`,
and :class:`FatalSendError` when Customer.io refuses the credentials), guardrails and locks
(:class:`GuardrailError`), and transient failures (:class:`TransientError`: a host that could
not be reached or kept failing; the next run may well succeed). The exceptions carry no exit
status: the command line maps each kind to one. A rejected row is not an exception at all: it
is a value (:class:`cio_retl.records.Rejection`) recorded and reported, so one bad row never stops the others.
"""

from __future__ import annotations

from typing import Any


class CioRetlError(Exception):
    """Base of every error the engine raises on purpose.

    ``report`` is set when the error stopped a run that had started: what was acknowledged
    before it (a ``cio_retl.sync.RunReport``), for adapters to show.
    """

    report: Any = None


class ConfigError(CioRetlError):
    """Settings or environment are wrong; nothing was sent."""


class ModelError(ConfigError):
    """A model file is invalid or its SQL fails; names the file and, where known, the line."""

    def __init__(self, path: str, message: str, line: int | None = None) -> None:
        self.path = path
        self.line = line
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {message}")


class GuardrailError(CioRetlError):
    """A guardrail stopped the run before anything was sent."""


class LockedError(GuardrailError):
    """Another run holds the model's lock; like a guardrail, it stops before sending."""


class FatalSendError(CioRetlError):
    """Customer.io refused the whole run (bad credentials, forbidden workspace)."""


class TransientError(CioRetlError):
    """A host (the Track API, a database) could not be reached or kept failing: what was
    acknowledged is kept, and a later run may succeed. The message names the host, never
    a credential."""


class RetriableError(TransientError):
    """A request's outcome is unknown or throttled and the retries ran out; the same items
    may be sent again."""

    def __init__(self, message: str, *, attempts: int = 0, bytes_sent: int = 0) -> None:
        self.attempts = attempts
        self.bytes_sent = bytes_sent
        super().__init__(message)


class UnreachableError(TransientError):
    """A database did not answer (refused, timed out, name not resolved)."""
