"""Who may touch the cluster's znodes: the paths above its root, and ACLs checked at start.

Every path the agent creates, from the first component of the chroot down to the cluster's
root and what is under it, gets the cluster's ACL (every permission for its digest user, none
for anybody else). ZooKeeper checks CREATE and DELETE on the *parent*, so a parent that lets
anyone create children lets anyone make a cluster root of their own with an open ACL, wait for
the agents to fill it, and delete what they wrote. Hence, at each agent's start:

- under the cluster's root, every znode must carry exactly the cluster's ACL: one that does not
  (left by an older version, by a client without credentials, or by a squatter) is set to it,
  and when this user may not change it the agent refuses to start;
- above it (the chroot's components, ``/hamta``), a znode may belong to the ensemble's
  administrator, but must give anybody (``world:anyone``) at most READ: one that gives more is
  set to the cluster's ACL when this user may, else reported (:class:`AclReport`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError, NoNodeError
from kazoo.security import ACL, ANYONE_ID_UNSAFE, Permissions

_WRITE_PERMS: Final = Permissions.ALL & ~Permissions.READ
#: How deep the check walks under the cluster's root (members/<node> is at depth 2).
_MAX_DEPTH: Final = 4


def split_chroot(hosts: str) -> tuple[str, str]:
    """``"h1:2181,h2:2181/a/b"`` -> (``"h1:2181,h2:2181"``, ``"/a/b"``); no chroot: ``""``."""
    servers, slash, chroot = hosts.partition("/")
    if not slash:
        return servers, ""
    parts = chroot.rstrip("/").split("/")
    for part in parts:
        if not part or part in (".", "..") or "\0" in part or part == "zookeeper":
            raise ValueError(f"invalid chroot /{chroot} in {hosts!r}")
    return servers, "/" + "/".join(parts)


def check_digest_id(value: str) -> str:
    """``user:hash`` (base64 of SHA-1, as ``hamta fleet reader-id`` prints it), or ``""``."""
    user, colon, digest = value.partition(":")
    if value and not (
        user
        and colon
        and len(digest) == 28
        and digest.endswith("=")
        and all(c.isascii() and (c.isalnum() or c in "+/") for c in digest[:-1])
    ):
        # Never echo the value: it may be the password itself, given by mistake.
        raise ValueError(
            "must be a digest identity 'user:hash' as `hamta fleet reader-id` prints it "
            "(the base64 hash of 'user:password', never the password)"
        )
    return value


def parents(root: str) -> list[str]:
    """Every path above ``root``, top down: ``/a/b/c`` -> ``["/a", "/a/b"]``."""
    parts = [part for part in root.split("/") if part][:-1]
    return ["/" + "/".join(parts[: index + 1]) for index in range(len(parts))]


def describe(acls: list[ACL]) -> str:
    """An ACL as ZooKeeper's CLI writes it (``world:anyone:cdrwa``), for the log."""
    letters = (
        (Permissions.CREATE, "c"),
        (Permissions.DELETE, "d"),
        (Permissions.READ, "r"),
        (Permissions.WRITE, "w"),
        (Permissions.ADMIN, "a"),
    )
    return ",".join(
        f"{acl.id.scheme}:{acl.id.id.split(':')[0]}:"
        + "".join(letter for bit, letter in letters if acl.perms & bit)
        for acl in acls
    )


def open_to_anyone(acls: list[ACL]) -> bool:
    """Whether these ACLs let a client without credentials do more than read."""
    return any(acl.id == ANYONE_ID_UNSAFE and acl.perms & _WRITE_PERMS for acl in acls)


@dataclass(frozen=True)
class AclFix:
    """One znode whose ACL was not what it should be: set to the cluster's, or left (why)."""

    path: str
    before: str
    fixed: bool


class AclError(Exception):
    """A znode of the cluster gives others access and this user may not change that."""


def _walk(client: KazooClient, wait: Callable[[Any], Any], root: str) -> Iterator[str]:
    pending = [(root, 0)]
    while pending:
        path, depth = pending.pop()
        yield path
        if depth < _MAX_DEPTH:
            try:
                children = wait(client.get_children_async(path))
            except NoNodeError:
                continue
            except NoAuthError:
                raise AclError(
                    f"{path} belongs to another user: this user may not list it"
                ) from None
            pending += [(f"{path}/{child}", depth + 1) for child in sorted(children)]


def secure(
    client: KazooClient, wait: Callable[[Any], Any], root: str, acl: list[ACL]
) -> list[AclFix]:
    """Check (and set where needed and allowed) the ACLs of ``root``, its parents and its tree.

    AclError when a znode of the tree keeps an ACL other than ``acl`` that cannot be changed.
    """
    fixes: list[AclFix] = []
    wanted = set(acl)
    for path in [*parents(root), *_walk(client, wait, root)]:
        inside = path == root or path.startswith(root + "/")
        try:
            current, _stat = wait(client.get_acls_async(path))
        except NoNodeError:
            continue  # an ephemeral znode gone meanwhile
        except NoAuthError:
            if inside:
                raise AclError(
                    f"{path} belongs to another user: this user may not read it"
                ) from None
            continue  # the administrator's, and closed to this user: not open to anybody either
        if (set(current) == wanted) if inside else not open_to_anyone(current):
            continue
        try:
            wait(client.set_acls_async(path, acl))
        except NoAuthError:
            if inside:
                raise AclError(
                    f"{path} has the ACL {describe(current)} and this user may not change it: "
                    "the ensemble's administrator must delete it (as the super user), or use "
                    "another cluster name"
                ) from None
            fixes.append(AclFix(path, describe(current), fixed=False))
            continue
        except NoNodeError:
            continue
        fixes.append(AclFix(path, describe(current), fixed=True))
    return fixes
