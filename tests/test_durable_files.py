"""Durable files on a real directory: whole, private unless told, never over a taken name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hamta.durable_files import append_durably, create_new, create_once, write_durably


def test_append_creates_the_file_with_its_mode_and_appends_whole_records(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    big = b"x" * (1 << 20) + b"\n"
    append_durably(path, b"first\n", mode=0o640)
    append_durably(path, big, mode=0o600)  # the mode is the creation's alone
    assert path.read_bytes() == b"first\n" + big
    assert os.stat(path).st_mode & 0o777 == 0o640


def test_create_new_never_replaces_and_names_the_taken_file(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    path = create_new(directory, "a.key", b"one")
    assert (path.read_bytes(), os.stat(path).st_mode & 0o777) == (b"one", 0o600)
    with pytest.raises(FileExistsError) as taken:
        create_new(directory, "a.key", b"two")
    assert taken.value.filename == str(path)
    assert path.read_bytes() == b"one"
    assert sorted(os.listdir(directory)) == ["a.key"]  # no temporary file left behind


def test_create_once_agrees_with_the_first_and_replace_is_whole(tmp_path: Path) -> None:
    assert create_once(tmp_path, "secret", b"first") == b"first"
    assert create_once(tmp_path, "secret", b"second") == b"first"
    write_durably(tmp_path, "state.json", b"{}")
    write_durably(tmp_path, "state.json", b'{"a": 1}')
    assert (tmp_path / "state.json").read_bytes() == b'{"a": 1}'
    assert sorted(os.listdir(tmp_path)) == ["secret", "state.json"]
