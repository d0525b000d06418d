"""Microsoft Teams incoming webhook: a ``message`` with one Adaptive Card attachment, the
format Teams documents for cards sent through incoming webhooks (and Workflows)."""

from __future__ import annotations

from typing import Any

import aiohttp

from monitor.notifiers import Notification
from monitor.notifiers.http import post_json


def teams_payload(note: Notification) -> dict[str, Any]:
    color = "Good" if note.event == "resolve" else "Attention"
    facts = [
        {"title": "Check", "value": f"{note.check} ({note.kind})"},
        {"title": "Incident", "value": str(note.incident)},
        {"title": "Opened", "value": note.iso(note.opened)},
    ]
    card = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": [
            {
                "type": "TextBlock",
                "text": note.summary,
                "weight": "Bolder",
                "color": color,
                "wrap": True,
            },
            {"type": "FactSet", "facts": facts},
        ],
    }
    return {
        "type": "message",
        "attachments": [
            {"contentType": "application/vnd.microsoft.card.adaptive", "content": card}
        ],
    }


class TeamsSender:
    def __init__(self, session: aiohttp.ClientSession, url: str, timeout: float) -> None:
        self.session = session
        self.url = url
        self.timeout = timeout

    async def send(self, note: Notification) -> None:
        await post_json(self.session, self.url, teams_payload(note), self.timeout)
