"""What a run of the lab's mail client got, as data shared by the client and the lab."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

ERROR_SAMPLES: Final = 5  # distinct error messages kept for the report


@dataclass(slots=True)
class SendResult:
    """What a run of the client got: counts by outcome and the ids the relay acknowledged."""

    sent: int = 0  # messages tried
    acked: int = 0  # messages that got 250 after DATA
    refused: dict[int, int] = field(default_factory=dict)  # SMTP code -> messages
    errors: int = 0  # messages that got no SMTP reply (connection failed or dropped)
    ids_acked: list[str] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)  # the first few distinct errors
    seconds: float = 0.0

    @property
    def all_acked(self) -> bool:
        """Every message tried got 250 (and at least one was tried)."""
        return self.sent > 0 and self.acked == self.sent

    def summary(self) -> str:
        """One line for people."""
        refused = ", ".join(f"{code}: {n}" for code, n in sorted(self.refused.items())) or "none"
        return (
            f"sent {self.sent}, acked {self.acked}, refused {refused}, errors {self.errors} "
            f"in {self.seconds:.2f}s"
        )

    def to_json(self) -> dict[str, Any]:
        """The result as plain JSON data."""
        return {
            "sent": self.sent,
            "acked": self.acked,
            "refused": {str(code): n for code, n in self.refused.items()},
            "errors": self.errors,
            "ids_acked": list(self.ids_acked),
            "error_samples": list(self.error_samples),
            "seconds": round(self.seconds, 4),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SendResult:
        """The result from :meth:`to_json`'s output."""
        return cls(
            sent=int(data["sent"]),
            acked=int(data["acked"]),
            refused={int(code): int(n) for code, n in data.get("refused", {}).items()},
            errors=int(data["errors"]),
            ids_acked=[str(i) for i in data.get("ids_acked", ())],
            error_samples=[str(e) for e in data.get("error_samples", ())],
            seconds=float(data.get("seconds", 0.0)),
        )
