"""Fence agents from configuration entries (the ``[[fencing.agents]]`` tables of a TOML file).

Each entry is a table with a ``type`` and that type's keys; an optional ``name`` tells two agents
of one type apart in the decision log. Unknown keys are refused: a misspelt fencing option found
at the first failover is found too late.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fencing.agents import CommandAgent, FenceAgent, IpmiAgent, LabAgent, LibvirtAgent, SshAgent


class FencingConfigError(ValueError):
    """A fencing entry is wrong; the message names the entry's index and the problem."""


class _Entry:
    """Typed reads of one entry's keys, remembering which keys were used."""

    def __init__(self, entry: dict[str, Any]) -> None:
        self.entry = entry
        self.used = {"type", "name"}

    def _get(self, key: str) -> Any:
        self.used.add(key)
        return self.entry.get(key)

    def string(self, key: str, default: str | None = None) -> str:
        value = self._get(key)
        if value is None:
            if default is None:
                raise ValueError(f"{key} is required")
            return default
        if not isinstance(value, str) or not value:
            raise ValueError(f"{key} must be a non-empty string")
        return value

    def optional_string(self, key: str) -> str | None:
        self.used.add(key)
        return self.string(key) if self.entry.get(key) is not None else None

    def number(self, key: str, default: float) -> float:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"{key} must be a positive number")
        return float(value)

    def argv(self, key: str) -> list[str]:
        value = self._get(key)
        if value is None:
            raise ValueError(f"{key} is required")
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(arg, str) and arg for arg in value)
        ):
            raise ValueError(f"{key} must be a non-empty list of non-empty strings")
        return list(value)

    def options(self, key: str) -> dict[str, str]:
        value = self._get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a table of key = value")
        options: dict[str, str] = {}
        for name, item in value.items():
            if not isinstance(name, str) or not name or any(c in name for c in "=\r\n"):
                raise ValueError(f"{key}: bad option name {name!r}")
            if isinstance(item, bool) or not isinstance(item, str | int):
                raise ValueError(f"{key}.{name} must be a string or an integer")
            text = str(item)
            if "\n" in text or "\r" in text:
                raise ValueError(f"{key}.{name} must fit on one line")
            options[name] = text
        if "password" in options:
            raise ValueError(f"{key}.password: put the password in a file, use password_file")
        return options

    def check_unknown(self) -> None:
        unknown = sorted(set(self.entry) - self.used)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}")


def _command(e: _Entry, name: str | None, clock: Callable[[], float]) -> FenceAgent:
    return CommandAgent(e.argv("argv"), e.options("options"), name=name, clock=clock)


def _ipmi(e: _Entry, name: str | None, clock: Callable[[], float]) -> FenceAgent:
    return IpmiAgent(
        e.string("host"),
        e.string("username"),
        Path(e.string("password_file")),
        interface=e.string("interface", "lanplus"),
        poll_interval=e.number("poll_interval", 1.0),
        name=name or "ipmi",
        clock=clock,
    )


def _ssh(e: _Entry, name: str | None, clock: Callable[[], float]) -> FenceAgent:
    command = e.optional_string("command")
    vip = e.optional_string("vip")
    if command is None and vip is None:
        raise ValueError("vip is required unless command is given")
    connect_timeout = e.number("connect_timeout", 5)
    if connect_timeout != int(connect_timeout):
        raise ValueError("connect_timeout must be whole seconds")
    identity = e.optional_string("identity_file")
    return SshAgent(
        host=e.string("host", "{node}"),
        user=e.string("user", "root"),
        command=command,
        vip=vip,
        interface=e.string("interface", "eth0"),
        connect_timeout=int(connect_timeout),
        identity_file=Path(identity) if identity else None,
        name=name or "ssh",
        clock=clock,
    )


def _libvirt(e: _Entry, name: str | None, clock: Callable[[], float]) -> FenceAgent:
    return LibvirtAgent(
        uri=e.string("uri", "qemu:///system"),
        domain=e.string("domain", "{node}"),
        name=name or "libvirt",
        clock=clock,
    )


def _lab(e: _Entry, name: str | None, clock: Callable[[], float]) -> FenceAgent:
    return LabAgent(
        e.string("vip"),
        prefix=e.string("prefix", "hamta"),
        interface=e.string("interface", "eth0"),
        python=e.string("python", sys.executable),
        name=name or "lab",
        clock=clock,
    )


_BUILDERS: dict[str, Callable[[_Entry, str | None, Callable[[], float]], FenceAgent]] = {
    "command": _command,
    "ipmi": _ipmi,
    "ssh": _ssh,
    "libvirt": _libvirt,
    "lab": _lab,
}


def agents_from_config(
    entries: list[dict[str, Any]], *, clock: Callable[[], float] = time.monotonic
) -> list[FenceAgent]:
    """The agents described by ``entries``, in order; ``FencingConfigError`` for a bad entry."""
    agents: list[FenceAgent] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise FencingConfigError(f"fencing agent {index}: must be a table")
        kind = entry.get("type")
        label = f"fencing agent {index} ({kind})" if isinstance(kind, str) else None
        if kind not in _BUILDERS:
            known = ", ".join(_BUILDERS)
            raise FencingConfigError(f"fencing agent {index}: type must be one of {known}")
        assert label is not None
        name = entry.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise FencingConfigError(f"{label}: name must be a non-empty string")
        reader = _Entry(entry)
        try:
            agent = _BUILDERS[kind](reader, name, clock)
            reader.check_unknown()
        except ValueError as exc:
            raise FencingConfigError(f"{label}: {exc}") from None
        agents.append(agent)
    return agents
