"""Slack incoming webhook: ``text`` (the fallback and the notification's line) and one
``section`` block in mrkdwn, the payload Slack documents for incoming webhooks."""

from __future__ import annotations

from typing import Any

import aiohttp

from monitor.notifiers import Notification
from monitor.notifiers.http import post_json


def slack_payload(note: Notification) -> dict[str, Any]:
    lines = [f"*{note.summary}*", f"check `{note.check}` ({note.kind}), incident {note.incident}"]
    if note.event == "trigger":
        lines.append(f"open since {note.iso(note.opened)}")
    return {
        "text": note.summary,
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)}}],
    }


class SlackSender:
    def __init__(self, session: aiohttp.ClientSession, url: str, timeout: float) -> None:
        self.session = session
        self.url = url
        self.timeout = timeout

    async def send(self, note: Notification) -> None:
        await post_json(self.session, self.url, slack_payload(note), self.timeout)
