"""A fleet: several pairs on one ZooKeeper ensemble, each under ``<chroot>/hamta/<pair>``.

Each pair's znodes carry its own digest user's ACL (every permission) and READ for the fleet's
reader: the agents of one pair can neither read nor change another's, and the reader sees every
pair and changes none. The fleet's root (``<chroot>/hamta``) belongs to the ensemble's
administrator, who creates each pair's root (``create_pair``): a root the first pair's agents
created would be theirs, and no other pair could be created beside it.

Reading is from what the members publish (their member znodes, the leader, the epoch and the
history): no queue walk, nothing of any relay. A pair that cannot be read (no reader ACL, no
epoch yet, bad JSON) is listed with the reason; it never ends the listing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoAuthError, NodeExistsError, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.security import ACL, Id, Permissions

from cluster.coordination_layout import ROOT, Credentials, reader_acl
from cluster.zk_acl import parents, split_chroot

#: How long one read may wait for ZooKeeper's answer.
IO_TIMEOUT: Final = 5.0


class FleetError(Exception):
    """The fleet's root cannot be read or a pair cannot be created; the message says why."""


class PairExistsError(FleetError):
    """The pair's root exists already (created before: nothing is changed)."""


def fleet_root(hosts: str) -> tuple[str, str]:
    """``"h1:2181,h2:2181/x"`` -> (``"h1:2181,h2:2181"``, ``"/x/hamta"``)."""
    servers, chroot = split_chroot(hosts)
    return servers, f"{chroot}{ROOT}"


def _wait(result: Any) -> Any:
    return result.get(timeout=IO_TIMEOUT)


def _json(client: KazooClient, path: str) -> Any:
    data, _stat = _wait(client.get_async(path))
    return msgspec.json.decode(data) if data else None


def create_pair(
    client: KazooClient,
    root: str,
    pair: str,
    *,
    admin: Credentials,
    owner: str,
    readers: Sequence[str],
) -> list[str]:
    """Create the fleet's root (if missing) and ``pair``'s root; the paths created.

    ``client`` is authenticated as ``admin``; ``owner`` and ``readers`` are digest identities
    (``user:hash``). The fleet's root and its parents get the administrator's ACL and READ for
    the readers (who list the pairs); the pair's root its owner's and READ for the readers.
    """
    if not pair or pair in (".", "..") or "/" in pair or "\0" in pair:
        raise FleetError(f"invalid pair name {pair!r}")
    fleet_acl: list[ACL] = admin.acl(readers)
    pair_acl = [ACL(Permissions.ALL, Id("digest", owner)), *reader_acl(readers)]
    created = []
    steps = [(path, fleet_acl) for path in [*parents(root), root]]
    for path, acl in [*steps, (f"{root}/{pair}", pair_acl)]:
        try:
            _wait(client.create_async(path, b"", acl=acl))
        except NodeExistsError:
            if path.endswith(f"/{pair}"):
                raise PairExistsError(f"pair {pair!r} exists already ({path})") from None
            continue
        except NoAuthError:
            raise FleetError(
                f"user {admin.user!r} may not create {path}: its parent belongs to another user"
            ) from None
        created.append(path)
    return created


def read_pair(
    client: KazooClient, root: str, pair: str, now: float, heartbeat: float = 1.0
) -> dict[str, Any]:
    """One pair as data; ``problem`` says why it could not be read (then little else is set)."""
    base = f"{root}/{pair}"
    status: dict[str, Any] = {"pair": pair, "problem": None, "nodes": []}
    try:
        # The pair's root first: the reader without READ on it is told so (beneath it, ZooKeeper
        # answers NoNode whether a znode is missing or merely hidden).
        _wait(client.get_children_async(base))
        epoch = _json(client, f"{base}/epoch")
        status["epoch"] = epoch.get("epoch") if isinstance(epoch, dict) else None
        try:
            leader = _json(client, f"{base}/leader")
        except NoNodeError:
            leader = None
        status["leader"] = leader.get("node") if isinstance(leader, dict) else None
        status["leader_epoch"] = leader.get("epoch") if isinstance(leader, dict) else None
        history = _json(client, f"{base}/history") or []
        status["last_failover"] = history[-1] if history else None
        status["failovers"] = len(history)
        vips = set()
        for name in sorted(_wait(client.get_children_async(f"{base}/members"))):
            try:
                member = _json(client, f"{base}/members/{name}")
            except NoNodeError:
                continue  # its session ended meanwhile
            if not isinstance(member, dict):
                continue
            if member.get("vip"):
                vips.add(member["vip"])
            status["nodes"].append(
                {
                    "node": name,
                    "role": member.get("role"),
                    "epoch": member.get("epoch"),
                    "relay_ready": member.get("relay_ready"),
                    "queue_depth": member.get("queue_depth"),
                    "heartbeat_age_s": round(now - float(member.get("heartbeat", 0.0)), 2),
                    "fresh": now - float(member.get("heartbeat", 0.0)) <= 3 * heartbeat + 1.0,
                    "smtp": member.get("smtp"),
                }
            )
        status["vip"] = sorted(vips)
        status["queue_depth"] = sum(int(node["queue_depth"] or 0) for node in status["nodes"])
    except NoAuthError:
        status["problem"] = "unreadable: the fleet reader has no READ on it (agent.fleet_reader)"
    except NoNodeError as exc:
        status["problem"] = f"incomplete: {exc.__class__.__name__} (no agent has started yet?)"
    except (msgspec.DecodeError, AttributeError, TypeError, ValueError) as exc:
        status["problem"] = f"damaged: {exc}"
    except (KazooTimeoutError, KazooException) as exc:
        status["problem"] = f"unanswered: {exc!r}"
    return status


def pairs(client: KazooClient, root: str) -> list[str]:
    """The pairs' names under the fleet's root, or FleetError."""
    try:
        return sorted(_wait(client.get_children_async(root)))
    except NoNodeError:
        raise FleetError(f"no fleet at {root}: no pair was ever created there") from None
    except NoAuthError:
        raise FleetError(f"these credentials may not list {root}") from None
    except (KazooTimeoutError, KazooException) as exc:
        raise FleetError(f"listing {root}: {exc!r}") from exc


def fleet_status(
    client: KazooClient, root: str, wall: Callable[[], float] = time.time
) -> list[dict[str, Any]]:
    """Every pair under ``root``, as ``read_pair`` reads it."""
    now = wall()
    return [read_pair(client, root, pair, now) for pair in pairs(client, root)]


def fleet_history(client: KazooClient, root: str) -> list[dict[str, Any]]:
    """The failover records of every readable pair, each with its ``pair``, oldest first."""
    merged: list[dict[str, Any]] = []
    for pair in pairs(client, root):
        try:
            records = _json(client, f"{root}/{pair}/history") or []
        except (NoAuthError, NoNodeError, msgspec.DecodeError, KazooException):
            continue  # fleet status names such pairs; the history is of those that have one
        merged += [{"pair": pair, **record} for record in records if isinstance(record, dict)]
    return sorted(merged, key=lambda record: float(record.get("at", 0.0)))


def format_fleet(status: list[dict[str, Any]]) -> str:
    """``hamta fleet status`` as a table: a line per pair, then one per node."""
    if not status:
        return "no pair in the fleet"
    lines = []
    for pair in status:
        if pair["problem"]:
            lines.append(f"{pair['pair']}: {pair['problem']}")
            continue
        last = pair["last_failover"]
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(last.get("at", 0))))
            if last
            else "never"
        )
        lines.append(
            f"{pair['pair']}: epoch {pair['epoch']}  leader {pair['leader'] or '-'}  "
            f"vip {','.join(pair['vip']) or '-'}  queue {pair['queue_depth']}  "
            f"last failover {when}"
        )
        for node in pair["nodes"]:
            stale = "" if node["fresh"] else "  STALE"
            lines.append(
                f"    {node['node']:<12} {node['role']:<10} epoch {node['epoch']}  "
                f"queue {node['queue_depth']}  heartbeat {node['heartbeat_age_s']}s{stale}"
            )
    return "\n".join(lines)


def format_fleet_history(records: list[dict[str, Any]]) -> str:
    """``hamta fleet history``: every pair's failovers, oldest first."""
    if not records:
        return "no failover recorded"
    return "\n".join(
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(r.get('at', 0))))}  "
        f"{r['pair']}  epoch {r.get('epoch')}  {r.get('previous') or '-'} -> {r.get('node')}  "
        f"({r.get('reason')})  total {r.get('total')}s"
        for r in records
    )
