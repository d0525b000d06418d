"""``hamta spool check [--repair]``: what recovery would find on a spool no relay holds.

Check reads only (like ``hamta queue``): the damaged files, the messages a relay would rebuild
from their segments and those it would lose, by queue id. Repair is what a relay's recovery
does, run offline: take the spool's lock, keep damaged files aside in ``damaged/``, rebuild,
fold everything into a fresh checkpoint; a second pass, now clean, deletes the segments that
were kept while damage was unresolved.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from hamta.spool import Spool, SpoolState, load_state


def _summary(shard: Path, state: SpoolState) -> dict[str, Any]:
    damage = state.damage
    return {
        "spool": str(shard),
        "messages": state.stats.messages,
        "torn_frames": state.stats.torn_frames,
        "damaged": bool(damage),
        "files": list(damage.files),
        "kept": list(damage.kept),
        "damaged_frames": damage.damaged_frames,
        "damaged_entries": damage.damaged_entries,
        "rebuilt": list(damage.rebuilt),
        "lost": list(damage.lost),
    }


def check(shard: Path) -> dict[str, Any]:
    """What recovery would find in ``shard``; changes nothing."""
    return _summary(shard, load_state(shard))


async def _recover_once(shard: Path) -> SpoolState:
    spool = Spool(shard)
    spool.open()  # SpoolError when a relay holds it
    try:
        return await spool.recover()
    finally:
        await spool.close()  # waits for the checkpoint that folds the recovered state


def repair(shard: Path) -> dict[str, Any]:
    """Recover ``shard`` as a relay would, twice: rebuild and keep aside, then clean up."""
    first = asyncio.run(_recover_once(shard))
    second = asyncio.run(_recover_once(shard))
    report = _summary(shard, first)
    report["clean_after_repair"] = not second.damage
    return report


def render(report: dict[str, Any]) -> str:
    """The report of one spool directory, for people."""
    lines = [f"{report['spool']}: {report['messages']} messages queued"]
    if not report["damaged"]:
        lines[0] += ", no damage" + (
            f" ({report['torn_frames']} torn frames: a crash)" if report["torn_frames"] else ""
        )
        return "\n".join(lines)
    lines.append(
        f"  DAMAGED: {', '.join(report['files']) or '(no file)'}: {report['damaged_frames']} "
        f"journal/checkpoint spans, {report['damaged_entries']} segment spans"
    )
    lines += [f"  kept aside: {kept}" for kept in report["kept"]]
    lines += [f"  rebuilt from its segment: {qid}" for qid in report["rebuilt"]]
    lines += [f"  LOST (its own bytes are damaged): {qid}" for qid in report["lost"]]
    if "clean_after_repair" in report:
        lines.append(
            "  repaired: a fresh checkpoint holds the queue"
            if report["clean_after_repair"]
            else "  still damaged after repair"
        )
    return "\n".join(lines)
