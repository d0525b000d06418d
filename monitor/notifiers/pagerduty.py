"""PagerDuty Events API v2: ``trigger`` and ``resolve`` with one ``dedup_key`` per incident.

PagerDuty folds every trigger of one dedup_key into one alert, so a second escalation step
naming PagerDuty would not page twice; the resolve closes it.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from monitor.notifiers import Notification
from monitor.notifiers.http import post_json


def pagerduty_payload(note: Notification, routing_key: str, source: str) -> dict[str, Any]:
    event: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": note.event,
        "dedup_key": note.dedup_key,
    }
    if note.event == "trigger":
        event["payload"] = {
            "summary": note.summary[:1024],  # PagerDuty's limit
            "source": source,
            "severity": note.severity,  # critical and warning are both PagerDuty severities
            "timestamp": note.iso(note.at),
            "component": note.check,
            "class": note.kind,
            "custom_details": note.as_dict(),
        }
    return event


class PagerDutySender:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        timeout: float,
        routing_key: str,
        source: str,
    ) -> None:
        self.session = session
        self.url = url
        self.timeout = timeout
        self.routing_key = routing_key
        self.source = source

    async def send(self, note: Notification) -> None:
        body = pagerduty_payload(note, self.routing_key, self.source)
        await post_json(self.session, self.url, body, self.timeout)
