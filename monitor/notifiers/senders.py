"""One sender per configured notifier, built in one place (``MonitorConfig.notifiers``)."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from monitor.alerting_config import (
    EmailNotifier,
    PagerDutyNotifier,
    SlackNotifier,
    TeamsNotifier,
    WebhookNotifier,
)
from monitor.notifiers import Sender
from monitor.notifiers.email import EmailSender
from monitor.notifiers.pagerduty import PagerDutySender
from monitor.notifiers.slack import SlackSender
from monitor.notifiers.teams import TeamsSender
from monitor.notifiers.webhook import WebhookSender


def build_senders(
    notifiers: Mapping[str, object], session: aiohttp.ClientSession
) -> dict[str, Sender]:
    """One sender per configured notifier (``MonitorConfig.notifiers``)."""
    senders: dict[str, Sender] = {}
    for name, config in notifiers.items():
        if isinstance(config, WebhookNotifier):
            senders[name] = WebhookSender(session, config.url, config.timeout, config.headers)
        elif isinstance(config, SlackNotifier):
            senders[name] = SlackSender(session, config.url, config.timeout)
        elif isinstance(config, TeamsNotifier):
            senders[name] = TeamsSender(session, config.url, config.timeout)
        elif isinstance(config, PagerDutyNotifier):
            senders[name] = PagerDutySender(
                session, config.url, config.timeout, config.routing_key(), config.source
            )
        elif isinstance(config, EmailNotifier):
            senders[name] = EmailSender(config)
        else:
            raise TypeError(f"notifier {name!r}: no sender for {config!r}")
    return senders
