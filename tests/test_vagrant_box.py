"""The Vagrant cluster's box is built before anything asks Vagrant's remote catalog for it.

Stand-ins for ``vagrant`` and ``vagrant/build-box`` in a checkout of their own: the real ones
take half an hour and a Debian mirror (``pytest -m vagrant`` runs them).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.lab.vagrant import BOX, VagrantCluster, VagrantError


def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, boxes: str, build: int) -> Path:
    """A checkout whose build-box exits ``build`` (and records it ran); vagrant lists ``boxes``."""
    root = tmp_path / "checkout"
    (root / "vagrant").mkdir(parents=True)
    script = root / "vagrant" / "build-box"
    script.write_text(f"#!/bin/sh\necho building >> {tmp_path / 'built'}\nexit {build}\n")
    script.chmod(0o755)
    tool = tmp_path / "bin" / "vagrant"
    tool.parent.mkdir()
    tool.write_text(f'#!/bin/sh\n[ "$1 $2" = "box list" ] && printf "{boxes}"\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:{os.environ['PATH']}")
    return root


def test_a_missing_box_is_built_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = checkout(tmp_path, monkeypatch, boxes="debian/bookworm64 (libvirt, 0)\\n", build=0)
    done = VagrantCluster(root, tmp_path / "work").ensure_box()
    assert done.startswith(f"box {BOX} built and added")
    assert (tmp_path / "built").read_text() == "building\n"


def test_a_present_box_is_not_built_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = checkout(tmp_path, monkeypatch, boxes=f"{BOX} (libvirt, 0)\\n", build=0)
    assert VagrantCluster(root, tmp_path / "work").ensure_box() == f"box {BOX} present"
    assert not (tmp_path / "built").exists()


def test_a_failed_build_says_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = checkout(tmp_path, monkeypatch, boxes="", build=3)
    with pytest.raises(VagrantError, match=r"failed \(exit 3\).*run: sudo .*/vagrant/build-box"):
        VagrantCluster(root, tmp_path / "work").ensure_box()


def test_without_vagrant_it_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = checkout(tmp_path, monkeypatch, boxes="", build=0)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(VagrantError, match="scripts/bootstrap --vagrant"):
        VagrantCluster(root, tmp_path / "work").ensure_box()
