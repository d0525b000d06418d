"""Generic webhook: the notification as a JSON object (see docs/monitor.md for its keys)."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from monitor.notifiers import Notification
from monitor.notifiers.http import post_json


class WebhookSender:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        timeout: float,
        headers: Mapping[str, str],
    ) -> None:
        self.session = session
        self.url = url
        self.timeout = timeout
        self.headers = dict(headers)

    async def send(self, note: Notification) -> None:
        await post_json(self.session, self.url, note.as_dict(), self.timeout, self.headers)
