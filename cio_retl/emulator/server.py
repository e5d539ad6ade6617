"""The HTTP side of the emulator: routing, auth, body limits, faults, recording.

Built on `http.server.ThreadingHTTPServer` speaking HTTP/1.1 keep-alive. Each response is
written with one `sendall` (status line, headers and body together) and Nagle is off, so a
keep-alive client never waits on a delayed ACK. Bodies are always read in full before
answering, so even a refused request leaves the connection usable.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gc
import hmac
import math
import os
import random
import socket
import sys
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import orjson

from cio_retl.emulator.rules import (
    MAX_BATCH_BODY_BYTES,
    MAX_BATCH_ITEMS,
    MAX_ITEM_BYTES,
    MAX_READ_BYTES,
    FaultPlan,
    Rules,
)
from cio_retl.emulator.validation import InvalidItem, ItemError, Op, validate_item
from cio_retl.emulator.workspace import Workspace

DEFAULT_SITE_ID = "site-id"
DEFAULT_API_KEY = "api-key"
CUSTOMERS_PREFIX = "/api/v1/customers/"
ROUTES: dict[str, tuple[str, ...]] = {
    "/api/v1/accounts/region": ("GET",),
    "/api/v2/batch": ("POST",),
    "/api/v2/entity": ("POST",),
    "/_emulator/workspace": ("GET",),
    "/_emulator/requests": ("GET",),
    "/_emulator/stats": ("GET",),
    "/_emulator/invalid_items": ("GET",),
    "/_emulator/reset": ("POST",),
    "/_emulator/faults": ("GET", "POST"),
}
DROP = -1
"""Fault decision: close the connection without answering (recorded as status 0)."""


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One Track API request as received (the Authorization header is never kept)."""

    method: str
    path: str
    status: int
    headers: dict[str, str]
    body: Any
    n_items: int
    n_bytes: int
    timestamp: float


@dataclass(slots=True)
class _Reply:
    status: int
    payload: Any = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    n_items: int = 0
    ops: list[tuple[int, Any, Op | ItemError]] | None = None
    entity: bool = False


def _error(status: int, message: str, **kwargs: Any) -> _Reply:
    return _Reply(status, {"meta": {"error": message}}, **kwargs)


def _bad_request(message: str, status: int = 400) -> _Reply:
    """A refused ``/api/v2`` request: the schema's body for it (Track API OpenAPI 1.0.0,
    ``Trackv2SendMultipleRequests400Response``: ``errors`` of ``{reason, field, message}``),
    with the v1 form's ``meta.error`` kept beside it for clients that read that."""
    return _Reply(
        status,
        {
            "meta": {"error": message},
            "errors": [{"reason": "invalid", "field": "body", "message": message}],
        },
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], emulator: Emulator) -> None:
        self.emulator = emulator
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Unblock keep-alive handler threads so stop() leaves nothing listening."""
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Per-request logging would dominate a benchmark; the emulator records instead."""

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        emulator = self.server.emulator
        try:
            body = self._read_body()
        except _BodyTooLarge:
            self.close_connection = True
            self._send(_error(413, "request body too large"), head_only=False)
            return
        except ValueError as exc:
            self.close_connection = True
            self._send(_error(400, f"unreadable body: {exc}"), head_only=False)
            return
        path = self.path.partition("?")[0]
        try:
            if path.startswith("/_emulator/"):
                self._send(emulator._inspect(self.command, path, body))
                return
            reply = emulator._track(self.command, path, self.headers, body)
        except Exception:  # an emulator bug must not hang the client: answer and show it
            traceback.print_exc(file=sys.stderr)
            reply = _error(500, "emulator internal error")
        if reply.status == DROP:
            self.close_connection = True
        else:
            self._send(reply)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        if length > MAX_READ_BYTES:
            raise _BodyTooLarge
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size = int(self.rfile.readline(1024).split(b";")[0].strip(), 16)
            if size == 0:
                while self.rfile.readline(65537).strip():  # trailers
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_READ_BYTES:
                raise _BodyTooLarge
            parts.append(self.rfile.read(size))
            self.rfile.readline(3)

    def _send(self, reply: _Reply, head_only: bool | None = None) -> None:
        body = reply.payload if isinstance(reply.payload, bytes) else orjson.dumps(reply.payload)
        try:
            phrase = HTTPStatus(reply.status).phrase
        except ValueError:
            phrase = ""
        lines = [
            f"HTTP/1.1 {reply.status} {phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        lines.extend(f"{k}: {v}" for k, v in reply.headers.items())
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        skip_body = self.command == "HEAD" if head_only is None else head_only
        try:
            self.wfile.write(head if skip_body else head + body)
        except OSError:  # the client went away (e.g. killed while waiting): nothing to tell
            self.close_connection = True


class _BodyTooLarge(Exception):
    pass


def most_in_window(times: list[float], window: float) -> int:
    """The most of ``times`` within any ``window`` seconds (a sliding window, half-open)."""
    times = sorted(times)
    most = start = 0
    for end, moment in enumerate(times):
        while moment - times[start] >= window:
            start += 1
        most = max(most, end - start + 1)
    return most


class Emulator:
    """A loopback Customer.io Track API with an in-memory workspace and injectable faults.

    `region` and `environment_id` are what `GET /api/v1/accounts/region` reports for the
    workspace of `site_id` (two emulators stand for two workspaces). `rules` picks the reading of the spec's [open] points (defaults: the module constants);
    `record_bodies=False` keeps `requests` from holding every parsed body during benchmarks.
    `check_every=N` is the benchmarks' fast path, so that a figure measures the client and
    not the emulator: only every Nth `/api/v2/batch` body (the 1st, the N+1th, ...) is
    validated item by item and applied to the workspace; the others are parsed as JSON and
    their envelope checked (content type, body size, `{"batch": [...]}` of 1 to 1000
    items) like any body, then answered 200 and counted in :attr:`unchecked_items` without
    being applied. A client that sends a bad item in every batch is still caught, by the
    sampled bodies. `None` (the default) checks and applies every body.
    `rate_limit=(requests, seconds)` enforces the workspace limit the spec describes as
    "loosely enforced": a write request over it in the sliding window gets a 429 with
    Retry-After. Arrival times of write requests are kept either way
    (:meth:`max_requests_in`), so tests can check what several senders did together.
    """

    def __init__(
        self,
        *,
        site_id: str = DEFAULT_SITE_ID,
        api_key: str = DEFAULT_API_KEY,
        host: str = "127.0.0.1",
        port: int = 0,
        rules: Rules | None = None,
        record_bodies: bool = True,
        rate_limit: tuple[int, float] | None = None,
        region: str = "us",
        environment_id: int = 1,
        check_every: int | None = None,
    ) -> None:
        if check_every is not None and check_every < 1:
            raise ValueError("check_every must be None or an integer >= 1")
        self.site_id = site_id
        # What GET /api/v1/accounts/region reports: the workspace's data center and its id.
        self.region = region
        self.environment_id = environment_id
        self.host = host
        self.port = port
        self.rules = rules or Rules()
        self.record_bodies = record_bodies
        self.workspace = Workspace()
        self.requests: list[RecordedRequest] = []
        self.invalid_items: list[InvalidItem] = []
        self._credentials = f"{site_id}:{api_key}".encode()
        self._faults = FaultPlan()
        self._fault_lock = threading.Lock()
        self._rng = random.Random(0)
        self._writes_seen = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._in_flight: Counter[str] = Counter()  # by path
        self._in_flight_lock = threading.Lock()
        self.rate_limit = rate_limit
        self.arrivals: list[float] = []  # time.monotonic() of each authorized write request
        self.rate_limited = 0  # write requests refused by `rate_limit`
        self._window: deque[float] = deque()  # arrivals admitted within the last window
        self._rate_lock = threading.Lock()
        self.check_every = check_every
        self.unchecked_items = 0  # items accepted by the fast path without being applied
        self._batches_seen = 0  # /api/v2/batch bodies past the envelope checks
        self._sample_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Emulator:
        """Bind and serve in a daemon thread; returns self so `Emulator().start()` chains."""
        if self._server is not None:
            raise RuntimeError("emulator already started")
        self._stopping.clear()
        self._server = _Server((self.host, self.port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"cio-emulator-{self._server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # abandon requests sleeping in a delay fault: nothing applied
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join()
        # Handler threads held by a delay fault wake on `_stopping` and leave at once; wait
        # for them (briefly) so that after stop() nothing is in flight. Without this a
        # client could see its connection closed before the handler had counted itself out.
        deadline = time.monotonic() + 5
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.005)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL of the running emulator, e.g. http://127.0.0.1:54321."""
        if self._server is None:
            raise RuntimeError("the emulator is not started")
        host, port = self._server.server_address[:2]
        host_text = host.decode() if isinstance(host, bytes) else str(host)
        if ":" in host_text:
            host_text = f"[{host_text}]"
        return f"http://{host_text}:{port}"

    # -- state ---------------------------------------------------------------------------

    @property
    def faults(self) -> FaultPlan:
        return self._faults

    @faults.setter
    def faults(self, plan: FaultPlan) -> None:
        """Assigning a plan restarts its random stream and its `fail_first` count."""
        with self._fault_lock:
            self._faults = plan
            self._rng = random.Random(plan.seed)
            self._writes_seen = 0

    def reset(self) -> None:
        """Clear the workspace, the records and the faults."""
        with self.workspace.lock:
            self.workspace.clear()
            self.requests.clear()
            self.invalid_items.clear()
        with self._rate_lock:
            self.arrivals.clear()
            self._window.clear()
            self.rate_limited = 0
        with self._sample_lock:
            self.unchecked_items = 0
            self._batches_seen = 0
        self.faults = FaultPlan()

    def snapshot(self) -> dict[str, Any]:
        """JSON-able dump of the workspace (same as GET /_emulator/workspace)."""
        return self.workspace.snapshot()

    # -- Track API -----------------------------------------------------------------------

    def _authorized(self, header: str | None) -> bool:
        if not header or header[:6].lower() != "basic ":
            return False
        try:
            given = base64.b64decode(header[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, self._credentials)

    def _fault(self, write: bool) -> tuple[float, _Reply | None]:
        """(delay, reply to send instead of handling), decided under the fault lock."""
        with self._fault_lock:
            plan = self._faults
            if plan.status_override is not None:
                reply = _error(plan.status_override, "status forced by the fault plan")
                if 200 <= plan.status_override < 300:
                    reply.payload = {}
                if plan.status_override == 429:
                    reply.headers = _retry_after(plan)
                return plan.delay_seconds if write else 0.0, reply
            if not write:
                return 0.0, None
            self._writes_seen += 1
            if self._writes_seen <= plan.fail_first:
                return plan.delay_seconds, _error(503, "service unavailable (fail_first fault)")
            draw = self._rng.random()
            if draw < plan.drop_rate:
                return plan.delay_seconds, _Reply(DROP)
            draw -= plan.drop_rate
            if draw < plan.throttle_rate:
                reply = _error(429, "too many requests (throttle fault)")
                reply.headers = _retry_after(plan)
                return plan.delay_seconds, reply
            draw -= plan.throttle_rate
            if draw < plan.error_rate:
                status = self._rng.choice((500, 502, 503))
                return plan.delay_seconds, _error(status, "server error (error fault)")
            return plan.delay_seconds, None

    def _admit(self) -> _Reply | None:
        """Log a write request's arrival; a 429 if it is over `rate_limit`'s window."""
        now = time.monotonic()
        with self._rate_lock:
            self.arrivals.append(now)
            if self.rate_limit is None:
                return None
            limit, window = self.rate_limit
            while self._window and now - self._window[0] >= window:
                self._window.popleft()
            if len(self._window) < limit:
                self._window.append(now)
                return None
            self.rate_limited += 1
            wait = self._window[0] + window - now
        reply = _error(429, f"rate limit: {limit} requests per {window:g} s")
        reply.headers = {"Retry-After": str(max(1, math.ceil(wait)))}
        return reply

    def max_requests_in(self, window: float) -> int:
        """The most write requests that arrived within any `window` seconds (sliding)."""
        with self._rate_lock:
            times = list(self.arrivals)
        return most_in_window(times, window)

    @property
    def in_flight(self) -> int:
        """Track requests received and not answered yet (e.g. held by a delay fault)."""
        return sum(self._in_flight.values())

    def in_flight_on(self, path: str) -> int:
        """Like :attr:`in_flight`, for one path: tests wait for a batch, not the region check."""
        return self._in_flight[path]

    def _track(self, method: str, path: str, headers: Any, body: bytes) -> _Reply:
        with self._in_flight_lock:
            self._in_flight[path] += 1
        try:
            return self._track_counted(method, path, headers, body)
        finally:
            with self._in_flight_lock:
                self._in_flight[path] -= 1

    def _track_counted(self, method: str, path: str, headers: Any, body: bytes) -> _Reply:
        reply = self._route(method, path, headers, body)
        if reply.body is None and body and (self.record_bodies or reply.ops is None):
            # Refused or faulted before parsing: still record what the client sent.
            reply.body, reply.n_items = _best_effort_parse(path, body)
        with self.workspace.lock:
            if reply.ops is not None:
                self._apply(reply)
            self.requests.append(
                RecordedRequest(
                    method=method,
                    path=path,
                    status=0 if reply.status == DROP else reply.status,
                    headers={k: v for k, v in headers.items() if k.lower() != "authorization"},
                    body=reply.body if self.record_bodies else None,
                    n_items=reply.n_items,
                    n_bytes=len(body),
                    timestamp=time.time(),
                )
            )
        return reply

    def _route(self, method: str, path: str, headers: Any, body: bytes) -> _Reply:
        customer_id: str | None = None
        segment = path[len(CUSTOMERS_PREFIX) :]
        if path.startswith(CUSTOMERS_PREFIX) and segment and "/" not in segment:
            customer_id = unquote(segment)
            allowed: tuple[str, ...] = ("PUT", "DELETE")
        elif path in ROUTES:
            allowed = ROUTES[path]
        else:
            return _error(404, f"no such endpoint: {path}")
        if method not in allowed:
            return _error(405, "method not allowed", headers={"Allow": ", ".join(allowed)})
        if not self._authorized(headers.get("Authorization")):
            return _error(401, "Unauthorized request")
        write = path != "/api/v1/accounts/region"
        if write:
            throttled = self._admit()
            if throttled is not None:
                return throttled
        delay, forced = self._fault(write=write)
        if delay and self._stopping.wait(delay):
            return _Reply(DROP)
        if forced is not None:
            return forced
        if path == "/api/v1/accounts/region":
            # Track API OpenAPI 1.0.0, TrackRegionFindAccountRegionResponse: `url`, `region`
            # ("us" | "eu") and `environment_id` (an integer, the workspace).
            return _Reply(
                200,
                {"url": self.url, "region": self.region, "environment_id": self.environment_id},
            )
        if customer_id is not None:
            return self._v1(method, customer_id, headers, body)
        return self._v2(path == "/api/v2/entity", headers, body)

    def _parse(self, headers: Any, body: bytes, limit: int) -> tuple[Any, _Reply | None]:
        content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return None, _bad_request("Content-Type must be application/json")
        if len(body) > limit:
            return None, _bad_request(
                f"body is {len(body)} bytes, limit {limit}", self.rules.oversize_body_status
            )
        try:
            return orjson.loads(body), None
        except orjson.JSONDecodeError as exc:
            return None, _bad_request(f"body is not valid JSON: {exc}")

    def _v2(self, entity: bool, headers: Any, body: bytes) -> _Reply:
        limit = MAX_ITEM_BYTES if entity else MAX_BATCH_BODY_BYTES
        data, problem = self._parse(headers, body, limit)
        if problem is not None:
            return problem
        if entity:
            if not isinstance(data, dict):
                return _bad_request("the entity body must be one item (a JSON object)")
            items = [data]
        else:
            if not isinstance(data, dict) or set(data) != {"batch"}:
                return _bad_request('the body must be {"batch": [item, ...]}')
            items = data["batch"]
            if not isinstance(items, list):
                return _bad_request('"batch" must be a list of items')
            if not items:
                return _bad_request('"batch" must not be empty')
            if len(items) > MAX_BATCH_ITEMS:
                return _bad_request(f"batch has {len(items)} items, limit {MAX_BATCH_ITEMS}")
            if not self._sampled(len(items)):
                return _Reply(200, {}, body=data, n_items=len(items))
        return _Reply(
            200, {}, body=data, n_items=len(items), ops=self._validate(items), entity=entity
        )

    def _sampled(self, n_items: int) -> bool:
        """Whether this batch body is checked in full (always, unless `check_every` is set);
        a body that is not is counted in `unchecked_items`."""
        if self.check_every is None:
            return True
        with self._sample_lock:
            seen = self._batches_seen
            self._batches_seen += 1
            if seen % self.check_every == 0:
                return True
            self.unchecked_items += n_items
            return False

    def _v1(self, method: str, customer_id: str, headers: Any, body: bytes) -> _Reply:
        data: Any = None
        if body:
            data, problem = self._parse(headers, body, MAX_ITEM_BYTES)
            if problem is not None:
                return problem
        item: dict[str, Any] = {"type": "person", "identifiers": {"id": customer_id}}
        if method == "DELETE":
            item["action"] = "delete"
        else:
            if data is not None and not isinstance(data, dict):
                return _error(400, "the body must be a JSON object of attributes")
            item["action"] = "identify"
            item["attributes"] = data or {}
        return _Reply(200, {}, body=data, n_items=1, ops=self._validate([item]), entity=True)

    def _validate(self, items: list[Any]) -> list[tuple[int, Any, Op | ItemError]]:
        out: list[tuple[int, Any, Op | ItemError]] = []
        for i, item in enumerate(items):
            try:
                out.append((i, item, validate_item(item, self.rules)))
            except ItemError as exc:
                out.append((i, item, exc))
        return out

    def _apply(self, reply: _Reply) -> None:
        """Apply the valid items in order (caller holds the workspace lock)."""
        assert reply.ops is not None
        rejected = self._faults.reject_identifiers
        errors: list[dict[str, Any]] = []
        for i, item, op in reply.ops:
            if isinstance(op, Op):
                if rejected and op.identifier_value in rejected:
                    op = ItemError("identifiers", "rejected by fault plan")
                else:
                    try:
                        self.workspace.apply(op, self.rules)
                        continue
                    except ItemError as exc:
                        op = exc
            self.invalid_items.append(InvalidItem(i, "invalid", op.field, op.message, item))
            errors.append(
                {"batch_index": i, "reason": "invalid", "field": op.field, "message": op.message}
            )
        if not errors:
            return
        if reply.entity:
            # One item: there is no partial success, so the request itself is refused.
            error = errors[0]
            reply.status = 400
            reply.payload = {
                "meta": {"error": f"{error['field']}: {error['message']}"},
                "errors": [{k: v for k, v in error.items() if k != "batch_index"}],
            }
        else:
            # [open] See Rules.errors_name_batch_index: without it the client cannot tell
            # which items failed, and acknowledges none of the batch.
            reply.status = 207
            if not self.rules.errors_name_batch_index:
                errors = [{k: v for k, v in e.items() if k != "batch_index"} for e in errors]
            reply.payload = {"errors": errors}

    # -- inspection (no auth) ------------------------------------------------------------

    def _inspect(self, method: str, path: str, body: bytes) -> _Reply:
        allowed = ROUTES.get(path)
        if allowed is None:
            return _error(404, f"no such endpoint: {path}")
        if method not in allowed:
            return _error(405, "method not allowed", headers={"Allow": ", ".join(allowed)})
        if path == "/_emulator/workspace":
            return _Reply(200, orjson.dumps(self.snapshot()))
        if path == "/_emulator/requests":
            with self.workspace.lock:
                summaries = [
                    {
                        "method": r.method,
                        "path": r.path,
                        "status": r.status,
                        "n_items": r.n_items,
                        "n_bytes": r.n_bytes,
                        "timestamp": r.timestamp,
                    }
                    for r in self.requests
                ]
            return _Reply(200, summaries)
        if path == "/_emulator/stats":
            with self._sample_lock:
                unchecked = self.unchecked_items
            return _Reply(200, {"unchecked_items": unchecked, "check_every": self.check_every})
        if path == "/_emulator/invalid_items":
            with self.workspace.lock:
                invalid = [
                    {
                        "batch_index": v.batch_index,
                        "reason": v.reason,
                        "field": v.field,
                        "message": v.message,
                        "item": v.item,
                    }
                    for v in self.invalid_items
                ]
            return _Reply(200, invalid)
        if path == "/_emulator/reset":
            self.reset()
            return _Reply(200, {})
        if method == "GET":
            return _Reply(200, self.faults.to_json())
        try:
            self.faults = FaultPlan.from_json(orjson.loads(body or b"{}"))
        except (orjson.JSONDecodeError, ValueError) as exc:
            return _error(400, str(exc))
        return _Reply(200, self.faults.to_json())


def _best_effort_parse(path: str, body: bytes) -> tuple[Any, int]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, 0
    if path == "/api/v2/batch":
        batch = data.get("batch") if isinstance(data, dict) else None
        return data, len(batch) if isinstance(batch, list) else 0
    return data, 1


def _retry_after(plan: FaultPlan) -> dict[str, str]:
    """Retry-After in seconds; a fractional value is sent as is (handy for fast tests)."""
    if plan.retry_after is None:
        return {}
    value = plan.retry_after
    return {"Retry-After": str(int(value)) if float(value).is_integer() else str(value)}


def tune_gc_for_serving() -> None:
    """Garbage-collector settings for a process that only serves the emulator.

    The workspace holds a few containers per person for the life of the process, and each
    item parsed allocates more: with CPython's default threshold (700) the collector runs
    every few items and keeps walking the growing workspace. Measured on 100k 9-attribute
    identifies: about 14 us of the emulator's CPU per item by default, 10 us with these
    settings. Freezing takes what exists at start-up (the imported modules) out of every
    walk; the higher thresholds make walks rare. Collection stays on: cycles are reclaimed.
    Not applied to an Emulator inside another program (the tests): it is process-wide.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def serve(
    host: str = "127.0.0.1",
    port: int = 8765,
    site_id: str | None = None,
    api_key: str | None = None,
) -> None:
    """Serve until Ctrl-C (`cio-retl emulator`). Credentials default to CIO_SITE_ID /
    CIO_API_KEY, else "site-id" / "api-key"; a key taken from the environment is not printed.
    """
    key_from_env = api_key is None and bool(os.environ.get("CIO_API_KEY"))
    site_id = site_id or os.environ.get("CIO_SITE_ID") or DEFAULT_SITE_ID
    api_key = api_key or os.environ.get("CIO_API_KEY") or DEFAULT_API_KEY
    emulator = Emulator(site_id=site_id, api_key=api_key, host=host, port=port)
    tune_gc_for_serving()
    emulator.start()
    shown_key = "(the value of CIO_API_KEY)" if key_from_env else api_key
    print(
        f"Customer.io Track API emulator listening on {emulator.url}\n"
        f"  accepts site id {site_id!r}, API key {shown_key}\n"
        f"  point cio-retl at it: CIO_TRACK_API_URL={emulator.url}\n"
        f"  inspect: {emulator.url}/_emulator/workspace\n"
        "Ctrl-C to stop.",
        flush=True,
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()
