"""The agent's HTTP API (Patroni-style), for load balancers, monitoring and automation.

``GET /active`` answers 200 only on the node that serves (HAProxy's ``option httpchk``),
``/passive``, ``/health`` (the decision loop turns), ``/cluster`` (``hamta cluster status
--json``), ``/history``; ``POST /switchover`` (now, or ``scheduled_at``: 202), ``DELETE
/switchover``, ``POST /pause``, ``POST /resume``. Reads of the cluster and every change go
through ``cluster.operator``, the code of the ``hamta cluster`` command, with a ZooKeeper
session of their own; ``/active``, ``/passive`` and ``/health`` read only this agent's state,
so that a load balancer's checks cost nothing and never wait on ZooKeeper. Who may do what is
``cluster.api_auth``'s; every refusal and every change is one JSON line with the caller's
address.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from cluster.api_auth import Access, Caller, Verdict
from cluster.api_status import NodeStatus
from cluster.config import AgentConfig
from cluster.coordination import Coordinator
from cluster.coordination_layout import CoordinationError
from cluster.decision_data import Role
from cluster.operator import (
    OperatorError,
    cancel_switchover,
    cluster_status,
    operator_session,
    parse_time,
    pause_failover,
    resume_failover,
    schedule_switchover,
    switchover,
)
from hamta.admin_guard import HostCheck
from hamta.config import parse_hostport

Handler = Callable[[web.Request], Any]

#: Who made a request, as the change's log line and a pause's record name them.
CALLER = web.RequestKey("caller", str)

#: How long an immediate switchover asked over HTTP may take before it is withdrawn.
SWITCHOVER_TIMEOUT = 30.0


class BadRequestError(Exception):
    """The request's input is wrong; the message says how (400)."""


def ssl_context(config: AgentConfig) -> ssl.SSLContext | None:
    """TLS for the API when ``api.tls_cert`` is set; client certificates with ``client_ca``."""
    api = config.api
    if api.tls_cert is None or api.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(api.tls_cert, api.tls_key)
    if api.client_ca is not None:
        context.load_verify_locations(api.client_ca)
        # Optional: reads from the read networks need none; a certificate sent must verify.
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class AgentApi:
    """The API's routes and its server, built once by the agent."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        access: Access,
        status: Callable[[], NodeStatus],
        coordinator: Coordinator,
        log: Any,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.access = access
        self.status = status
        self.coordinator = coordinator
        self.log = log
        self.wall = wall
        self.alive_within = max(5.0, 10 * config.agent.health_interval)
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------ serving

    def app(self) -> web.Application:
        """The aiohttp application (its routes and the two checks before them)."""
        host_check = HostCheck(self.config.api.listen, ())
        app = web.Application(middlewares=[host_check.middleware, self._guard])
        app.router.add_get("/health", self._health)
        app.router.add_get("/active", self._active)
        app.router.add_get("/passive", self._passive)
        app.router.add_get("/cluster", self._cluster)
        app.router.add_get("/history", self._history)
        app.router.add_post("/switchover", self._switchover)
        app.router.add_delete("/switchover", self._cancel)
        app.router.add_post("/pause", self._pause)
        app.router.add_post("/resume", self._resume)
        return app

    async def start(self) -> None:
        """Listen on ``api.listen``; OSError when the address cannot be bound."""
        host, port = parse_hostport(self.config.api.listen)
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context(self.config))
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.log.info("ApiListening", url=self.config.api.url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------ access

    @staticmethod
    def _caller(request: web.Request) -> Caller:
        transport = request.transport
        certificate = bool(transport.get_extra_info("peercert")) if transport else False
        return Caller(request.remote or "", request.headers.get("Authorization"), certificate)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        caller = self._caller(request)
        changes = request.method not in ("GET", "HEAD")
        verdict, why = self.access.judge(caller, changes=changes)
        if verdict is Verdict.ALLOWED:
            request[CALLER] = f"api {caller.address} ({why})"
            response: web.StreamResponse = await handler(request)
            return response
        status = 401 if verdict is Verdict.UNAUTHENTICATED else 403
        self.log.warning(
            "ApiRefused",
            status=status,
            remote=caller.address,
            method=request.method,
            path=request.path,
            why=why,
        )
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return web.json_response({"error": why}, status=status, headers=headers)

    # ------------------------------------------------------------ this node

    async def _health(self, request: web.Request) -> web.Response:
        status = self.status()
        alive = status.loop_age <= self.alive_within
        body = {**status.as_json(), "alive": alive, "loop_age_s": round(status.loop_age, 3)}
        return web.json_response(body, status=200 if alive else 503)

    async def _active(self, request: web.Request) -> web.Response:
        status = self.status()
        return web.json_response(status.as_json(), status=200 if status.serving else 503)

    async def _passive(self, request: web.Request) -> web.Response:
        status = self.status()
        passive = status.role is Role.PASSIVE
        return web.json_response(status.as_json(), status=200 if passive else 503)

    # ------------------------------------------------------------ the cluster

    async def _cluster(self, request: web.Request) -> web.Response:
        try:
            body = await asyncio.to_thread(cluster_status, self.coordinator, self.config)
        except (OperatorError, CoordinationError) as exc:
            return web.json_response({"error": str(exc)}, status=503)
        return web.json_response(body)

    async def _history(self, request: web.Request) -> web.Response:
        text = request.query.get("last", "20")
        if not text.isdigit():
            return web.json_response({"error": "last must be a whole number"}, status=400)
        try:
            history = await asyncio.to_thread(self.coordinator.history)
        except CoordinationError as exc:
            return web.json_response({"error": str(exc)}, status=503)
        last = int(text)
        return web.json_response(history[-last:] if last else [])

    # ------------------------------------------------------------ changes

    async def _body(self, request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise BadRequestError("the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise BadRequestError("the body must be a JSON object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise BadRequestError(
                f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
            )
        for key, value in body.items():
            if value is not None and not isinstance(value, str):
                raise BadRequestError(f"{key} must be a string")
        return body

    async def _change(
        self, request: web.Request, action: str, work: Callable[[], Any], status: int = 200
    ) -> web.Response:
        """Run ``work`` (blocking: cluster.operator) in a thread; one log line either way."""
        caller = request[CALLER]
        try:
            result = await asyncio.to_thread(work)
        except (BadRequestError, OperatorError, CoordinationError) as exc:
            # Bad input, a refusal the command line would give too, or ZooKeeper away.
            failed = 400 if isinstance(exc, BadRequestError) else 409
            failed = 503 if isinstance(exc, CoordinationError) else failed
            self.log.warning(
                "ApiChange", action=action, caller=caller, status=failed, error=str(exc)
            )
            return web.json_response({"error": str(exc)}, status=failed)
        self.log.info("ApiChange", action=action, caller=caller, status=status, result=result)
        return web.json_response(result, status=status)

    async def _switchover(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request, frozenset({"target", "scheduled_at"}))
            target = body.get("target") or None
            due = None
            if body.get("scheduled_at"):
                due = parse_time(body["scheduled_at"], self.wall())
        except (BadRequestError, OperatorError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        config, caller = self.config, request[CALLER]
        if due is not None:
            when: float = due

            def schedule() -> dict[str, Any]:
                with operator_session(config) as session:
                    return schedule_switchover(session.coordinator, target, when, caller)

            return await self._change(request, "schedule switchover", schedule, status=202)

        def now() -> dict[str, Any]:
            agent = config.agent
            with operator_session(config) as session:
                return switchover(
                    session, target, agent.heartbeat, SWITCHOVER_TIMEOUT, agent.switchover_timeout
                )

        return await self._change(request, "switchover", now)

    async def _cancel(self, request: web.Request) -> web.Response:
        config = self.config

        def cancel() -> dict[str, Any]:
            with operator_session(config) as session:
                if not cancel_switchover(session.coordinator):
                    raise OperatorError("no switchover is scheduled")
                return {"cancelled": True}

        response = await self._change(request, "cancel switchover", cancel)
        if response.status == 409:  # nothing to cancel
            response.set_status(404)
        return response

    async def _pause(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request, frozenset({"reason"}))
        except BadRequestError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        reason = (body.get("reason") or "").strip()
        if not reason:
            return web.json_response(
                {"error": 'give a reason: {"reason": "..."}, for the record'}, status=400
            )
        config, caller = self.config, request[CALLER]

        def pause() -> dict[str, Any]:
            with operator_session(config) as session:
                return {"message": pause_failover(session.coordinator, caller, reason)}

        return await self._change(request, "pause", pause)

    async def _resume(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request, frozenset({"reason"}))
        except BadRequestError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        config = self.config

        def resume() -> dict[str, Any]:
            with operator_session(config) as session:
                return {"message": resume_failover(session.coordinator), **body}

        return await self._change(request, "resume", resume)
