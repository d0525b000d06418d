"""The agent's HTTP API over real HTTP, against a real ZooKeeper: what a load balancer checks,
who may read and change, and changes made through cluster.operator as the CLI makes them."""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from cluster.api import AgentApi
from cluster.api_auth import Access, ApiAuthError, load_token
from cluster.api_status import NodeStatus
from cluster.config import AgentConfig, parse_agent_config
from cluster.coordination import Coordinator
from cluster.decision_data import Member, Role, Step
from cluster.zookeeper import ZooKeeperEnsemble
from hamta.config import ConfigError
from hamta.eventlog import get_logger
from tests.support.ports import free_port
from tests.support.tls import make_self_signed

SERVING = NodeStatus("alpha", Role.ACTIVE, 3, None, True, 0.1)


def agent_config(tmp_path: Path, zookeeper: str, cluster: str, api: dict[str, Any]) -> AgentConfig:
    lines = [
        "[agent]",
        'node = "alpha"',
        f'cluster = "{cluster}"',
        f'zookeeper = "{zookeeper}"',
        f'relay_config = "{tmp_path / "relay.toml"}"',
        "[storage]",
        f'path = "{tmp_path / "spool"}"',
        "[api]",
        *(f"{key} = {json.dumps(value)}" for key, value in api.items()),
    ]
    return parse_agent_config("\n".join(lines))


class Server:
    """An AgentApi listening on loopback, and the status it reports (tests change it)."""

    def __init__(self, config: AgentConfig, access: Access, coordinator: Coordinator) -> None:
        self.status = SERVING
        self.api = AgentApi(
            config=config,
            access=access,
            status=lambda: self.status,
            coordinator=coordinator,
            log=get_logger(component="agent"),
        )
        self.url = config.api.url


@pytest.fixture
def leader(zookeeper: ZooKeeperEnsemble) -> Iterator[Callable[[str], Coordinator]]:
    """An agent's session that leads a fresh cluster and publishes its member record."""
    started: list[Coordinator] = []

    def make(cluster: str) -> Coordinator:
        coordinator = Coordinator(zookeeper.hosts, cluster, "alpha", session_timeout=4.0)
        coordinator.start(10.0)
        started.append(coordinator)
        assert coordinator.acquire_leadership() == 1
        member = Member("alpha", Role.ACTIVE, 1, True, True, api="http://127.0.0.1:1")
        coordinator.publish_member(member)
        return coordinator

    yield make
    for coordinator in started:
        coordinator.stop()


TOKEN = secrets.token_hex(16)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "api.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


async def serve(server: Server) -> AsyncIterator[Server]:
    await server.api.start()
    try:
        yield server
    finally:
        await server.api.stop()


def run(work: Callable[[], Any]) -> Any:
    return asyncio.run(work())


async def call(
    method: str,
    url: str,
    *,
    token: str | None = None,
    body: Any = None,
    raw: bytes | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, url, headers=headers, data=data, ssl=ssl_context or True
        ) as response,
    ):
        return response.status, await response.json()


def make_server(
    tmp_path: Path,
    zookeeper: ZooKeeperEnsemble,
    leader: Callable[[str], Coordinator],
    name: str,
    **api: Any,
) -> Server:
    coordinator = leader(name)
    config = agent_config(
        tmp_path, zookeeper.hosts, name, {"listen": f"127.0.0.1:{free_port()}", **api}
    )
    token = load_token(config.api.token_file) if config.api.token_file else None
    access = Access(config.api.read_networks, token, config.api.client_ca is not None)
    return Server(config, access, coordinator)


def test_a_load_balancer_sees_only_the_serving_node_as_active(
    tmp_path: Path, zookeeper: ZooKeeperEnsemble, leader: Callable[[str], Coordinator]
) -> None:
    server = make_server(tmp_path, zookeeper, leader, "api-checks")

    async def main() -> list[int]:
        statuses = []
        await server.api.start()
        try:
            for status in (
                SERVING,
                replace(SERVING, step=Step.DRAIN),  # handing over: send nobody
                replace(SERVING, relay_ready=False),
                replace(SERVING, role=Role.PASSIVE, epoch=0),
            ):
                server.status = status
                for path in ("/active", "/passive"):
                    statuses.append((await call("GET", server.url + path))[0])
            server.status = replace(SERVING, loop_age=60.0)  # the decision loop is stuck
            statuses.append((await call("GET", server.url + "/health"))[0])
            server.status = SERVING
            statuses.append((await call("GET", server.url + "/health"))[0])
        finally:
            await server.api.stop()
        return statuses

    assert run(main) == [200, 503, 503, 503, 503, 503, 503, 200, 503, 200]


def test_cluster_and_history_are_the_cli_s_json_with_each_node_s_api(
    tmp_path: Path, zookeeper: ZooKeeperEnsemble, leader: Callable[[str], Coordinator]
) -> None:
    server = make_server(tmp_path, zookeeper, leader, "api-reads")

    async def main() -> tuple[Any, ...]:
        await server.api.start()
        try:
            cluster = await call("GET", server.url + "/cluster")
            history = await call("GET", server.url + "/history?last=5")
            bad = await call("GET", server.url + "/history?last=many")
        finally:
            await server.api.stop()
        return cluster, history, bad

    (status, cluster), history, bad = run(main)
    assert status == 200
    assert cluster["leader"] == "alpha" and cluster["cluster"] == "api-reads"
    assert [node["api"] for node in cluster["nodes"]] == ["http://127.0.0.1:1"]
    assert cluster["scheduled_switchover"] is None
    assert history == (200, [])
    assert bad == (400, {"error": "last must be a whole number"})


def test_reads_outside_the_read_networks_and_every_change_need_credentials(
    tmp_path: Path,
    zookeeper: ZooKeeperEnsemble,
    leader: Callable[[str], Coordinator],
    token_file: Path,
) -> None:
    server = make_server(
        tmp_path,
        zookeeper,
        leader,
        "api-access",
        read_networks=["10.0.0.0/8"],
        token_file=str(token_file),
    )

    async def main() -> list[tuple[int, Any]]:
        url = server.url
        await server.api.start()
        try:
            return [
                await call("GET", url + "/active"),  # loopback is not a read network here
                await call("GET", url + "/active", token=TOKEN),
                await call("POST", url + "/pause", body={"reason": "x"}),
                await call("POST", url + "/pause", body={"reason": "x"}, token="wrong"),
                await call("DELETE", url + "/switchover", token="wrong"),
            ]
        finally:
            await server.api.stop()

    with capture_logs() as logs:
        answers = run(main)
    assert [status for status, _ in answers] == [401, 200, 401, 403, 403]
    assert answers[2][1] == {"error": "a change needs a bearer token or a client certificate"}
    refused = [entry for entry in logs if entry["event"] == "ApiRefused"]
    assert [(entry["status"], entry["path"]) for entry in refused] == [
        (401, "/active"),
        (401, "/pause"),
        (403, "/pause"),
        (403, "/switchover"),
    ]
    assert all(entry["remote"] == "127.0.0.1" for entry in refused)


def test_pause_resume_and_a_scheduled_switchover_go_to_zookeeper(
    tmp_path: Path,
    zookeeper: ZooKeeperEnsemble,
    leader: Callable[[str], Coordinator],
    token_file: Path,
) -> None:
    server = make_server(tmp_path, zookeeper, leader, "api-changes", token_file=str(token_file))
    coordinator = server.api.coordinator

    async def main() -> dict[str, Any]:
        url = server.url
        seen: dict[str, Any] = {}
        await server.api.start()
        try:
            seen["no reason"] = await call("POST", url + "/pause", token=TOKEN)
            seen["not json"] = await call("POST", url + "/pause", token=TOKEN, raw=b"{")
            seen["unknown"] = await call("POST", url + "/pause", token=TOKEN, body={"why": "x"})
            seen["pause"] = await call("POST", url + "/pause", token=TOKEN, body={"reason": "fw"})
            seen["paused"] = await asyncio.to_thread(coordinator.view)
            seen["resume"] = await call("POST", url + "/resume", token=TOKEN, body={})
            seen["resumed"] = await asyncio.to_thread(coordinator.view)
            seen["past"] = await call(
                "POST", url + "/switchover", token=TOKEN, body={"scheduled_at": "2001-01-01T00:00Z"}
            )
            seen["naive"] = await call(
                "POST", url + "/switchover", token=TOKEN, body={"scheduled_at": "2099-01-01T00:00"}
            )
            later = {"target": "beta", "scheduled_at": "2099-01-01T00:00:00Z"}
            seen["no such node"] = await call("POST", url + "/switchover", token=TOKEN, body=later)
            del later["target"]
            seen["schedule"] = await call("POST", url + "/switchover", token=TOKEN, body=later)
            seen["again"] = await call("POST", url + "/switchover", token=TOKEN, body=later)
            seen["cluster"] = await call("GET", url + "/cluster")
            seen["cancel"] = await call("DELETE", url + "/switchover", token=TOKEN)
            seen["cancel again"] = await call("DELETE", url + "/switchover", token=TOKEN)
            seen["now, nobody to take over"] = await call("POST", url + "/switchover", token=TOKEN)
        finally:
            await server.api.stop()
        return seen

    with capture_logs() as logs:
        seen = run(main)
    assert seen["no reason"][0] == 400 and "give a reason" in seen["no reason"][1]["error"]
    assert seen["not json"] == (400, {"error": "the body must be a JSON object"})
    assert seen["unknown"][0] == 400 and "unknown field(s) why" in seen["unknown"][1]["error"]
    assert seen["pause"][0] == 200
    paused = seen["paused"].paused
    assert paused.reason == "fw" and paused.by == "api 127.0.0.1 (token)"
    assert seen["resume"][0] == 200 and seen["resumed"].paused is None
    assert seen["past"][0] == 400 and "in the past" in seen["past"][1]["error"]
    assert seen["naive"][0] == 400 and "no time zone" in seen["naive"][1]["error"]
    assert seen["no such node"] == (409, {"error": "beta is not a node of the cluster"})
    status, scheduled = seen["schedule"]
    assert status == 202
    assert scheduled["source"] == "alpha" and scheduled["target"] is None
    assert scheduled["due"] == 4070908800.0
    assert seen["again"][0] == 409 and "already scheduled" in seen["again"][1]["error"]
    assert seen["cluster"][1]["scheduled_switchover"]["due"] == 4070908800.0
    assert seen["cancel"] == (200, {"cancelled": True})
    assert seen["cancel again"] == (404, {"error": "no switchover is scheduled"})
    assert seen["now, nobody to take over"][0] == 409
    changes = [entry for entry in logs if entry["event"] == "ApiChange"]
    assert [entry["action"] for entry in changes][:2] == ["pause", "resume"]
    assert all(entry["caller"].startswith("api 127.0.0.1") for entry in changes)


def test_a_client_certificate_signed_by_the_ca_may_change_things(
    tmp_path: Path, zookeeper: ZooKeeperEnsemble, leader: Callable[[str], Coordinator]
) -> None:
    cert, key = make_self_signed(tmp_path / "server", "127.0.0.1")
    client_cert, client_key = make_self_signed(tmp_path / "client", "operator.example")
    server = make_server(
        tmp_path,
        zookeeper,
        leader,
        "api-mtls",
        tls_cert=str(cert),
        tls_key=str(key),
        client_ca=str(client_cert),
    )
    assert server.url.startswith("https://127.0.0.1:")
    trusting = ssl.create_default_context(cafile=str(cert))
    with_certificate = ssl.create_default_context(cafile=str(cert))
    with_certificate.load_cert_chain(client_cert, client_key)

    async def main() -> list[int]:
        await server.api.start()
        try:
            body = {"reason": "mtls"}
            return [
                (await call("GET", server.url + "/active", ssl_context=trusting))[0],
                (await call("POST", server.url + "/pause", body=body, ssl_context=trusting))[0],
                (
                    await call(
                        "POST", server.url + "/pause", body=body, ssl_context=with_certificate
                    )
                )[0],
            ]
        finally:
            await server.api.stop()

    assert run(main) == [200, 401, 200]
    assert server.api.coordinator.view().paused is not None


def test_a_token_file_others_may_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    path.chmod(0o640)
    with pytest.raises(ApiAuthError, match=r"mode 0640 lets others read the token; chmod 600"):
        load_token(path)
    path.chmod(0o600)
    path.write_text("short")
    with pytest.raises(ApiAuthError, match="at least 16 characters"):
        load_token(path)


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("0.0.0.0:8008", "bind a management address"),
        ("10.0.0.1", "no port"),
    ],
)
def test_the_api_address_is_checked(tmp_path: Path, listen: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        agent_config(tmp_path, "127.0.0.1:2181", "c", {"listen": listen})


@pytest.mark.parametrize(
    ("api", "message"),
    [
        (
            {"listen": "127.0.0.1:8008", "tls_cert": "/c.pem"},
            "tls_cert and api.tls_key go together",
        ),
        ({"listen": "127.0.0.1:8008", "client_ca": "/ca.pem"}, "client_ca needs api.tls_cert"),
        ({"read_networks": ["10.0.0.300/8"]}, "read_networks"),
    ],
)
def test_api_settings_that_cannot_work_are_refused(
    tmp_path: Path, api: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        agent_config(tmp_path, "127.0.0.1:2181", "c", api)


def test_the_hooks_settings_shape_the_promotion(tmp_path: Path) -> None:
    base = agent_config(tmp_path, "127.0.0.1:2181", "c", {})
    assert base.api.url == "" and not base.policy().pre_promote
    text = "\n".join(
        [
            "[agent]",
            'node = "alpha"',
            'zookeeper = "127.0.0.1:2181"',
            f'relay_config = "{tmp_path / "relay.toml"}"',
            "[storage]",
            f'path = "{tmp_path}"',
            "[hooks]",
            'pre_promote = ["/usr/local/bin/go-no-go", "--strict"]',
            'timeout = "4s"',
        ]
    )
    policy = parse_agent_config(text).policy()
    assert policy.pre_promote and Step.PRE_PROMOTE in policy.promotion
    assert policy.timeout(Step.PRE_PROMOTE) == 5.0  # the hook is killed first, then said so
    with pytest.raises(ConfigError, match="the program"):
        parse_agent_config(text.replace('"/usr/local/bin/go-no-go"', '""'))
