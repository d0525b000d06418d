"""The failsafe protocol's I/O: asks, answers and the leases they leave, on the agent's clock.

``cluster.failsafe`` decides (whether to ask, whether to grant, how long the leases cover this
node); this keeps its inputs. While the active node's session is not connected, it asks every
peer over the peer channel at each heartbeat; each peer answers each ask with a lease or a
refusal. A lease held is counted from the ask's sending (the peer began counting later); a
refusal renews nothing, and the lease held runs out (the peer keeps its promise until then: the
peer that reconnects first after an outage must not make this node demote while its own session
comes back too). A lease granted is remembered until it has
ended and ``lease_grace`` more, for ``cluster.takeover.lease_verdict``. One log line when a
peer's answer changes, not one per ask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from cluster.decision_data import AgentState, Policy, Session, Snapshot
from cluster.failsafe import grant, should_ask
from cluster.peer_channel import Message, PeerChannel

FORMER_RUN = "(a former run)"  # the asker of the lease a restarted agent assumes it granted


class FailsafeLeases:
    """The leases this node holds from its peers and has granted them."""

    def __init__(
        self,
        *,
        channel: PeerChannel,
        policy: Policy,
        session: Callable[[], Session],
        confirmed_age: Callable[[], float | None],
        clock: Callable[[], float],
        log: Any,
        on_change: Callable[[], None],
    ) -> None:
        self.channel = channel
        self.policy = policy
        self.session = session  # kazoo's view of the session, now
        # Since the ensemble's leader last confirmed this session (None: not yet).
        self.confirmed_age = confirmed_age
        self.clock = clock
        self.log = log
        self.on_change = on_change  # a lease came or went: decide again
        self.asks: dict[int, tuple[str, float]] = {}  # an ask's sequence: (peer, sent)
        self.held: dict[str, float] = {}  # peer -> end of the lease it holds this node
        self.granted: dict[str, float] = {}  # asker -> end of the lease granted it
        if policy.failsafe:
            # A former run of this agent may have granted one just before it ended.
            self.granted[FORMER_RUN] = clock() + policy.failsafe_lease
        self.answers: dict[str, str | None] = {}  # per asker: the last answer's refusal
        self.refusals: dict[str, str | None] = {}  # per peer: why its last answer refused
        # The last decision's session: a server gone silent makes it suspended before kazoo
        # notices (``Coordinator.unanswered_view``).
        self.session_seen = Session.CONNECTED

    def saw(self, session: Session) -> None:
        """The session as the last decision saw it."""
        self.session_seen = session

    def ask(self, state: AgentState) -> None:
        """Ask every peer for a lease, if ``cluster.failsafe.should_ask`` says so."""
        now = self.clock()
        session = self.session()
        if session is Session.CONNECTED:
            session = self.session_seen
        if not self.policy.failsafe or not should_ask(
            state, session, self.confirmed_age(), self.policy
        ):
            self.asks.clear()
            return
        for peer in self.channel.peers:
            seq = self.channel.send(peer, "ask", {"epoch": state.epoch})
            if seq:
                self.asks[seq] = (peer, now)
        horizon = now - self.policy.failsafe_lease  # a lease from an older ask is over
        self.asks = {seq: ask for seq, ask in self.asks.items() if ask[1] > horizon}

    def receive(self, message: Message, state: AgentState) -> None:
        """A peer's ask or answer (other kinds are not the failsafe's)."""
        if message.kind == "ask":
            self._answer(message, state)
        elif message.kind == "answer":
            self._take(message)

    def _answer(self, ask: Message, state: AgentState) -> None:
        session, age = self.session(), self.confirmed_age()
        refusal = grant(state, session, age, self.policy)
        lease = self.policy.failsafe_lease
        body: dict[str, object]
        if refusal is None:
            until = self.clock() + lease
            self.granted[ask.node] = max(self.granted.get(ask.node, until), until)
            body = {"ask": ask.seq, "granted": True, "lease": lease}
        else:
            body = {"ask": ask.seq, "granted": False, "why": refusal}
        self.channel.send(ask.node, "answer", body)
        if ask.node not in self.answers or self.answers[ask.node] != refusal:
            self.answers[ask.node] = refusal
            self.log.warning(
                "FailsafeGranting" if refusal is None else "FailsafeRefusing",
                to=ask.node,
                lease=lease,
                why=refusal,
                session=session.value,
                confirmed_age=None if age is None else round(age, 3),
            )

    def _take(self, answer: Message) -> None:
        try:
            sent = self.asks.get(int(answer.body.get("ask", 0)))
            lease = float(answer.body.get("lease", 0.0))
        except (TypeError, ValueError):
            return  # authenticated, yet garbled: a peer of another version; no lease
        if sent is None or sent[0] != answer.node:
            return  # not an ask of ours to that peer (late, or stray)
        if answer.body.get("granted") is True:
            fresh = answer.node not in self.held
            # Counted from the ask's sending, never longer than this node's own setting.
            end = sent[1] + min(lease, self.policy.failsafe_lease)
            self.held[answer.node] = max(self.held.get(answer.node, end), end)
        else:
            # No renewal; what was granted stands (the peer keeps its promise until it ends):
            # the peer that reconnects first after an outage must not make this node demote
            # while its own session is about to come back too.
            fresh = self.refusals.get(answer.node) != answer.body.get("why")
            if fresh:
                self.log.warning("FailsafeRefused", by=answer.node, why=answer.body.get("why"))
        self.refusals[answer.node] = (
            None if answer.body.get("granted") is True else str(answer.body.get("why"))
        )
        if fresh:
            self.on_change()

    def view(self, snapshot: Snapshot) -> Snapshot:
        """``snapshot`` with the leases as they stand now (those long over forgotten)."""
        now = self.clock()
        grace = self.policy.lease_grace
        self.held = {peer: end for peer, end in self.held.items() if end > now}
        self.granted = {node: end for node, end in self.granted.items() if end + grace > now}
        return replace(
            snapshot,
            failsafe_held=tuple(sorted(self.held.items())),
            failsafe_granted=tuple(sorted(self.granted.items())),
        )
