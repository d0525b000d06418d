"""Property tests of the spool's frame and entry decoders: any bytes in, no surprise out.

Documented behaviour (hamta/spool_format.py): ``scan_frames`` and ``scan_entries`` never raise; they
return only records from frames (entries) whose CRC-32 matches, so never a record that was not
written; and damage to some frames never hides the frames it did not touch.
"""

from __future__ import annotations

import zlib

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from hamta.spool_format import (
    Defer,
    Done,
    Enqueue,
    Record,
    encode_frame,
    entry_head,
    scan_entries,
    scan_frames,
)

text = st.text(max_size=12)
ints = st.integers(min_value=0, max_value=2**32)
enqueues = st.builds(
    Enqueue,
    qid=text,
    segment=ints,
    offset=ints,
    length=ints,
    crc=ints,
    arrival=st.floats(allow_nan=False),
    sender=text,
    recipients=st.lists(text, max_size=3).map(tuple),
)
records = st.one_of(
    enqueues,
    st.builds(Done, qid=text, rcpts=st.lists(ints, max_size=3).map(tuple)),
    st.builds(
        Defer,
        qid=text,
        rcpts=st.lists(ints, max_size=3).map(tuple),
        attempts=ints,
        next_attempt=st.floats(allow_nan=False),
    ),
)
frames = st.lists(st.lists(records, min_size=1, max_size=4), min_size=1, max_size=6)


def encoded(batch: list[Record]) -> bytes:
    return msgspec.msgpack.encode(batch)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_scan_without_raising(data: bytes) -> None:
    scan = scan_frames(data)
    assert all(0 <= a < b <= len(data) for a, b in scan.damaged)
    offsets = [offset for offset, _ in scan.frames]
    assert offsets == sorted(offsets)
    entries, damaged = scan_entries(data, 1)
    assert all(0 <= a < b <= len(data) for a, b in damaged)
    assert all(e.rec.segment == 1 for e in entries)


@settings(max_examples=300, deadline=None)
@given(
    frames,
    st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)), max_size=6),
    st.data(),
)
def test_damage_yields_only_written_frames_and_spares_the_others(
    batches: list[list[Record]], flips: list[tuple[int, int]], data: st.DataObject
) -> None:
    blobs = [encode_frame(batch) for batch in batches]
    original = b"".join(blobs)
    whole = bytearray(original)
    for position, mask in flips:
        whole[position % len(whole)] ^= mask
    touched = {i for i, (a, b) in enumerate(zip(original, whole, strict=True)) if a != b}
    cut = data.draw(st.integers(min_value=0, max_value=len(whole)))
    damaged = bytes(whole[:cut])
    scan = scan_frames(damaged)
    written = {encoded(batch) for batch in batches}
    assert all(encoded(found) in written for _, found in scan.frames)
    # Every frame whose bytes were neither flipped nor cut is found, at its place.
    found = {offset for offset, _ in scan.frames}
    start = 0
    for blob in blobs:
        end = start + len(blob)
        if end <= cut and not any(start <= t < end for t in touched):
            assert start in found, (start, scan)
        start = end
    if any(t < cut for t in touched):  # never silently
        assert scan.damaged or scan.torn


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(enqueues, st.binary(max_size=40)), min_size=1, max_size=5),
    st.lists(st.integers(min_value=0), max_size=4),
)
def test_segment_entries_come_back_or_are_reported(
    messages: list[tuple[Enqueue, bytes]], flips: list[int]
) -> None:
    blobs = []
    for given_rec, body in messages:
        rec = msgspec.structs.replace(given_rec, length=len(body), crc=zlib.crc32(body))
        blobs.append((rec, entry_head(rec), body))
    whole = bytearray(b"".join(head + body for _, head, body in blobs))
    for position in flips:
        whole[position % len(whole)] ^= 0xA5
    entries, _ = scan_entries(bytes(whole), 7, 1000)
    written = {(r.qid, r.sender, r.recipients, r.length, r.crc) for r, _, _ in blobs}
    for entry in entries:
        rec = entry.rec
        assert (rec.qid, rec.sender, rec.recipients, rec.length, rec.crc) in written
        assert rec.segment == 7
        if entry.intact:
            start = rec.offset - 1000
            assert zlib.crc32(bytes(whole[start : start + rec.length])) == rec.crc
    if not flips:
        assert [e.rec.qid for e in entries] == [r.qid for r, _, _ in blobs]
        assert all(e.intact for e in entries)
