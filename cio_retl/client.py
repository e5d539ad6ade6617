"""The Track API over httpx: Basic auth, retries, the rate limit, and 207 errors mapped to items.

What the client promises its caller: for every item of a batch, either an acknowledgment or
a :class:`Rejection`, or an exception that leaves all unacknowledged items for the next run.
429, 5xx, timeouts and dropped connections are retried with exponential backoff and jitter,
honouring ``Retry-After``; a 400/413 on a batch is bisected so only the bad items are rejected;
401/403 stop the run.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import tenacity

from cio_retl import __version__
from cio_retl.batching import batch_body
from cio_retl.errors import FatalSendError, RetriableError
from cio_retl.ratelimit import RateBudget, workspace_limiter
from cio_retl.records import Rejection, RejectionCode

RETRY_AFTER_CAP = 120.0  # never sleep longer than this on one Retry-After


@dataclass(slots=True)
class SendResult:
    """Outcome of one logical batch, possibly over several requests (retries, bisection)."""

    acked: list[int] = field(default_factory=list)
    rejected: dict[int, Rejection] = field(default_factory=dict)
    requests: int = 0
    bytes_sent: int = 0

    def merge(self, other: SendResult, offset: int) -> None:
        self.acked.extend(i + offset for i in other.acked)
        self.rejected.update({i + offset: r for i, r in other.rejected.items()})
        self.requests += other.requests
        self.bytes_sent += other.bytes_sent


@dataclass(frozen=True, slots=True)
class AccountRegion:
    """What ``GET /api/v1/accounts/region`` says about the credentials' workspace.

    Customer.io Track API OpenAPI 1.0.0, ``TrackRegionFindAccountRegionResponse`` (operation
    ``getRegion``): ``url`` (the Track API host), ``region`` (``us`` or ``eu``) and
    ``environment_id`` (an integer naming the workspace the credentials belong to); all
    three optional in the schema.
    """

    region: str | None
    environment_id: int | None
    url: str | None = None

    @classmethod
    def read(cls, answer: Any) -> AccountRegion:
        if not isinstance(answer, dict):
            return cls(None, None)
        # ``data_center`` is how some client libraries' fixtures spell the region; the
        # official schema says ``region``, which wins when both are there.
        region = answer.get("region", answer.get("data_center"))
        environment_id = answer.get("environment_id")
        url = answer.get("url")
        return cls(
            region=str(region).strip().lower() if region else None,
            environment_id=(
                environment_id
                if isinstance(environment_id, int) and not isinstance(environment_id, bool)
                else None
            ),
            url=str(url) if url else None,
        )


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 8
    base_delay: float = 0.5
    max_delay: float = 30.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), RETRY_AFTER_CAP)
        # "Full jitter" keeps many clients from retrying in lockstep.
        return rng.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


def host_label(base_url: str) -> str:
    """``scheme://host[:port]`` of a base URL, without user info or path: safe to print."""
    url = httpx.URL(base_url)
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{url.host}{port}"


def _needs_tls(base_url: str) -> bool:
    """False for plain HTTP on loopback (the emulator), where no TLS ever happens (redirects
    are not followed): httpx then skips loading the CA bundle, 0.15 s of every run's start.
    Every other URL is verified as usual."""
    url = httpx.URL(base_url)
    return not (url.scheme == "http" and url.host in ("127.0.0.1", "localhost", "::1"))


class TrackClient:
    def __init__(
        self,
        base_url: str,
        site_id: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        limiter: RateBudget | None = None,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url,
            auth=httpx.BasicAuth(site_id, api_key),
            timeout=timeout,
            headers={"User-Agent": f"cio-retl/{__version__}", "Content-Type": "application/json"},
            verify=_needs_tls(base_url),
        )
        self.host = host_label(base_url)
        self.retry = retry or RetryPolicy()
        self.limiter = limiter or workspace_limiter(base_url, site_id)
        self._sleep = sleep
        self._rng = random.Random(seed)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TrackClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_credentials(self) -> dict[str, Any]:
        """``GET /api/v1/accounts/region``: fail fast on bad credentials before any send."""
        response, _, _ = self._request("GET", "/api/v1/accounts/region", None)
        self._raise_if_fatal(response)
        if response.status_code != 200:
            raise FatalSendError(
                f"the Track API at {self.host} answered the credential check with "
                f"HTTP {response.status_code}"
            )
        data: dict[str, Any] = response.json()
        return data

    def send_batch(self, items: Sequence[bytes]) -> SendResult:
        """Send items as one ``/api/v2/batch`` request (more on retries or bisection)."""
        body = batch_body(items)
        response, attempts, sent = self._request("POST", "/api/v2/batch", body)
        result = SendResult(requests=attempts, bytes_sent=sent)
        status = response.status_code
        self._raise_if_fatal(response)
        if status in (200, 201, 202, 204):
            result.acked.extend(range(len(items)))
        elif status == 207:
            self._read_207(response, len(items), result)
        elif status == 413 or 400 <= status < 500:
            if len(items) == 1:
                result.rejected[0] = Rejection(
                    RejectionCode.API_REJECTED, _error_message(response), status=status
                )
            else:  # isolate the bad items: only they are rejected, the rest still go
                middle = len(items) // 2
                result.merge(self.send_batch(items[:middle]), 0)
                result.merge(self.send_batch(items[middle:]), middle)
        else:
            raise RetriableError(f"unexpected HTTP {status} from the Track API at {self.host}")
        return result

    def _read_207(self, response: httpx.Response, n_items: int, result: SendResult) -> None:
        try:
            errors = orjson.loads(response.content).get("errors", [])
        except (orjson.JSONDecodeError, AttributeError):
            errors = None
        named: dict[int, Rejection] = {}
        for error in errors or []:
            index = error.get("batch_index") if isinstance(error, dict) else None
            if not isinstance(index, int) or not 0 <= index < n_items:
                named = {}
                break
            message = ": ".join(str(error[k]) for k in ("reason", "message") if error.get(k))
            named[index] = Rejection(
                RejectionCode.API_REJECTED,
                message or "rejected",
                field=error.get("field"),
                status=207,
            )
        if not named:
            # A 207 we cannot map to items: acknowledge nothing, so every row is sent again.
            for i in range(n_items):
                result.rejected[i] = Rejection(
                    RejectionCode.API_UNATTRIBUTED,
                    "HTTP 207 without usable batch_index",
                    status=207,
                )
            return
        result.rejected.update(named)
        result.acked.extend(i for i in range(n_items) if i not in named)

    def _request(
        self, method: str, path: str, body: bytes | None
    ) -> tuple[httpx.Response, int, int]:
        """One logical request, retried on throttling and unknown outcomes.

        Returns the final response, the attempts made and the bytes sent over all of them.
        tenacity owns the loop (stop, wait, sleep); we only say what is retriable and how
        long to wait, so ``Retry-After`` and the injected sleep of tests fit in one place.
        """
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.retry.max_attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type((_Retriable, httpx.TransportError)),
            sleep=self._sleep,
            before=lambda _: self.limiter.acquire(),
            reraise=True,
        )
        size = len(body or b"")
        try:
            for attempt in retrying:
                with attempt:
                    response = self._http.request(method, path, content=body)
                    if response.status_code == 429 or response.status_code >= 500:
                        raise _Retriable(response)
                    attempts = attempt.retry_state.attempt_number
            return response, attempts, attempts * size
        except (_Retriable, httpx.TransportError) as exc:  # the last attempt failed too
            if isinstance(exc, _Retriable):
                what = f"kept failing (last: HTTP {exc.status})"
            else:  # httpx's message is the OS's ("[Errno 111] Connection refused"): no URL
                detail = str(exc).strip()
                what = f"could not be reached ({type(exc).__name__}" + (
                    f": {detail})" if detail else ")"
                )
            raise RetriableError(
                f"the Track API at {self.host} {what}: {method} {path} failed "
                f"after {self.retry.max_attempts} attempts; what was acknowledged is kept and "
                "unacknowledged rows are resent on the next run",
                attempts=self.retry.max_attempts,
                bytes_sent=self.retry.max_attempts * size,
            ) from None

    def _wait(self, state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        retry_after = error.retry_after if isinstance(error, _Retriable) else None
        return self.retry.delay(state.attempt_number - 1, retry_after, self._rng)

    def _raise_if_fatal(self, response: httpx.Response) -> None:
        if response.status_code in (401, 403):
            raise FatalSendError(
                f"Customer.io ({self.host}) refused the credentials (HTTP "
                f"{response.status_code}): check CIO_SITE_ID, CIO_API_KEY and CIO_REGION; "
                "nothing was acknowledged"
            )
        if response.status_code in (404, 405):
            raise FatalSendError(
                f"the Track API at {self.host} answered HTTP {response.status_code} for "
                f"{response.request.url.path}: check CIO_TRACK_API_URL / CIO_REGION"
            )


class _Retriable(Exception):
    """A 429 or 5xx answer: the items may be sent again as they are."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.retry_after = _retry_after(response)
        super().__init__(f"HTTP {self.status}")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None  # an HTTP date: fall back to backoff rather than parse clocks


def _error_message(response: httpx.Response) -> str:
    try:
        data = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return f"HTTP {response.status_code}"
    if isinstance(data, dict):
        meta = data.get("meta")
        if isinstance(meta, dict) and meta.get("error"):
            return f"HTTP {response.status_code}: {meta['error']}"
        errors = data.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            return f"HTTP {response.status_code}: {errors[0].get('message') or errors[0]}"
    return f"HTTP {response.status_code}"
