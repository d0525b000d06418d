"""Email through a configured smarthost (aiosmtplib); never the relay being monitored (the
configuration refuses a smarthost on a monitored host)."""

from __future__ import annotations

from email.message import EmailMessage

import aiosmtplib

from hamta.config import parse_hostport
from monitor.alerting_config import EmailNotifier
from monitor.notifiers import Notification, NotifierError


def email_message(note: Notification, sender: str, recipients: list[str]) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = f"[hamta monitor] {note.summary}"[:200]
    lines = [note.summary, ""]
    lines += [f"{key}: {value}" for key, value in note.as_dict().items() if key != "summary"]
    message.set_content("\n".join(lines) + "\n")
    return message


class EmailSender:
    def __init__(self, config: EmailNotifier) -> None:
        self.config = config
        self.host, self.port = parse_hostport(config.smarthost, 25)

    async def send(self, note: Notification) -> None:
        config = self.config
        password = config.password_file.read_text().strip() if config.password_file else None
        try:
            await aiosmtplib.send(
                email_message(note, config.sender, config.recipients),
                hostname=self.host,
                port=self.port,
                start_tls=config.starttls,
                username=config.username,
                password=password,
                timeout=config.timeout,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise NotifierError(f"{config.smarthost}: {exc}") from exc
