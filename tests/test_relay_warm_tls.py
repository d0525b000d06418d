"""A warm relay loads its outbound TLS contexts once, at start, not in each activation.

Loading the system's CA store took 0.1-0.3 s of each activation in the lab (py-spy on a
promoting node: ``ssl.SSLContext.load_default_certs`` under ``OutboundTls``), on the failover's
critical path. The real ``ssl.create_default_context`` runs; the test only counts its calls.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest

from hamta.config import Config
from hamta.listeners import bind
from hamta.relay import Relay
from tests.support.ports import free_port


def test_activations_reuse_the_contexts_loaded_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Config.model_validate(
        {
            "node": {"hostname": "relay.hamta.test"},
            "smtp": {"listen": [f"127.0.0.1:{free_port('127.0.0.1')}"]},
            "spool": {"path": str(tmp_path / "spool")},
            "control": {"socket": str(tmp_path / "relay.sock")},
        }
    )
    real = ssl.create_default_context
    calls: list[str] = []

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        calls.append("create_default_context")
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counted)

    async def main() -> None:
        relay = Relay(config, listeners=bind(config.smtp.listen, reuse_port=False))
        loaded = len(calls)
        assert loaded >= 2  # warm: the verifying and the unverified context
        for _ in range(2):  # two terms of the same process
            await relay.activate()
            assert relay._active is not None
            tls = relay._active.engine.tls
            assert tls.verifying is relay.tls_contexts.verifying
            assert tls.unverified is relay.tls_contexts.unverified
            assert tls.unverified.verify_mode is ssl.CERT_NONE
            await relay.deactivate(1.0)
        assert len(calls) == loaded  # no CA store loaded on an activation's path

    asyncio.run(main())
