"""Who the relay runs as: the user it becomes, and giving up root before any client byte.

The relay parses bytes from anyone on the internet, so it must not hold what the cluster agent
holds (root, CAP_SYS_ADMIN to mount, CAP_NET_ADMIN for the virtual IP). ``hamta serve`` binds
its listening sockets first (hamta.listeners), then calls ``drop_privileges`` before its event
loop, its threads or its worker processes exist: after it the process has a plain uid and gid,
no supplementary groups, no capability in any set (effective, permitted, inheritable, ambient,
and the bounding set when it may be cleared) and no_new_privs, so that nothing it executes
can gain privileges again. capset(2) and prctl(2) act on the calling thread only: that is why
the drop comes before the first thread, and why the check reads every thread's status.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

# The user a relay started as root becomes when its configuration names none.
DEFAULT_USER = "hamta"

_PR_SET_PDEATHSIG = 1
_PR_GET_PDEATHSIG = 2
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_SETPCAP = 8
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapAmb")


class PrivilegeError(Exception):
    """The relay cannot run as the configured user, or could not give up its privileges."""


@dataclass(frozen=True, slots=True)
class Identity:
    """A user and group to run as."""

    user: str
    uid: int
    group: str
    gid: int


def _user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(f"no such user {name!r}") from None


def _group(name: str) -> grp.struct_group:
    try:
        return grp.getgrnam(name)
    except KeyError:
        raise PrivilegeError(f"no such group {name!r}") from None


def resolve(user: str | None, group: str | None, euid: int | None = None) -> Identity:
    """The identity the relay runs as, from ``[node] user`` and ``group``.

    Unset, a relay started as root becomes ``hamta`` and refuses to start when that user does
    not exist; a relay started as anyone else stays who it is. ``user = "root"`` keeps root on
    purpose (the namespace lab, tests); it is never the default.
    """
    euid = os.geteuid() if euid is None else euid
    if user is None:
        if euid == 0:
            try:
                entry = pwd.getpwnam(DEFAULT_USER)
            except KeyError:
                raise PrivilegeError(
                    f"started as root and [node] user is not set: no user {DEFAULT_USER!r} to "
                    f"run as; create it (useradd --system {DEFAULT_USER}) or set [node] user "
                    '(user = "root" keeps root, which is not recommended)'
                ) from None
        else:
            entry = pwd.getpwuid(euid)
    else:
        entry = _user(user)
        if euid not in (0, entry.pw_uid):
            raise PrivilegeError(f"cannot become user {user!r}: started as uid {euid}, not as root")
    gr = _group(group) if group is not None else grp.getgrgid(entry.pw_gid)
    return Identity(entry.pw_name, entry.pw_uid, gr.gr_name, gr.gr_gid)


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise PrivilegeError(f"{what}: {os.strerror(errno)}")


def _last_cap() -> int:
    return int(Path("/proc/sys/kernel/cap_last_cap").read_text())


def _status(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _has_effective(status: dict[str, str], cap: int) -> bool:
    return bool(int(status["CapEff"], 16) >> cap & 1)


def drop_privileges(identity: Identity) -> dict[str, object]:
    """Become ``identity`` for good, with no capability left; what was done, for the log.

    Call it before any thread is started. Raises PrivilegeError when any step fails or the
    kernel's view of any thread afterwards still shows a capability or another uid.
    """
    libc = _libc()
    started_as = os.geteuid()
    bounding = "kept"
    # The kernel forgets the parent-death signal when the effective uid changes: the signal the
    # cluster agent asked for (setpriv --pdeathsig, cluster/relayproc.py) is set again below,
    # or a relay would outlive a killed agent.
    parent = os.getppid()
    death_signal = ctypes.c_int(0)
    _check(libc.prctl(_PR_GET_PDEATHSIG, ctypes.byref(death_signal), 0, 0, 0), "reading pdeathsig")
    if started_as == 0 and identity.uid != 0:
        # While root: empty the bounding set, so that not even an exec could regain a
        # capability. It needs CAP_SETPCAP, which a unit's CapabilityBoundingSet may have
        # taken away; no_new_privs below covers exec then.
        if _has_effective(_status(Path("/proc/self/status")), _CAP_SETPCAP):
            for cap in range(_last_cap() + 1):
                _check(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap}")
            bounding = "cleared"
        try:
            os.setgroups([])
            os.setresgid(identity.gid, identity.gid, identity.gid)
            # Without PR_SET_KEEPCAPS (off by default) the kernel clears the permitted and
            # effective sets when the last uid 0 goes.
            os.setresuid(identity.uid, identity.uid, identity.uid)
        except OSError as exc:
            raise PrivilegeError(
                f"cannot become {identity.user}:{identity.group}: {exc.strerror}"
            ) from None
        if death_signal.value:
            _check(libc.prctl(_PR_SET_PDEATHSIG, death_signal.value, 0, 0, 0), "setting pdeathsig")
            if os.getppid() != parent:  # the parent died before it took effect
                os.kill(os.getpid(), death_signal.value)
    elif os.geteuid() != identity.uid:
        raise PrivilegeError(f"cannot become user {identity.user!r}: not started as root")
    if identity.uid != 0:
        _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "setting no_new_privs")
        # A process started unprivileged may have been handed ambient or inheritable
        # capabilities (systemd's AmbientCapabilities=): its sockets are bound, so none is left.
        _check(
            libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0),
            "clearing the ambient capabilities",
        )
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        _check(libc.capset(ctypes.byref(header), data), "clearing the capabilities")
        _verify(identity)
    return {
        "user": identity.user,
        "uid": identity.uid,
        "group": identity.group,
        "gid": identity.gid,
        "started_as_uid": started_as,
        "bounding_set": bounding,
        "parent_death_signal": death_signal.value,
    }


def _verify(identity: Identity) -> None:
    """Read back, for every thread, what the kernel says this process is."""
    for task in Path("/proc/self/task").iterdir():
        status = _status(task / "status")
        uids = set(status["Uid"].split())
        gids = set(status["Gid"].split())
        if uids != {str(identity.uid)} or gids != {str(identity.gid)}:
            raise PrivilegeError(
                f"thread {task.name} still runs as uid {status['Uid']} gid {status['Gid']}"
            )
        if status.get("Groups", "") not in ("", str(identity.gid)):
            raise PrivilegeError(f"thread {task.name} keeps groups {status['Groups']}")
        left = [name for name in _CAP_SETS if int(status.get(name, "0"), 16)]
        if left or status.get("NoNewPrivs") != "1":
            raise PrivilegeError(f"thread {task.name} keeps capabilities {left} or new privs")


def give_tree(path: Path, identity: Identity) -> int:
    """Make ``path`` (created if missing) and everything in it belong to ``identity``.

    The relay's spool must be its user's; a spool created before the relay gave up root (or
    by another release) is handed over once, deepest entries first and ``path`` itself last,
    so that an interrupted hand-over is redone on the next call. A spool already owned costs
    one stat. Returns how many entries changed owner.
    """
    path.mkdir(parents=True, exist_ok=True)
    top = path.lstat()
    if (top.st_uid, top.st_gid) == (identity.uid, identity.gid):
        return 0
    changed = 0
    for directory, dirs, files in os.walk(path, topdown=False, onerror=_raise):
        for name in [*files, *dirs]:
            entry = Path(directory, name)
            st = entry.lstat()
            if (st.st_uid, st.st_gid) != (identity.uid, identity.gid):
                os.lchown(entry, identity.uid, identity.gid)
                changed += 1
    os.lchown(path, identity.uid, identity.gid)
    return changed + 1


def _raise(error: OSError) -> None:
    raise error  # os.walk would otherwise skip a directory it cannot read, silently


def give_log_file(path: Path, identity: Identity) -> None:
    """Create ``path`` (and its directory) if missing: root's, writable by ``identity``'s group.

    The relay opens its log while still root, and its workers, started after the drop, open it
    as ``identity``. Under its systemd unit root has no CAP_DAC_OVERRIDE, so a file of the
    user's own would refuse root at the next start (the Vagrant cluster's relays failed so at
    every restart): root's with the group's write (0660) serves both. A file an earlier release
    gave the user is taken back with CAP_CHOWN, which the units keep. Call it before the log is
    opened.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Never through a symlink, and only a plain file of one name: a link planted where the log
    # goes must not make root hand another file (the configuration, /dev/null) to the group.
    try:
        before: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        before = None
    if before is not None:
        _plain_file(path, before)
        # Root's first (CAP_CHOWN, not following a link): root without CAP_DAC_OVERRIDE may
        # not open a file of the user's own, which an earlier release left.
        os.lchown(path, 0, identity.gid)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o660)
    except OSError as exc:
        raise PrivilegeError(f"log file {path}: {exc.strerror}") from None
    try:
        opened = os.fstat(fd)
        _plain_file(path, opened)
        if before is not None and (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
            raise PrivilegeError(f"log file {path}: replaced while it was handed over")
        os.fchown(fd, 0, identity.gid)
        os.fchmod(fd, 0o660)
    finally:
        os.close(fd)


def _plain_file(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        raise PrivilegeError(f"log file {path}: not a plain file with one link; not handed over")


def give_control_directory(path: Path, identity: Identity) -> None:
    """Make the directory of the relay's control sockets if missing: root's, 0770, the group
    ``identity``'s, so that the relay as its user makes its workers' sockets in it and the
    agent (root, owner) reaches them all.

    Not systemd's ``RuntimeDirectory=`` for it: systemd sets such a directory's owner and mode
    again before every command of the unit, undoing a group given by ``ExecStartPre``. One that
    exists is left as it is (it may be shared, like /run); whether the user may use it is
    checked after the drop (``check_control_directory``).
    """
    if path.is_dir():
        return
    path.mkdir(parents=True)
    os.lchown(path, 0, identity.gid)
    path.chmod(0o770)


def check_control_directory(path: Path, identity: Identity, *, writable: bool) -> None:
    """As the relay's user (after the drop): may it reach its socket in ``path`` and, when it
    runs or may run workers (``writable``), make theirs there?"""
    if not os.access(path, (os.W_OK | os.X_OK) if writable else os.X_OK):
        try:
            st = path.stat()
            what = f"{_owner(st.st_uid)}:{_group_name(st.st_gid)} {st.st_mode & 0o7777:04o}"
        except OSError as exc:
            what = exc.strerror or str(exc)
        raise PrivilegeError(
            f"as user {identity.user}: cannot {'make sockets in' if writable else 'reach'} "
            f"{path} ({what}), the directory of control.socket: give it to group "
            f"{identity.group} with mode 0770, or remove it and hamta serve makes it so"
        )


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
