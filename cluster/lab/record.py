"""``lab.json``: what a lab built, so that another process can inspect it or take it down.

It is written before the first namespace is made and again after every process is started, so
that even a lab whose ``up`` crashed half-way leaves enough behind for ``down`` to clean up. It is
replaced atomically (``hamta.durable_files``): a reader never sees half a record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from cluster.lab.processes import ProcessRecord
from hamta.durable_files import write_durably

RECORD_NAME: Final = "lab.json"
_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class LabRecord:
    """The lab's identity and everything it holds that outlives the process that made it."""

    directory: str
    prefix: str
    subnet: str
    python: str
    image: str
    credentials: str
    zookeeper: str
    vip: str
    addresses: dict[str, str] = field(default_factory=dict)
    loop_device: str = ""
    processes: tuple[ProcessRecord, ...] = ()
    # ``lab up --pairs N``: how many pairs, and the loop device of each pair after the first
    # (pair 1's is ``loop_device``), keyed by the pair's cluster name.
    pairs: int = 1
    pair_devices: dict[str, str] = field(default_factory=dict)

    def with_process(self, process: ProcessRecord) -> LabRecord:
        """This record with ``process`` added (replacing an earlier one of the same name)."""
        kept = tuple(p for p in self.processes if p.name != process.name)
        return replace(self, processes=(*kept, process))

    def to_json(self) -> dict[str, Any]:
        """The record as plain JSON data."""
        return {
            "version": _VERSION,
            "directory": self.directory,
            "prefix": self.prefix,
            "subnet": self.subnet,
            "python": self.python,
            "image": self.image,
            "credentials": self.credentials,
            "zookeeper": self.zookeeper,
            "vip": self.vip,
            "addresses": dict(self.addresses),
            "loop_device": self.loop_device,
            "processes": [p.to_json() for p in self.processes],
            "pairs": self.pairs,
            "pair_devices": dict(self.pair_devices),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabRecord:
        """The record from :meth:`to_json`'s output; KeyError/ValueError if malformed."""
        if data.get("version") != _VERSION:
            raise ValueError(f"unknown lab record version {data.get('version')!r}")
        return cls(
            directory=str(data["directory"]),
            prefix=str(data["prefix"]),
            subnet=str(data["subnet"]),
            python=str(data["python"]),
            image=str(data["image"]),
            credentials=str(data["credentials"]),
            zookeeper=str(data["zookeeper"]),
            vip=str(data["vip"]),
            addresses={str(k): str(v) for k, v in data.get("addresses", {}).items()},
            loop_device=str(data.get("loop_device", "")),
            processes=tuple(ProcessRecord.from_json(p) for p in data.get("processes", ())),
            pairs=int(data.get("pairs", 1)),
            pair_devices={str(k): str(v) for k, v in data.get("pair_devices", {}).items()},
        )


def record_path(directory: Path) -> Path:
    """Where the lab in ``directory`` keeps its record."""
    return directory / RECORD_NAME


def save(record: LabRecord, directory: Path) -> None:
    """Write ``record`` atomically into ``directory``."""
    text = json.dumps(record.to_json(), indent=2) + "\n"
    write_durably(directory, RECORD_NAME, text.encode())


def load(directory: Path) -> LabRecord | None:
    """The record in ``directory``; None if there is none. ValueError if it cannot be read."""
    path = record_path(directory)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return LabRecord.from_json(json.loads(text))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a lab record: {exc}") from None


def remove(directory: Path) -> None:
    """Delete the record (the lab is down)."""
    record_path(directory).unlink(missing_ok=True)
