"""The Vagrant cluster (``vagrant/``), driven from a network namespace with a libvirtd of its own.

The namespace lab shares one kernel and one filesystem between its nodes; the Vagrant cluster
does not: three virtual machines (mx1 and mx2 with real DRBD, and the arbiter) provisioned by
``ansible/site.yml``, or five with ``pairs=2`` (``HAMTA_PAIRS=2``: mx3 and mx4 as a second pair
on the same ensemble, ``vagrant/inventory-pairs``). Tests and ``bench/failover.py --cluster
vagrant`` drive it from outside, as an operator would, through this module. The machines, their
addresses, the pairs and their virtual IPs are read from the inventory the playbooks use
(``ansible-inventory --list``), not repeated here; :meth:`VagrantCluster.pair` gives the view of
one pair (its nodes, its virtual IP, its agents' status) sharing the host side.

Everything runs inside a network namespace this module creates (``hvg0`` by default): libvirtd
and virtlogd (started here, stopped by their pids: the machine has no systemd), the bridges
libvirt makes for the management and cluster networks (198.19.100.0/24, 198.19.101.0/24),
the DHCP server libvirt starts for the first, and ``vagrant`` with its Ansible provisioner. No
test traffic reaches the host's own network. :meth:`VagrantCluster.stop_host` removes what
:meth:`start_host` and ``vagrant up`` created: the machines, their volumes and the box's image
in libvirt's pool, the networks, the daemons, the runtime and configuration files libvirt wrote
and the namespace.

libvirtd also listens on TCP (port 16509, no authentication) on the cluster network's host
address alone (198.19.101.1), not on the management network's: the machines fence each other
with ``virsh -c qemu+tcp://198.19.101.1/system destroy`` (the inventory's libvirt fence agent).

The guests have no route to a package index: the wheels for the hamta role are built on the
host (which has one) before ``vagrant up``, where the role finds them (``.vagrant/wheelhouse``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any, TypeVar

from cluster.lab import client
from cluster.lab.configs import render_toml
from cluster.lab.results import SendResult
from cluster.operator import is_standby

NAMESPACE = "hvg0"
BOX = "hamta/bookworm"  # vagrant/Vagrantfile's box, built by vagrant/build-box
BOX_BUILD_TIMEOUT = 1800.0
ARBITER = "arbiter"
#: The host's address on the cluster network (libvirt's bridge).
HOST_ADDRESS = "198.19.101.1"
#: vagrant-libvirt names each domain ``<default_prefix><machine>`` (the Vagrantfile's prefix).
DOMAIN_PREFIX = "hamta-"
NETWORKS = ("hamta-management", "hamta-cluster")
#: The domain the inventory routes to the arbiter's sink.
MAIL_DOMAIN = "example.test"
SINK_MAILDIR = "/var/lib/mx-sink/Maildir"
HAMTA = "/opt/hamta/bin/hamta"
#: The fleet's reader (HAMTA_PAIRS=2): inventory-pairs makes up its password under .vagrant/secrets.
FLEET_READER = "fleet-reader"
LIBVIRT_URI = "qemu:///system"

_LIBVIRT_RUN = Path("/run/libvirt")
# Where libvirtd persists configuration and state, and where it logs: what a run adds there is
# removed again (the logs are moved into the work directory).
_LIBVIRT_TREES = (Path("/etc/libvirt"), Path("/var/lib/libvirt"), Path("/var/log/libvirt"))
_LIBVIRT_LOGS = Path("/var/log/libvirt")
_RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")
_T = TypeVar("_T")


def libvirtd_config(log: Path) -> str:
    """The namespace's libvirtd.conf.

    TCP without authentication, because the guests' fence agent destroys its peer through it;
    so on the cluster network's host address only: a guest's management interface (and
    anything else on that network) does not reach it.
    """
    return (
        f'listen_tls = 0\nlisten_tcp = 1\nlisten_addr = "{HOST_ADDRESS}"\nauth_tcp = "none"\n'
        'auth_unix_rw = "none"\nunix_sock_group = "root"\n'
        f'log_outputs = "3:file:{log}"\n'
    )


class VagrantError(Exception):
    """The Vagrant cluster could not be built, driven or taken down."""


@dataclass(frozen=True, slots=True)
class Pair:
    """One pair of the inventory: its name (``agent.cluster``), its two nodes, its virtual IP."""

    name: str
    nodes: tuple[str, ...]
    vip: str


@dataclass(frozen=True, slots=True)
class Inventory:
    """What the harness needs of an inventory: every machine's address and the pairs."""

    addresses: dict[str, str]
    pairs: tuple[Pair, ...]

    def pair(self, name: str) -> Pair:
        """The pair called ``name``; VagrantError if the inventory has none."""
        for pair in self.pairs:
            if pair.name == name:
                return pair
        raise VagrantError(f"no pair {name!r} in the inventory: {[p.name for p in self.pairs]}")


def _group_hosts(groups: dict[str, Any], name: str) -> list[str]:
    """The hosts of group ``name`` and of its children, in the inventory's order."""
    group = groups.get(name, {})
    hosts = list(group.get("hosts", []))
    for child in group.get("children", []):
        hosts += [h for h in _group_hosts(groups, child) if h not in hosts]
    return hosts


def parse_inventory(listed: dict[str, Any]) -> Inventory:
    """An :class:`Inventory` from ``ansible-inventory --list``'s JSON.

    The pairs are the ``hamta`` group's hosts grouped by ``hamta_cluster`` (the name their
    agents use), each with its ``hamta_vip`` without the prefix length.
    """
    hostvars: dict[str, dict[str, Any]] = listed.get("_meta", {}).get("hostvars", {})
    addresses = {host: str(v["ansible_host"]) for host, v in hostvars.items()}
    nodes: dict[str, list[str]] = {}
    vips: dict[str, str] = {}
    for host in _group_hosts(listed, "hamta"):
        name = str(hostvars[host]["hamta_cluster"])
        nodes.setdefault(name, []).append(host)
        vips[name] = str(hostvars[host]["hamta_vip"]).partition("/")[0]
    pairs = tuple(Pair(name, tuple(sorted(members)), vips[name]) for name, members in nodes.items())
    return Inventory(addresses, pairs)


@dataclass(frozen=True, slots=True)
class PlaybookRun:
    """One ``ansible-playbook`` run: its exit status, its output and the recap per host."""

    returncode: int
    output: str
    changed: dict[str, int]
    failed: dict[str, int]

    @property
    def ok(self) -> bool:
        """Exit status 0 and no host failed or unreachable."""
        return self.returncode == 0 and not any(self.failed.values())


def parse_recap(output: str) -> tuple[dict[str, int], dict[str, int]]:
    """``changed`` and ``failed + unreachable`` per host, from ansible-playbook's PLAY RECAP."""
    changed: dict[str, int] = {}
    failed: dict[str, int] = {}
    recap = output.rpartition("PLAY RECAP")[2]
    for line in recap.splitlines():
        found = _RECAP.match(line.strip())
        if found:
            host = found.group(1)
            changed[host] = int(found.group(3))
            failed[host] = int(found.group(4)) + int(found.group(5))
    return changed, failed


def wait_for(check: Callable[[], _T | None], timeout: float, interval: float = 1.0) -> _T | None:
    """``check()`` until it returns something other than None, or ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _libvirt_paths() -> set[Path]:
    return {p for tree in _LIBVIRT_TREES if tree.exists() for p in tree.rglob("*")}


def _ended(pid: int) -> bool | None:
    return True if not _pid_alive(pid) else None


def _read_pid(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().strip())
    return None


class VagrantCluster:
    """The Vagrant cluster of a checkout, run from network namespace ``namespace``.

    ``workdir`` keeps what the run writes outside the checkout: libvirtd's configuration and
    pid files, the daemons' logs, the output of every vagrant and ansible-playbook command,
    and the host's copy of the agent configuration used to ask ZooKeeper for the status.
    """

    def __init__(
        self,
        checkout: Path,
        workdir: Path,
        *,
        namespace: str = NAMESPACE,
        driver: str | None = None,
        python: str = sys.executable,
        pairs: int | None = None,
    ) -> None:
        self.checkout = checkout.resolve()
        self.vagrant_dir = self.checkout / "vagrant"
        self.dotfile = self.vagrant_dir / ".vagrant"
        self.workdir = workdir
        self.namespace = namespace
        # Plain qemu (TCG) unless told: KVM guests can hang under nested virtualisation.
        self.driver = driver or os.environ.get("HAMTA_VAGRANT_DRIVER") or "qemu"
        self.python = python
        # The Vagrantfile's HAMTA_PAIRS: which machines `vagrant up` defines, which inventory.
        self.pairs = pairs or int(os.environ.get("HAMTA_PAIRS") or "1")
        if self.pairs not in (1, 2):
            raise VagrantError(f"the Vagrant cluster has 1 or 2 pairs, not {self.pairs}")
        self.inventory_dir = self.vagrant_dir / (
            "inventory-pairs" if self.pairs == 2 else "inventory"
        )
        # The pair this object's pair methods (status, VIP, load) are about: the first unless
        # pair() made this a view of another.
        self._pair: Pair | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self._pids: dict[str, int] = {}
        self._made_run_dir = False
        self._paths_before: set[Path] = set()

    @cached_property
    def inventory(self) -> Inventory:
        """The machines and pairs of :attr:`inventory_dir`, as Ansible reads it."""
        done = subprocess.run(
            ["ansible-inventory", "-i", str(self.inventory_dir), "--list"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise VagrantError(f"ansible-inventory -i {self.inventory_dir}: {done.stderr.strip()}")
        return parse_inventory(json.loads(done.stdout))

    @property
    def current_pair(self) -> Pair:
        """The pair the pair methods are about."""
        return self._pair or self.inventory.pairs[0]

    @property
    def pair_name(self) -> str:
        """The current pair's name (``agent.cluster``)."""
        return self.current_pair.name

    @property
    def vip(self) -> str:
        """The current pair's virtual IP, where :meth:`send` and a load send."""
        return self.current_pair.vip

    @property
    def mail_nodes(self) -> tuple[str, ...]:
        """The current pair's two nodes."""
        return self.current_pair.nodes

    @property
    def machines(self) -> tuple[str, ...]:
        """Every machine of the cluster (both pairs' and the arbiter)."""
        return tuple(self.inventory.addresses)

    def pair(self, name: str) -> VagrantCluster:
        """This cluster seen as pair ``name``: the same machines and host side, its own status."""
        view = copy.copy(self)
        view._pair = self.inventory.pair(name)
        return view

    # ------------------------------------------------------------------ the host side

    def _netns(self, argv: Sequence[str]) -> list[str]:
        # The network namespace alone: `ip netns exec` would also give the command a mount
        # namespace of its own, and libvirtd's sockets and mounts must be the host's.
        return ["nsenter", f"--net=/run/netns/{self.namespace}", *argv]

    def start_host(self, timeout: float = 60.0) -> None:
        """Create the namespace and start virtlogd and libvirtd in it."""
        running = subprocess.run(
            ["pgrep", "-x", "libvirtd"], capture_output=True, text=True, check=False
        )
        if running.stdout.strip() or (_LIBVIRT_RUN / "libvirt-sock").exists():
            raise VagrantError(
                f"a libvirtd already runs (pids {running.stdout.split()}) or left "
                f"{_LIBVIRT_RUN}/libvirt-sock: the cluster needs one of its own in namespace "
                f"{self.namespace}"
            )
        if Path(f"/run/netns/{self.namespace}").exists():
            raise VagrantError(
                f"network namespace {self.namespace} exists: left by an earlier run? "
                f"(ip netns del {self.namespace} once nothing runs in it)"
            )
        # Recorded in the work directory too: stop_host of a later process (after a crash of
        # this one) then removes exactly what this run added.
        self._paths_before = _libvirt_paths()
        self._made_run_dir = not _LIBVIRT_RUN.exists()
        (self.workdir / "host.json").write_text(
            json.dumps(
                {
                    "paths_before": sorted(map(str, self._paths_before)),
                    "made_run_dir": self._made_run_dir,
                }
            ),
            encoding="utf-8",
        )
        subprocess.run(["ip", "netns", "add", self.namespace], check=True)
        subprocess.run(["ip", "-n", self.namespace, "link", "set", "lo", "up"], check=True)
        # The cluster network's bridge, which carries HOST_ADDRESS, exists only once vagrant
        # has defined the networks: in this namespace (its own sysctl) libvirtd may bind the
        # address before it is there.
        subprocess.run(
            self._netns(["sysctl", "-q", "-w", "net.ipv4.ip_nonlocal_bind=1"]), check=True
        )
        config = self.workdir / "libvirtd.conf"
        config.write_text(libvirtd_config(self.workdir / "libvirtd.log"), encoding="utf-8")
        for name, argv in (
            (
                "virtlogd",
                ["virtlogd", "--daemon", "--pid-file", str(self.workdir / "virtlogd.pid")],
            ),
            (
                "libvirtd",
                [
                    "libvirtd",
                    "--daemon",
                    "--listen",
                    "--config",
                    str(config),
                    "--pid-file",
                    str(self.workdir / "libvirtd.pid"),
                ],
            ),
        ):
            subprocess.run(self._netns(argv), check=True, timeout=timeout)
            pid_file = self.workdir / f"{name}.pid"
            pid = wait_for(partial(_read_pid, pid_file), timeout, 0.2)
            if pid is None:
                raise VagrantError(f"{name} wrote no pid file {pid_file}")
            self._pids[name] = pid
        if (
            wait_for(lambda: True if self.virsh("version").returncode == 0 else None, timeout)
            is None
        ):
            raise VagrantError(f"libvirtd does not answer; see {self.workdir / 'libvirtd.log'}")

    def attach(self) -> bool:
        """Take over the host side an earlier process started with this work directory.

        True if its libvirtd still runs (then this object can drive and stop the cluster).
        """
        recorded = self.workdir / "host.json"
        if not recorded.exists():
            return False
        state = json.loads(recorded.read_text(encoding="utf-8"))
        self._paths_before = {Path(p) for p in state["paths_before"]}
        self._made_run_dir = bool(state["made_run_dir"])
        for name in ("libvirtd", "virtlogd"):
            pid = _read_pid(self.workdir / f"{name}.pid")
            if pid is not None and _pid_alive(pid):
                self._pids[name] = pid
        return "libvirtd" in self._pids

    def virsh(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``virsh -c qemu:///system ARGS`` (libvirtd's unix socket is the host's)."""
        return subprocess.run(
            ["virsh", "-c", LIBVIRT_URI, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def domains(self) -> list[str]:
        """Every domain of the cluster libvirt knows (running or not)."""
        done = self.virsh("list", "--all", "--name")
        return [n for n in done.stdout.split() if n.startswith(DOMAIN_PREFIX)]

    def running(self, machine: str) -> bool:
        """Whether ``machine``'s domain runs."""
        done = self.virsh("domstate", DOMAIN_PREFIX + machine)
        return done.returncode == 0 and done.stdout.strip() == "running"

    def leftovers(self) -> list[str]:
        """What of the cluster libvirt still has: domains, networks and volumes."""
        found = [f"domain {d}" for d in self.domains()]
        networks = self.virsh("net-list", "--all", "--name").stdout.split()
        found += [f"network {n}" for n in networks if n in NETWORKS]
        pools = self.virsh("pool-list", "--all", "--name").stdout.split()
        for pool in pools:
            for volume in self._volumes(pool):
                if volume.startswith(DOMAIN_PREFIX) or "VAGRANTSLASH" in volume:
                    found.append(f"volume {pool}/{volume}")
        return found

    def _volumes(self, pool: str) -> list[str]:
        done = self.virsh("vol-list", pool, "--details")
        names = []
        for line in done.stdout.splitlines()[2:]:
            if line.strip():
                names.append(line.split()[0])
        return names

    def stop_host(self) -> list[str]:
        """Remove what libvirt still holds of the cluster, the daemons and the namespace.

        Idempotent. Returns what could not be removed (empty when all went).
        """
        problems: list[str] = []
        recorded = self.workdir / "host.json"
        if not self._pids:
            self.attach()
        if self._pids.get("libvirtd") and _pid_alive(self._pids["libvirtd"]):
            for domain in self.domains():
                self.virsh("destroy", domain)
                done = self.virsh("undefine", domain, "--remove-all-storage", "--nvram")
                if done.returncode != 0:
                    self.virsh("undefine", domain)
            for network in NETWORKS:
                self.virsh("net-destroy", network)
                self.virsh("net-undefine", network)
            for pool in self.virsh("pool-list", "--all", "--name").stdout.split():
                for volume in self._volumes(pool):
                    # The machines' disks and the box's image vagrant-libvirt uploaded.
                    if volume.startswith(DOMAIN_PREFIX) or "VAGRANTSLASH" in volume:
                        self.virsh("vol-delete", "--pool", pool, volume)
            problems += self.leftovers()
            for pool in self.virsh("pool-list", "--all", "--name").stdout.split():
                if not self._volumes(pool):
                    self.virsh("pool-destroy", pool)
                    self.virsh("pool-undefine", pool)
        for name in ("libvirtd", "virtlogd"):
            pid = self._pids.pop(name, None)
            if pid is None or not _pid_alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            if wait_for(partial(_ended, pid), 30.0, 0.2) is None:
                os.kill(pid, signal.SIGKILL)
                problems.append(f"{name} (pid {pid}) did not end on SIGTERM; killed")
        # What libvirt persisted for this run (the pool, the networks, their directories) goes;
        # the machines' qemu logs are kept with the run's other logs.
        added = sorted(
            _libvirt_paths() - self._paths_before, key=lambda p: len(p.parts), reverse=True
        )
        for path in added:
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                elif path.is_relative_to(_LIBVIRT_LOGS):
                    (self.workdir / "libvirt-logs").mkdir(exist_ok=True)
                    shutil.move(path, self.workdir / "libvirt-logs" / path.name)
                else:
                    path.unlink()
        if self._made_run_dir:
            shutil.rmtree(_LIBVIRT_RUN, ignore_errors=True)
        recorded.unlink(missing_ok=True)
        if Path(f"/run/netns/{self.namespace}").exists():
            # Only this run's processes live in its namespace: what is left there (Ansible's
            # ssh ControlPersist masters, a vagrant that was interrupted) is ended by pid.
            left = self._namespace_pids()
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            if wait_for(lambda: True if not self._namespace_pids() else None, 10.0, 0.2) is None:
                problems.append(f"processes still in {self.namespace}: {self._namespace_pids()}")
            done = subprocess.run(
                ["ip", "netns", "del", self.namespace], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                problems.append(f"ip netns del {self.namespace}: {done.stderr.strip()}")
        return problems

    def _namespace_pids(self) -> list[int]:
        done = subprocess.run(
            ["ip", "netns", "pids", self.namespace], capture_output=True, text=True, check=False
        )
        return [int(pid) for pid in done.stdout.split() if pid.isdigit()]

    # ------------------------------------------------------------------ vagrant and ansible

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            VAGRANT_DEFAULT_PROVIDER="libvirt",
            HAMTA_VAGRANT_DRIVER=self.driver,
            LIBVIRT_DEFAULT_URI=LIBVIRT_URI,
            HAMTA_PAIRS=str(self.pairs),
            ANSIBLE_CONFIG=str(self.vagrant_dir / "ansible.cfg"),
            ANSIBLE_FORCE_COLOR="0",
            ANSIBLE_NOCOLOR="1",
            PYTHONUNBUFFERED="1",
        )
        return env

    def _logged(self, argv: Sequence[str], log: str, timeout: float) -> tuple[int, str]:
        path = self.workdir / log
        with path.open("ab") as out:
            out.write(f"\n$ {' '.join(argv)}\n".encode())
            out.flush()
            try:
                done = subprocess.run(
                    self._netns(argv),
                    cwd=self.vagrant_dir,
                    env=self._env(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise VagrantError(f"{' '.join(argv)} ran over {timeout:g}s; see {path}") from None
        text = path.read_text(errors="replace")
        return done.returncode, text[text.rfind(f"$ {' '.join(argv)}") :]

    def version(self) -> str:
        """The checkout's version (pyproject.toml), the wheelhouse's name."""
        project = tomllib.loads((self.checkout / "pyproject.toml").read_text(encoding="utf-8"))
        return str(project["project"]["version"])

    def build_wheels(self, timeout: float = 900.0) -> Path:
        """Every wheel the hamta role installs, built here where a package index answers.

        Built afresh every time (the role keys its wheelhouse and archive by version only, and
        the checkout may have changed since the last build without a new version), into a
        temporary directory renamed once complete, so that an interrupted build never leaves a
        wheelhouse the role would take for complete.
        """
        house = self.dotfile / "wheelhouse" / self.version()
        house.with_name(house.name + ".tar").unlink(missing_ok=True)
        partial = house.with_name(house.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        done = subprocess.run(
            [self.python, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(partial), "."],
            cwd=self.checkout,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise VagrantError(f"pip wheel failed: {done.stderr.strip()[-2000:]}")
        shutil.rmtree(house, ignore_errors=True)
        partial.rename(house)
        return house

    def ensure_box(self, timeout: float = BOX_BUILD_TIMEOUT) -> str:
        """Build and add the box (``vagrant/build-box``) unless Vagrant has it; what was done.

        Vagrant would otherwise look the name up in its remote catalog, fail with "could not
        resolve host" and the run would end with nothing measured. The build takes minutes
        (mmdebstrap from the Debian archive); its output goes to ``build-box.log``.
        """
        build = self.vagrant_dir / "build-box"
        if shutil.which("vagrant") is None:
            raise VagrantError(
                "vagrant is not installed: run scripts/bootstrap --vagrant, then sudo " + str(build)
            )
        listed = subprocess.run(
            ["vagrant", "box", "list"], capture_output=True, text=True, timeout=120, check=False
        )
        if BOX in listed.stdout.split():
            return f"box {BOX} present"
        log = self.workdir / "build-box.log"
        with log.open("ab") as out:
            try:
                done = subprocess.run(
                    [str(build)], stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
                )
            except subprocess.TimeoutExpired:
                raise VagrantError(f"{build} ran over {timeout:g}s; see {log}") from None
        if done.returncode != 0:
            last = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise VagrantError(
                f"Vagrant has no box {BOX} and {build} failed (exit {done.returncode}); "
                f"see {log}, fix, and run: sudo {build}\n{last}"
            )
        return f"box {BOX} built and added by {build}"

    def vagrant(self, *args: str, timeout: float = 3600.0) -> str:
        """``vagrant ARGS`` in the namespace; its output, or VagrantError if it failed."""
        code, output = self._logged(["vagrant", *args], "vagrant.log", timeout)
        if code != 0:
            raise VagrantError(
                f"vagrant {' '.join(args)} exited with {code}; {self.workdir / 'vagrant.log'}:\n"
                + "\n".join(output.splitlines()[-30:])
            )
        return output

    def up(self, timeout: float = 3600.0) -> None:
        """Build the wheels, then ``vagrant up``: the machines and the provisioning."""
        self.build_wheels()
        self.vagrant("up", timeout=timeout)

    def destroy(self, timeout: float = 600.0) -> None:
        """``vagrant destroy -f``."""
        self.vagrant("destroy", "-f", timeout=timeout)

    def playbook(self, playbook: str, *args: str, timeout: float = 3600.0) -> PlaybookRun:
        """``ansible-playbook -i <the inventory> ansible/PLAYBOOK ARGS`` from the namespace."""
        argv = [
            "ansible-playbook",
            "-i",
            str(self.inventory_dir),
            str(self.checkout / "ansible" / playbook),
            *args,
        ]
        code, output = self._logged(argv, "ansible.log", timeout)
        changed, failed = parse_recap(output)
        return PlaybookRun(code, output, changed, failed)

    # ------------------------------------------------------------------ the machines

    def key(self, machine: str) -> Path:
        """The private key Vagrant put on ``machine`` for the vagrant user."""
        return self.dotfile / "machines" / machine / "libvirt" / "private_key"

    def ssh(
        self, machine: str, command: str, *, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """``command`` on ``machine`` as the vagrant user (sudo as needed), over ssh."""
        argv = [
            "ssh",
            "-i",
            str(self.key(machine)),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "BatchMode=yes",
            f"vagrant@{self.inventory.addresses[machine]}",
            command,
        ]
        try:
            return subprocess.run(
                self._netns(argv), capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 255, "", f"ssh timed out after {timeout}s")

    def power_off(self, machine: str) -> None:
        """``virsh destroy``: the machine's power is cut (no shutdown, no flush)."""
        done = self.virsh("destroy", DOMAIN_PREFIX + machine)
        if done.returncode != 0:
            raise VagrantError(f"virsh destroy {machine}: {done.stderr.strip()}")

    def power_on(self, machine: str) -> None:
        """``virsh start``: boot the machine again (its services start at boot)."""
        done = self.virsh("start", DOMAIN_PREFIX + machine)
        if done.returncode != 0 and "already active" not in done.stderr:
            raise VagrantError(f"virsh start {machine}: {done.stderr.strip()}")

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` on the host, in the cluster's namespace (``host`` is "client")."""
        del host  # the host in the namespace is the only client there is
        started: subprocess.Popen[bytes] = subprocess.Popen(self._netns(argv), **kwargs)
        return started

    def run(self, argv: Sequence[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``argv`` on the host, in the cluster's namespace; its output."""
        return subprocess.run(
            self._netns(argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def send(
        self, count: int, *, domain: str = MAIL_DOMAIN, timeout: float = 120.0, connections: int = 1
    ) -> SendResult:
        """``count`` messages from the host to the virtual IP (``cluster.lab.client``)."""
        argv = client.command(
            self.python,
            f"{self.vip}:25",
            count,
            domain=domain,
            timeout=timeout,
            connections=connections,
        )
        try:
            done = self.run(argv, timeout=timeout + 30.0)
        except subprocess.TimeoutExpired:
            raise VagrantError(f"the client did not finish within {timeout + 30:g}s") from None
        try:
            return client.outcome(done)
        except ValueError as exc:
            raise VagrantError(f"the client failed: {exc}") from None

    # ------------------------------------------------------------------ the pair's state

    def agent_config(self) -> Path:
        """The host's copy of one of the pair's agent configurations, for ``hamta cluster`` here.

        The agent's own file names the node's paths; the copy points at a copy of the
        ZooKeeper credentials instead. Read from whichever node of the pair answers (one may
        be off).
        """
        pair = self.pair_name
        config = self.workdir / f"agent-{pair}.toml"
        if config.exists():
            return config
        files: dict[str, str] = {}
        problems = []
        for node in self.mail_nodes:
            for name in ("agent.toml", "zk-credentials", "relay.toml"):
                shown = self.ssh(node, f"sudo cat /etc/hamta/{name}")
                if shown.returncode != 0:
                    problems.append(f"{node}:/etc/hamta/{name}: {shown.stderr.strip()}")
                    break
                files[name] = shown.stdout
            else:
                break
        else:
            raise VagrantError(f"cannot read an agent configuration: {problems}")
        sections = tomllib.loads(files["agent.toml"])
        secret = self.workdir / f"zk-credentials-{pair}"
        secret.touch(mode=0o600)
        secret.write_text(files["zk-credentials"], encoding="utf-8")
        sections["agent"]["credentials"] = str(secret)
        relay = self.workdir / f"relay-{pair}.toml"
        relay.write_text(files["relay.toml"], encoding="utf-8")
        sections["agent"]["relay_config"] = str(relay)
        sections["agent"]["state_dir"] = str(self.workdir / f"agent-state-{pair}")
        config.write_text(render_toml(sections), encoding="utf-8")
        return config

    def fleet_status(self, node: str) -> dict[str, Any]:
        """``hamta fleet status --json`` on ``node`` as the fleet's reader, as an operator runs it.

        The reader's password is the one inventory-pairs made up on the first run; it reaches
        the node in a mktemp file (0600, as the command demands), removed after.
        """
        secret = (self.dotfile / "secrets" / FLEET_READER).read_text(encoding="utf-8")
        config = self.ssh(node, "sudo cat /etc/hamta/agent.toml")
        if config.returncode != 0:
            raise VagrantError(f"{node}:/etc/hamta/agent.toml: {config.stderr.strip()}")
        zookeeper = tomllib.loads(config.stdout)["agent"]["zookeeper"]
        done = self.ssh(
            node,
            f"f=$(mktemp) && printf %s '{FLEET_READER}:{secret.split()[0]}' > $f && "
            f"{HAMTA} fleet status --json --zookeeper {zookeeper} --credentials $f; "
            "s=$?; rm -f $f; exit $s",
        )
        if done.returncode != 0:
            raise VagrantError(f"hamta fleet status on {node}: {done.stderr.strip()}")
        parsed = json.loads(done.stdout)
        if not isinstance(parsed, dict):
            raise VagrantError(f"hamta fleet status on {node}: {done.stdout[:200]}")
        return parsed

    def hamta(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``hamta ARGS --config <the host's agent.toml>`` from the namespace."""
        argv = [self.python, "-m", "hamtactl", *args, "--config", str(self.agent_config())]
        try:
            return self.run(argv, timeout=timeout)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 124, "", f"timed out after {timeout}s")

    def cluster_status(self) -> dict[str, Any] | None:
        """``hamta cluster status --json`` as ZooKeeper says it now; None if it cannot."""
        done = self.hamta("cluster", "status", "--json", timeout=30.0)
        if done.returncode != 0:
            return None
        try:
            parsed = json.loads(done.stdout)
        except ValueError:
            return None
        return parsed if isinstance(parsed, dict) else None

    def active_node(self) -> str | None:
        """The one node ZooKeeper shows active, fresh, holding the VIP, its relay ready."""
        status = self.cluster_status()
        if status is None:
            return None
        active = [
            n["node"]
            for n in status.get("nodes", [])
            if n.get("role") == "active"
            and n.get("fresh")
            and n.get("vip")
            and n.get("relay_ready")
        ]
        return active[0] if len(active) == 1 else None

    def wait_active(self, timeout: float, *, other_than: str | None = None) -> str:
        """Wait until one node is active (and, with ``other_than``, not that one)."""

        def check() -> str | None:
            node = self.active_node()
            return node if node is not None and node != other_than else None

        found = wait_for(check, timeout, 0.5)
        if found is None:
            raise VagrantError(
                f"no node{' other than ' + other_than if other_than else ''} became active within "
                f"{timeout:g}s; status: {self.cluster_status()}"
            )
        return found

    def wait_passive(self, node: str, timeout: float) -> None:
        """Wait until ``node`` is back in the cluster as a fresh passive node with its relay."""

        def check() -> bool | None:
            return True if is_standby(self.cluster_status(), node) else None

        if wait_for(check, timeout, 1.0) is None:
            raise VagrantError(f"{node} was not passive within {timeout:g}s")

    def wait_ready_for_switchover(self, timeout: float) -> str:
        """Wait until the passive node may be handed the cluster; return it.

        Beyond :meth:`wait_passive`: out of its cooldown, and not marked outdated (a node that
        was powered off is until DRBD's resync has made its disk current again).
        """

        def check() -> str | None:
            status = self.cluster_status()
            if status is None:
                return None
            for member in status.get("nodes", []):
                node = str(member.get("node"))
                if (
                    is_standby(status, node)
                    and not member.get("cooldown")
                    and node not in status.get("outdated", [])
                ):
                    return node
            return None

        found = wait_for(check, timeout, 2.0)
        if found is None:
            raise VagrantError(
                f"no passive node was ready within {timeout:g}s: {self.cluster_status()}"
            )
        return found

    def agent_log(self, node: str, since_wall: float) -> list[dict[str, Any]]:
        """The agent's JSON lines on ``node`` since ``since_wall`` (from its journal)."""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(since_wall - 1.0))
        done = self.ssh(
            node, f"sudo TZ=UTC journalctl -u hamta-agent -o cat --no-pager --since '{since}'"
        )
        lines = []
        for raw in done.stdout.splitlines():
            with contextlib.suppress(ValueError):
                parsed = json.loads(raw)
                if isinstance(parsed, dict):
                    lines.append(parsed)
        return lines

    def deliveries(self) -> list[dict[str, Any]]:
        """Every message the arbiter's sink kept, as ``{"x_lab_id": ...}`` (the load's ids)."""
        done = self.ssh(
            ARBITER,
            f"sudo find {SINK_MAILDIR}/new {SINK_MAILDIR}/cur -type f "
            "-exec grep -h -m1 -i '^X-Lab-Id:' {} +",
            timeout=300.0,
        )
        if done.returncode not in (0, 1):
            raise VagrantError(f"cannot read the sink's Maildir: {done.stderr.strip()}")
        return [
            {"x_lab_id": line.split(":", 1)[1].strip()}
            for line in done.stdout.splitlines()
            if ":" in line
        ]
