"""A loopback Customer.io Track API for tests, benchmarks and the demo; never a production path.

It serves `/api/v2/batch`, `/api/v2/entity`, `GET /api/v1/accounts/region` and the v1 person
endpoints (`PUT`/`DELETE /api/v1/customers/{id}`) with HTTP Basic auth, validates items as
strictly as the Track API's OpenAPI schemas, keeps the workspace in memory and injects faults::

    with Emulator() as emu:                      # site-id / api-key, a free port
        emu.faults = FaultPlan(throttle_rate=0.2, retry_after=0.01, seed=1)
        ...  # point the client at emu.url (CIO_TRACK_API_URL)
        assert emu.workspace.people_by("email") == {...}
        assert emu.workspace.events("id") == {...}   # and devices("id"), is_suppressed(...)
        assert emu.invalid_items == []

Inspection without auth: `GET /_emulator/workspace`, `GET /_emulator/requests`,
`GET /_emulator/stats` (what the `check_every` fast path accepted unchecked),
`GET /_emulator/invalid_items`, `POST /_emulator/reset`, `GET|POST /_emulator/faults`.

Pointing the official `customerio` SDK (3.x) at the emulator: the SDK always builds
`https://{host}[:{port}]/api/v1` from `host`/`port`, and the emulator speaks plain HTTP, so
override the base URL after construction::

    from customerio import CustomerIO
    cio = CustomerIO(site_id="site-id", api_key="api-key")
    cio.base_url = f"{emu.url}/api/v1"          # identify(), delete() then hit the emulator
    cio.identify("u-1", plan="pro")              # PUT /api/v1/customers/u-1 {"plan": "pro"}
    cio.delete("u-1")                            # DELETE /api/v1/customers/u-1 with body {}

The SDK's retry adapter is mounted on https:// only, so against the emulator it does not retry.
Its `batch()` builds its https URL from `host`/`port` directly and cannot be redirected this way.
"""

from cio_retl.emulator.rules import (
    ERRORS_NAME_BATCH_INDEX,
    MAX_ATTRIBUTE_NAME_BYTES,
    MAX_ATTRIBUTE_VALUE_BYTES,
    MAX_ATTRIBUTES,
    MAX_BATCH_BODY_BYTES,
    MAX_BATCH_ITEMS,
    MAX_IDENTIFIER_BYTES,
    MAX_ITEM_BYTES,
    MAX_OBJECT_ATTRIBUTES_BYTES,
    NESTED_VALUE_SIZE,
    NULL_REMOVES_ATTRIBUTE,
    OVERSIZE_BODY_STATUS,
    FaultPlan,
    Rules,
)
from cio_retl.emulator.server import Emulator, RecordedRequest, most_in_window, serve
from cio_retl.emulator.validation import InvalidItem
from cio_retl.emulator.workspace import Person, Workspace

__all__ = [
    "ERRORS_NAME_BATCH_INDEX",
    "MAX_ATTRIBUTES",
    "MAX_ATTRIBUTE_NAME_BYTES",
    "MAX_ATTRIBUTE_VALUE_BYTES",
    "MAX_BATCH_BODY_BYTES",
    "MAX_BATCH_ITEMS",
    "MAX_IDENTIFIER_BYTES",
    "MAX_ITEM_BYTES",
    "MAX_OBJECT_ATTRIBUTES_BYTES",
    "NESTED_VALUE_SIZE",
    "NULL_REMOVES_ATTRIBUTE",
    "OVERSIZE_BODY_STATUS",
    "Emulator",
    "FaultPlan",
    "InvalidItem",
    "Person",
    "RecordedRequest",
    "Rules",
    "Workspace",
    "most_in_window",
    "serve",
]
