"""The relay check: the admin endpoint's readiness and the queue figures of /api/queue.

Not ready (503) fails the check, with the relay's own state in the detail, but for a warm
standby (the cluster's passive node), which by design is never ready: that is "standby". A
queue deeper than ``max_depth`` or more deferred recipients than ``max_deferred`` is a warning:
the relay serves, but mail piles up behind something.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from monitor.config import RelayCheck
from monitor.observation import (
    CheckContext,
    CheckFailedError,
    CheckStandbyError,
    CheckWarningError,
    Findings,
)


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    try:
        async with session.get(url) as response:
            body = await response.json(content_type=None)
    except aiohttp.ClientError as exc:
        raise CheckFailedError(f"{url}: {exc}") from None
    except ValueError:
        raise CheckFailedError(f"{url}: not JSON") from None
    if not isinstance(body, dict):
        raise CheckFailedError(f"{url}: not a JSON object")
    return response.status, body


async def run_relay(check: RelayCheck, context: CheckContext, found: Findings) -> str:
    timeout = aiohttp.ClientTimeout(total=check.timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        status, ready = await _get(session, f"{check.url}/health/ready")
        found.facts["relay_state"] = str(ready.get("state"))
        if status != 200 and ready.get("state") == "standby":
            raise CheckStandbyError(f"warm standby ({status})")
        if status != 200:
            raise CheckFailedError(f"not ready ({status}, state {ready.get('state')})")
        status, queue = await _get(session, f"{check.url}/api/queue")
    if status != 200:
        raise CheckFailedError(f"/api/queue answered {status}")
    depth = int(queue.get("depth") or 0)
    deferred = int(queue.get("recipients_deferred") or 0)
    found.facts.update(queue_depth=depth, recipients_deferred=deferred)
    detail = f"{ready.get('state')}, queue {depth}, deferred {deferred}"
    if depth > check.max_depth or deferred > check.max_deferred:
        raise CheckWarningError(f"{detail} (limits {check.max_depth} / {check.max_deferred})")
    return detail
