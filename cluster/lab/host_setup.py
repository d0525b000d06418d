"""What the lab makes on the host and takes away: namespaces, bridge, veths, disk, credentials.

``up`` checks that the lab's names are free, clears the previous run's files, builds the network
(a switch namespace with the bridge, one namespace per host plugged into it), the shared disk (an
ext4 filesystem on a loop device) and the ZooKeeper credentials. ``down`` ends every process of
the lab (agents first, so that the active one can demote while ZooKeeper still serves), detaches
the loop device and deletes the namespaces. Nothing outside the lab's own namespaces is touched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Final

from cluster.lab import loopdev, netns, processes, record
from cluster.lab.record import LabRecord
from cluster.lab.site import AGENT_PREFIX, LabError, LabSite
from cluster.lab.topology import BRIDGE, INTERFACE, PAIR_CLUSTER, Topology, TopologyError
from cluster.peer_channel import write_secret

CREDENTIALS_USER: Final = "hamta"
AGENT_GRACE: Final = 15.0  # an agent stopping demotes first: drain, VIP down, unmount
SERVICE_GRACE: Final = 5.0
STRAY_GRACE: Final = 2.0
# The files and directories one run of the lab writes into its directory; ``up`` removes those
# of the previous run (and nothing else), ``down`` keeps them for their logs.
# (With the per-pair files of LabSite.run_files.)
_RUN_FILES: Final = ("zookeeper", "inet")


class HostSetup:
    """The lab's footprint on the host: built by ``up`` step by step, removed by ``down``."""

    def __init__(self, site: LabSite) -> None:
        self._site = site

    def check_free(self) -> None:
        """LabError if a lab is up in this directory, or the lab's namespaces exist already."""
        site = self._site
        try:
            existing = record.load(site.directory)
        except ValueError:
            existing = None
        if existing is not None:
            raise LabError(
                f"a lab is already up in {site.directory} (prefix {existing.prefix}); "
                f"take it down first: hamta lab down --dir {site.directory}"
            )
        taken = [name for name in site.topology.namespaces if netns.exists(name)]
        if taken:
            raise LabError(
                f"network namespaces {', '.join(taken)} exist already (a lab with prefix "
                f"{site.topology.prefix} elsewhere?); take it down, or use another --prefix and "
                "--subnet"
            )

    def prepare_directory(self) -> None:
        """Create the lab's directory and remove what the previous run wrote there."""
        directory = self._site.directory
        directory.mkdir(parents=True, exist_ok=True)
        for name in (*_RUN_FILES, *self._site.run_files):
            path = directory / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def record_new_lab(self) -> None:
        """Write the lab's first ``lab.json``: before anything is built, so ``down`` finds it."""
        site = self._site
        topology = site.topology
        site.save(
            LabRecord(
                directory=str(site.directory),
                prefix=topology.prefix,
                subnet=str(topology.subnet),
                python=site.python,
                image=str(site.image_path),
                credentials=str(site.credentials_path),
                zookeeper=topology.zookeeper_hosts,
                vip=str(topology.vip),
                addresses={host: str(topology.interface(host)) for host in topology.hosts},
                pairs=topology.pairs,
            )
        )

    def build_network(self) -> None:
        """The namespaces, the bridge in the switch namespace, and each host's veth on it."""
        topology = self._site.topology
        try:
            for name in topology.namespaces:
                netns.create(name)
            netns.add_bridge(topology.switch, BRIDGE)
            for host in topology.hosts:
                netns.plug(
                    topology.switch,
                    BRIDGE,
                    host,
                    topology.namespace(host),
                    INTERFACE,
                    topology.interface(host),
                )
        except netns.NetnsError as exc:
            raise LabError(f"cannot build the lab's network: {exc}") from None

    def build_disk(self) -> None:
        """Each pair's shared disk: a sparse image on a loop device (recorded), formatted ext4."""
        site = self._site
        try:
            for pair in site.topology.pair_names:
                image = site.pair_image(pair)
                loopdev.create_image(image)
                device = loopdev.attach(image)
                found = site.current_record()
                if pair == PAIR_CLUSTER:
                    site.save(replace(found, loop_device=device))
                else:
                    devices = {**found.pair_devices, pair: device}
                    site.save(replace(found, pair_devices=devices))
                loopdev.make_ext4(device, ("spool",))
        except (loopdev.LoopError, OSError) as exc:
            raise LabError(f"cannot build the shared disk: {exc}") from None

    def write_credentials(self) -> None:
        """A fresh ZooKeeper digest password and peer channel secret, readable by root only;
        one of each per pair, and with several pairs the administrator's and fleet reader's."""
        site = self._site
        for pair in site.topology.pair_names:
            # Each pair its own digest user: its agents can neither read nor change another's.
            user = CREDENTIALS_USER if pair == PAIR_CLUSTER else f"{CREDENTIALS_USER}-{pair}"
            _write_password(site.pair_credentials(pair), user)
            # The agents' peer channel secret: a fresh one for every lab (``prepare_directory``
            # removed the last one), mode 0600.
            write_secret(site.pair_peer_secret(pair))
        if site.topology.pairs > 1:
            _write_password(site.admin_credentials_path, "hamta-admin")
            _write_password(site.reader_credentials_path, "hamta-fleet")

    def recorded_topology(self, found: LabRecord | None) -> Topology:
        """The topology the record names (a lab may be taken down by another ``Lab``)."""
        if found is not None:
            with contextlib.suppress(TopologyError):
                return Topology.build(found.prefix, found.subnet, found.pairs)
        return self._site.topology

    def end_processes(self, found: LabRecord | None, topology: Topology) -> dict[str, list[int]]:
        """End the recorded processes, agents first, then strays; return those that stay."""
        recorded = processes.live(found.processes) if found is not None else []
        agents = [p.pid for p in recorded if p.name.startswith(AGENT_PREFIX)]
        processes.end(agents, AGENT_GRACE)
        others = [p.pid for p in recorded if not p.name.startswith(AGENT_PREFIX)]
        processes.end(others, SERVICE_GRACE)
        stray = [pid for pids in netns.pids_in(topology.namespaces).values() for pid in pids]
        processes.end(stray, STRAY_GRACE)
        return {name: pids for name, pids in netns.pids_in(topology.namespaces).items() if pids}

    def remove(
        self, found: LabRecord | None, topology: Topology, left: dict[str, list[int]]
    ) -> list[str]:
        """Detach the disk, delete the namespaces (those in ``left`` kept); what went wrong.

        With nothing wrong, the image and the record go too: the lab is down.
        """
        problems = [f"processes {pids} in {name} would not exit" for name, pids in left.items()]
        image = Path(found.image) if found is not None else self._site.image_path
        devices = [found.loop_device] if found is not None and found.loop_device else []
        try:
            loopdev.detach([*devices, *loopdev.attached_to(image)], image)
        except loopdev.LoopError as exc:
            problems.append(str(exc))
        # The other pairs' disks: by the record, and by name (a lab whose record is gone).
        recorded = found.pair_devices if found is not None else {}
        pairs = {*recorded, *(p for p in topology.pair_names if p != PAIR_CLUSTER)}
        extra = {self._site.directory / f"spool-{p}.img": recorded.get(p, "") for p in pairs}
        for pair_image, device in extra.items():
            try:
                found_devices = [device] if device else []
                loopdev.detach([*found_devices, *loopdev.attached_to(pair_image)], pair_image)
            except loopdev.LoopError as exc:
                problems.append(str(exc))
        for name in topology.namespaces:
            if name in left:  # kept, so that its processes can still be found by it
                continue
            try:
                netns.remove(name)
            except netns.NetnsError as exc:
                problems.append(str(exc))
        if not problems:
            image.unlink(missing_ok=True)
            for pair_image in extra:
                pair_image.unlink(missing_ok=True)
            record.remove(self._site.directory)
        return problems


def _write_password(path: Path, user: str) -> None:
    """``user:<fresh password>`` into ``path``, mode 0600."""
    password = secrets.token_urlsafe(18)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(f"{user}:{password}\n")
    os.chmod(path, 0o600)  # whatever the umask, or a file that was there before
