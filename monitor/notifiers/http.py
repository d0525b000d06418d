"""A JSON POST with a time limit, shared by the webhook-like notifiers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp

from monitor.notifiers import NotifierError


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    body: Any,
    timeout: float,
    headers: Mapping[str, str] | None = None,
) -> None:
    """POST ``body`` as JSON; :class:`NotifierError` unless the answer is 2xx."""
    try:
        async with session.post(
            url, json=body, headers=dict(headers or {}), timeout=aiohttp.ClientTimeout(timeout)
        ) as response:
            if not 200 <= response.status < 300:
                text = (await response.text())[:200]
                raise NotifierError(f"{url}: HTTP {response.status} {text}".rstrip())
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise NotifierError(f"{url}: {exc.__class__.__name__} {exc}".rstrip()) from exc
