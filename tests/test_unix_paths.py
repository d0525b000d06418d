"""A unix socket path too long to bind is refused up front, saying so, not deep in a process.

Linux allows 107 bytes (hamta.unix_paths). Past that, a relay's control socket cannot be bound;
in a lab (a chaos run's, under pytest-xdist's deep tmp_path) the relay then only ever failed to
become ready. The relay, the lab and ``hamta chaos run`` each refuse such a path with its size.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cluster.lab.lab import Lab, LabError
from hamta.unix_paths import UNIX_PATH_MAX, SocketPathError, check_socket_path
from tests.support.relay import HAMTA, RelayProcess


def _path_of(size: int) -> Path:
    return Path("/tmp/" + "x" * (size - len("/tmp/")))


def test_a_path_of_the_limit_passes_and_one_byte_more_is_refused_with_its_size() -> None:
    assert check_socket_path(_path_of(UNIX_PATH_MAX)) == _path_of(UNIX_PATH_MAX)
    with pytest.raises(SocketPathError, match=f"is {UNIX_PATH_MAX + 1} bytes, longer than the 107"):
        check_socket_path(_path_of(UNIX_PATH_MAX + 1))


def test_the_relay_refuses_a_control_socket_path_too_long_and_says_why(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100) / "relay.sock"
    relay = RelayProcess(tmp_path / "relay", {"control": {"socket": deep}})
    relay.start(wait_ready=False)
    assert relay.proc is not None
    assert relay.proc.wait(timeout=60) == 1
    assert f"unix socket path {deep} is {len(str(deep))} bytes" in relay.stderr()
    assert not deep.parent.exists()  # refused before anything was made for it


def test_a_lab_too_deep_for_its_nodes_sockets_is_refused_before_anything_is_built(
    tmp_path: Path,
) -> None:
    deep = tmp_path / ("d" * 100)
    with pytest.raises(LabError, match=r"is too deep: unix socket path .*/node1/relay\.sock"):
        Lab(deep, prefix="hct", subnet="198.19.238.0/24")  # never brought up
    assert not deep.exists()


def test_a_chaos_run_in_a_workdir_too_deep_stops_before_its_lab_with_the_reason(
    tmp_path: Path,
) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    argv = [*HAMTA, "chaos", "run", "--scenario", "kill-node", "--workdir", str(deep)]
    argv += ["--output", str(tmp_path / "report"), "--prefix", "hct", "--subnet", "198.19.238.0/24"]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "is too deep: unix socket path" in done.stderr
    assert f"longer than the {UNIX_PATH_MAX} a socket allows" in done.stderr
