"""The thin I/O layer under ``cluster.state``: it runs one step at a time, each with a time limit.

Every step is idempotent, so that a promotion that failed half-way can be rolled back by running
the whole demotion, and a demotion step that failed can simply be run again. Blocking calls
(kazoo, mount, netlink) run in a worker thread; the relay is driven over its control socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from cluster.coordination import Coordinator
from cluster.coordination_layout import CoordinationError
from cluster.decision_data import Action, Session, Step, StepResult
from cluster.fast_fence import FastFence
from cluster.fencers import FenceFailedError, Fencer
from cluster.hooks import HookRefusedError, Hooks, RoleChange
from cluster.probe import smtp_probe
from cluster.relayproc import RelayControlError, RelayProcess
from cluster.storage import Storage, StorageError
from cluster.vip import VipError, VipSet, VirtualIp
from hamta.epoch_token import TOKEN_FILE, TokenError, write_token
from hamta.privileges import Identity, give_tree

T = TypeVar("T")


class StepError(Exception):
    """A step could not be done; the message says why, for the decision log."""


class Executor:
    """Runs a decision's actions and turns their outcomes into ``StepResult``s."""

    def __init__(
        self,
        *,
        node: str,
        coordinator: Coordinator,
        storage: Storage,
        spool_name: str,
        vip: VirtualIp | VipSet | None,  # with the relay's egress addresses, a VipSet
        relay: RelayProcess,
        fencer: Fencer,
        probe_address: tuple[str, int],
        probe_timeout: float,
        spool_owner: Identity | None = None,
        hooks: Hooks | None = None,
        fast_fence: FastFence | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.coordinator = coordinator
        self.storage = storage
        self.spool_name = spool_name
        self.vip = vip
        self.relay = relay
        self.fencer = fencer
        self.probe_address = probe_address
        self.probe_timeout = probe_timeout
        # The relay's user (hamta.privileges), when it is not the agent's own: the spool on the
        # promoted volume is made that user's, or the relay could not write it.
        self.spool_owner = spool_owner
        self.hooks = hooks
        # DRBD only: the mark and marker its fast fence-peer handler answers from (fast_fence).
        self.fast_fence = fast_fence
        self.clock = clock
        self.wall = wall
        self._steps: dict[Step, Callable[[Action], Awaitable[str | int]]] = {
            Step.ACQUIRE: self._acquire,
            Step.FENCE: self._fence,
            Step.STORAGE: self._storage,
            Step.EPOCH: self._epoch,
            Step.VIP: self._vip,
            Step.RELAY: self._relay,
            Step.PROBE: self._probe,
            Step.PUBLISH: self._publish,
            Step.DRAIN: self._drain,
            Step.VIP_DOWN: self._vip_down,
            Step.STORAGE_DOWN: self._storage_down,
            Step.RELEASE: self._release,
            Step.START_RELAY: self._start_relay,
            Step.RESTART_RELAY: self._restart_relay,
            Step.PRE_PROMOTE: self._pre_promote,
        }
        self._mounted: Path | None = None
        self._fenced: tuple[int, tuple[str, ...]] = (0, ())  # the last FENCE: epoch, nodes
        # A step abandoned for safety leaves its thread running (a mount cannot be interrupted);
        # the next step on the same resource waits for it instead of racing it.
        self._storage_lock = threading.Lock()
        self._vip_lock = threading.Lock()

    @staticmethod
    def _locked(lock: threading.Lock, work: Callable[[], T]) -> Callable[[], T]:
        def locked() -> T:
            with lock:
                return work()

        return locked

    async def run(self, action: Action) -> StepResult:
        """Run one action within its time limit; never raises."""
        started = self.clock()
        epoch = 0
        try:
            async with asyncio.timeout(action.timeout):
                outcome = await self._steps[action.step](action)
            if isinstance(outcome, int):
                epoch, detail = outcome, f"epoch {outcome}"
            else:
                detail = outcome
            ok = True
        except TimeoutError:
            ok, detail = False, f"no result within {action.timeout:g}s"
        except (
            StepError,
            HookRefusedError,
            FenceFailedError,
            StorageError,
            VipError,
            RelayControlError,
            OSError,
        ) as exc:
            ok, detail = False, str(exc)
        except Exception as exc:  # a bug must still be reported as a failed step, not hang it
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        return StepResult(action.step, ok, self.clock() - started, detail, epoch)

    # ------------------------------------------------------------ promotion

    async def _acquire(self, action: Action) -> int:
        stale = action.stale_leader
        epoch = await asyncio.to_thread(self.coordinator.acquire_leadership, stale)
        if epoch is None:
            if stale is not None:
                raise StepError(f"the leader znode is no longer {stale[0]}'s in epoch {stale[1]}")
            raise StepError("another node holds leadership or took the epoch first")
        if self.fast_fence is not None:
            # Makes the markers of earlier terms stale; if it fails they stay so (other term).
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.fast_fence.enter_term, epoch)
        return epoch

    async def _fence(self, action: Action) -> str:
        budget = action.fence_timeout
        done = [await self.fencer.fence(peer, action.epoch, budget) for peer in action.fence]
        # What this term fenced, for DRBD's fast fence-peer path in the storage step: with the
        # fast path's fence, made before ACQUIRE in the same takeover (the Vagrant fleet's DRBD
        # waited 22-24 s for the full handler when it was left out).
        self._fenced = (action.epoch, action.fenced + action.fence)
        if done:
            return "; ".join(done)
        if action.fenced:
            return f"{', '.join(action.fenced)} fenced before leadership was taken"
        return "no peer to fence: every other node is connected and holds nothing"

    async def _pre_promote(self, action: Action) -> str:
        if self.hooks is None:
            return "no hooks"
        vip = self.vip.address if self.vip is not None else ""
        change = RoleChange(self.node, "passive", "active", action.epoch, vip, action.reason)
        return await self.hooks.pre_promote(change)

    def spool_path(self, root: Path) -> Path:
        """The relay's spool directory on the promoted storage."""
        return root / self.spool_name

    async def _storage(self, action: Action) -> str:
        # Whether this replica may be served was decided on a view read after ACQUIRE
        # (cluster.state.refine: REPLICA_REFUSED).
        armed = ""
        if self.fast_fence is not None:
            armed = await self._arm_fast_fence(self.fast_fence, action.epoch)
        try:
            root = await asyncio.to_thread(self._locked(self._storage_lock, self.storage.promote))
        finally:
            if self.fast_fence is not None:
                await asyncio.to_thread(self.fast_fence.disarm)
        self._mounted = root
        spool = self.spool_path(root)
        owner = self.spool_owner
        if owner is None:
            await asyncio.to_thread(spool.mkdir, parents=True, exist_ok=True)
            return f"{self.storage.describe()} at {root}{armed}"
        # One stat once the spool is the relay's; a walk only the first time (an older spool).
        try:
            changed = await asyncio.to_thread(give_tree, spool, owner)
        except OSError as exc:
            raise StepError(f"cannot give {spool} to {owner.user}: {exc}") from None
        handed = f", {changed} entries given to {owner.user}" if changed else ""
        return f"{self.storage.describe()} at {root}{handed}{armed}"

    async def _arm_fast_fence(self, fast_fence: FastFence, epoch: int) -> str:
        """The mark and the marker DRBD's fast handler answers from, durable before ``primary``.

        Only for the peers this term fenced; a failure costs speed, never the step: without a
        marker DRBD's handler asks ZooKeeper itself.
        """
        fenced_epoch, peers = self._fenced
        try:
            done = await asyncio.to_thread(
                fast_fence.arm, epoch, peers if fenced_epoch == epoch else ()
            )
        except (StorageError, OSError) as exc:
            done = f"fast fence-peer path unused: {exc}"
        return f"; {done}"

    async def _epoch(self, action: Action) -> str:
        if self._mounted is None:
            raise StepError("storage is not promoted")
        try:
            path = await asyncio.to_thread(write_token, self._mounted, action.epoch)
        except TokenError as exc:
            raise StepError(str(exc)) from None
        return f"epoch {action.epoch} written to {path}"

    async def _vip(self, action: Action) -> str:
        if self.vip is None:
            return "no virtual IP configured"
        await asyncio.to_thread(self._locked(self._vip_lock, self.vip.add))
        return self.vip.describe()

    async def _relay(self, action: Action) -> str:
        if self._mounted is None:
            raise StepError("storage is not promoted")
        if not self.relay.running:
            await self.relay.start(action.timeout)
        reply = await self._activate(self._mounted, action)
        recovered = reply.get("recovered_messages", "?")
        return f"relay active, {recovered} messages recovered"

    async def _activate(self, root: Path, action: Action) -> dict[str, Any]:
        """Activate the relay on the spool under ``root`` for the action's term."""
        return await self.relay.activate(
            self.spool_path(root), action.timeout, epoch=action.epoch, token=root / TOKEN_FILE
        )

    async def _probe(self, action: Action) -> str:
        host, port = self.probe_address
        result = await smtp_probe(host, port, timeout=min(action.timeout, self.probe_timeout))
        if not result.ok:
            raise StepError(f"SMTP probe of {host}:{port}: {result.detail}")
        return f"SMTP probe of {host}:{port} ok in {result.seconds * 1000:.0f} ms"

    async def _publish(self, action: Action) -> str:
        still = await asyncio.to_thread(self.coordinator.still_leader, action.epoch)
        if not still:
            raise StepError(f"leadership of epoch {action.epoch} lost before publishing")
        record: dict[str, Any] = {
            "epoch": action.epoch,
            "node": self.node,
            "previous": action.peer,
            "reason": action.reason,
            "at": self.wall(),
            "steps": {step.value: seconds for step, seconds in action.steps},
            "total": round(sum(seconds for _, seconds in action.steps), 4),
        }
        # The bookkeeping does not decide the promotion: only leadership does.
        notes = []
        try:
            # From now on this takeover is the one the anti-flapping interval counts from.
            if not await asyncio.to_thread(self.coordinator.mark_served, action.epoch):
                notes.append("not marked serving: a newer epoch was taken")
        except CoordinationError as exc:
            notes.append(f"not marked serving: {exc}")
        try:
            await asyncio.to_thread(self.coordinator.record_failover, record)
        except CoordinationError as exc:
            notes.append(f"history not written: {exc}")
        try:
            view = await asyncio.to_thread(self.coordinator.view)
            if view.switchover is not None:
                await asyncio.to_thread(self.coordinator.clear_switchover)
            scheduled = view.scheduled_switchover
            if scheduled is not None and self.wall() >= scheduled.due:  # carried out: done
                await asyncio.to_thread(self.coordinator.cancel_scheduled_switchover)
        except CoordinationError as exc:
            notes.append(f"switchover request not cleared: {exc}")
        return "; ".join([f"active in epoch {action.epoch}", *notes])

    # ------------------------------------------------------------ demotion

    async def _drain(self, action: Action) -> str:
        if not self.relay.running:
            return "relay not running"
        # The relay gets most of the step's time to finish gracefully (the Action says how
        # much); whatever is left is for killing it. It must stop serving whatever happens, so
        # this step never fails.
        graceful = action.graceful_timeout
        try:
            async with asyncio.timeout(graceful):
                await self.relay.deactivate(action.deliveries_timeout)
            return "relay drained and back in standby"
        except (RelayControlError, TimeoutError) as exc:
            await self.relay.kill()
            why = str(exc) or f"no graceful stop within {graceful:.1f}s"
            return f"relay killed: {why}"

    async def _vip_down(self, action: Action) -> str:
        if self.vip is None:
            return "no virtual IP configured"
        await asyncio.to_thread(self._locked(self._vip_lock, self.vip.remove))
        return f"{self.vip.describe()} removed"

    async def _storage_down(self, action: Action) -> str:
        await asyncio.to_thread(self._locked(self._storage_lock, self.storage.release))
        self._mounted = None
        return f"{self.storage.describe()} released"

    async def _release(self, action: Action) -> str:
        session = self.coordinator.session
        if session is Session.LOST:
            return "session lost: its leader znode went with it"
        if session is not Session.CONNECTED:
            raise StepError("not connected to ZooKeeper")
        await asyncio.to_thread(self.coordinator.release_leadership, action.epoch)
        return f"leadership of epoch {action.epoch} released"

    # ------------------------------------------------------------ the relay

    async def _start_relay(self, action: Action) -> str:
        await self.relay.start(action.timeout)
        return f"warm relay started (pid {self.relay.pid})"

    async def _restart_relay(self, action: Action) -> str:
        await self.relay.kill()
        await self.relay.start(action.timeout)
        if self._mounted is None:
            raise StepError("storage is not promoted")
        reply = await self._activate(self._mounted, action)
        return f"relay restarted, {reply.get('recovered_messages', '?')} messages recovered"
