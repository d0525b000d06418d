"""The spool's bytes on disk: records, journal frames, segment entries, and reading them back.

Every reader here never raises on damaged bytes: it reports them and goes on at the next magic,
so that recovery (``hamta.spool_recovery``) can rebuild what they cost from the other files.
``docs/spool-format.md`` is the operator's account of the same format.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

FORMAT_VERSION = "hamta-spool 2\n"
# Version 1 spools are read (their journals and checkpoints) and upgraded in place; see
# docs/spool-format.md.
OLD_VERSIONS = ("hamta-spool 1\n",)
# A frame starts with a magic so that a reader can find the next frame after damaged bytes.
# As a version 1 length (u32 LE) it would be 2.7 GB, which no version 1 frame ever was.
FRAME_MAGIC = b"HJ2\xa5"
_FRAME = struct.Struct("<4sII")  # magic, payload length, crc32 of payload
_FRAME_V1 = struct.Struct("<II")  # payload length, crc32 of payload
# Each body in a segment is preceded by its own Enqueue record, so that the segments alone can
# rebuild what a damaged journal or checkpoint lost.
ENTRY_MAGIC = b"HS2\xa5"
_ENTRY = struct.Struct("<4sII")  # magic, envelope length, crc32 of envelope


class Enqueue(msgspec.Struct, tag=1, array_like=True, gc=False):
    """A message accepted into the spool: its envelope and where its body lies."""

    qid: str
    segment: int
    offset: int
    length: int
    crc: int
    arrival: float
    sender: str
    recipients: tuple[str, ...]
    message_id: str = ""
    client: str = ""
    is_dsn: bool = False


class Defer(msgspec.Struct, tag=2, array_like=True, gc=False):
    """Some recipients failed temporarily: how often, and when to try next (wall clock)."""

    qid: str
    rcpts: tuple[int, ...]
    attempts: int
    next_attempt: float


class Done(msgspec.Struct, tag=3, array_like=True, gc=False):
    """Some recipients are finished: delivered, bounced or expired."""

    qid: str
    rcpts: tuple[int, ...]


class CheckpointEnd(msgspec.Struct, tag=4, array_like=True, gc=False):
    """The last record of a checkpoint: how many messages it holds, and the position in the
    segments where the next body was to be written when it was taken (every message before it
    is in the checkpoint, in a later journal, or finished)."""

    messages: int
    segment: int
    offset: int


Record = Enqueue | Defer | Done | CheckpointEnd
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[Record])
_raw_decoder = msgspec.msgpack.Decoder(list[msgspec.Raw])
_entry_decoder = msgspec.msgpack.Decoder(Enqueue)


def encode_frame(records: Iterable[Record | msgspec.Raw]) -> bytes:
    """One journal or checkpoint frame: magic, length and CRC-32, then the records (msgpack)."""
    payload = _encoder.encode(list(records))
    return _FRAME.pack(FRAME_MAGIC, len(payload), zlib.crc32(payload)) + payload


def entry_head(rec: Enqueue) -> bytes:
    """The bytes written before a body in its segment: magic, length and CRC, the envelope.

    The envelope is the Enqueue record without its position (the reader knows where it found
    it), so that it does not depend on the offset it describes.
    """
    envelope = _encoder.encode(msgspec.structs.replace(rec, segment=0, offset=0))
    return _ENTRY.pack(ENTRY_MAGIC, len(envelope), zlib.crc32(envelope)) + envelope


@dataclass(frozen=True, slots=True)
class FrameScan:
    """What a journal or checkpoint file holds: its valid frames and its damaged bytes."""

    frames: list[tuple[int, list[Record]]]  # (offset, records), in file order
    damaged: list[tuple[int, int]]  # [start, end) spans holding no valid frame, torn tail aside
    torn: bool  # the file ends in an incomplete frame: a crash while it was being written
    version: int  # 2, or 1 for a file written by a version 1 spool


def scan_frames(data: bytes) -> FrameScan:
    """Every valid frame of a journal or checkpoint, skipping damaged bytes.

    Never raises. Bytes that are not a valid frame (no magic, a length past the end, a CRC-32
    or msgpack that does not check) are reported as damaged spans and the scan goes on at the
    next frame magic; records come only from frames whose CRC-32 matches. A file that does not
    start with the magic but reads as version 1 frames is a version 1 file.
    """
    scanner = FrameScanner(data)
    frames = [(offset, records) for offset, records, _ in scanner]
    return FrameScan(frames, scanner.damaged, scanner.torn, scanner.version)


# A frame as a scanner yields it: its offset, its records, and, when the scanner was asked for
# them (``raw``), each record's msgpack bytes as the file holds them (else an empty list).
_Frame = tuple[int, list[Record], list[msgspec.Raw]]


class FrameScanner:
    """:func:`scan_frames` one frame at a time, so that a reader holds one frame's records at
    once, not a whole file's (recovery at depth). ``damaged`` grows as the scan goes (a span
    is added before the frame that follows it is yielded); ``torn`` and ``version`` are final
    once the iteration has ended.

    With ``raw``, each frame also comes with its records' own bytes, so that recovery keeps an
    Enqueue record's bytes as the message's envelope instead of encoding the record again. They
    point into ``data``: a reader copies what it keeps before it asks for the next frame.
    """

    def __init__(self, data: bytes | mmap.mmap, *, raw: bool = False) -> None:
        self._data = data
        self._raw = raw
        self.damaged: list[tuple[int, int]] = []
        self.torn = False
        self.version = 2

    def __iter__(self) -> Iterator[_Frame]:
        data = self._data
        if data[:4] != FRAME_MAGIC:
            frames, damaged, torn = _scan_frames_v1(data, self._raw)
            if frames:
                self.damaged, self.torn, self.version = damaged, torn, 1
                yield from frames
                return
        with memoryview(data) as view:
            pos, end = 0, len(data)
            bad: int | None = None
            while pos < end:
                frame = _frame_at(data, view, pos, self._raw)
                if frame is not None:
                    if bad is not None:
                        self.damaged.append((bad, pos))
                        bad = None
                    yield pos, *frame
                    pos += _FRAME.size + _FRAME.unpack_from(data, pos)[1]
                    continue
                if bad is None:
                    bad = pos
                found = data.find(FRAME_MAGIC, pos + 1)
                pos = found if found >= 0 else end
        self.torn = bad is not None and _incomplete(data, bad)
        if bad is not None and not self.torn:
            self.damaged.append((bad, end))


def _decode(payload: memoryview, raw: bool) -> tuple[list[Record], list[msgspec.Raw]] | None:
    """A frame's records (and their bytes, with ``raw``), or None when its msgpack does not
    check. Both are decoded by msgspec a frame at a time, not a record at a time."""
    try:
        return _decoder.decode(payload), _raw_decoder.decode(payload) if raw else []
    except msgspec.DecodeError:
        return None


def _frame_at(
    data: bytes | mmap.mmap, view: memoryview, pos: int, raw: bool
) -> tuple[list[Record], list[msgspec.Raw]] | None:
    if pos + _FRAME.size > len(data) or data[pos : pos + 4] != FRAME_MAGIC:
        return None
    _, length, crc = _FRAME.unpack_from(data, pos)
    start = pos + _FRAME.size
    if start + length > len(data) or zlib.crc32(view[start : start + length]) != crc:
        return None
    return _decode(view[start : start + length], raw)


def _incomplete(data: bytes | mmap.mmap, pos: int) -> bool:
    """Whether the bytes from ``pos`` to the end are the start of a frame cut short."""
    rest = data[pos:]
    if len(rest) < _FRAME.size:
        return FRAME_MAGIC.startswith(rest[:4])
    _, length, _ = _FRAME.unpack_from(rest)
    return rest[:4] == FRAME_MAGIC and _FRAME.size + length > len(rest)


def _scan_frames_v1(
    data: bytes | mmap.mmap, raw: bool
) -> tuple[list[_Frame], list[tuple[int, int]], bool]:
    """Version 1 frames had no magic: the first bad frame ends what can be read. Returns the
    frames, the damaged span (if any) and whether the file ends torn."""
    frames: list[_Frame] = []
    view = memoryview(data)
    pos, end = 0, len(data)
    while pos + _FRAME_V1.size <= end:
        length, crc = _FRAME_V1.unpack_from(data, pos)
        start = pos + _FRAME_V1.size
        if start + length > end:
            return frames, [], True
        if zlib.crc32(view[start : start + length]) != crc:
            break
        decoded = _decode(view[start : start + length], raw)
        if decoded is None:
            break
        frames.append((pos, *decoded))
        pos = start + length
    if pos == end:
        return frames, [], False
    if end - pos < _FRAME_V1.size:
        return frames, [], True
    return frames, [(pos, end)], False


@dataclass(frozen=True, slots=True)
class SegmentEntry:
    """A message found in a segment: its envelope, and whether its body passes its CRC."""

    rec: Enqueue
    intact: bool


def scan_entries(
    data: bytes, segment: int, base: int = 0
) -> tuple[list[SegmentEntry], list[tuple[int, int]]]:
    """The messages in ``data``, bytes of segment ``segment`` read from file offset ``base``.

    Never raises. Returns the entries whose envelope checks (with their position filled in)
    and the damaged spans (file offsets) where none could be read; like :func:`scan_frames`
    it goes on at the next entry magic. An entry whose body runs past ``data`` is returned
    with ``intact`` False.
    """
    entries: list[SegmentEntry] = []
    damaged: list[tuple[int, int]] = []
    view = memoryview(data)
    pos, end = 0, len(data)
    bad: int | None = None
    while pos < end:
        rec = _envelope_at(data, view, pos)
        if rec is not None:
            if bad is not None:
                damaged.append((base + bad, base + pos))
                bad = None
            start = pos + _ENTRY.size + _ENTRY.unpack_from(data, pos)[1]
            stop = start + rec.length
            intact = stop <= end and zlib.crc32(view[start:stop]) == rec.crc
            rec = msgspec.structs.replace(rec, segment=segment, offset=base + start)
            entries.append(SegmentEntry(rec, intact))
            pos = min(stop, end)
            continue
        if bad is None:
            bad = pos
        found = data.find(ENTRY_MAGIC, pos + 1)
        pos = found if found >= 0 else end
    if bad is not None:
        damaged.append((base + bad, base + end))
    return entries, damaged


def _envelope_at(data: bytes, view: memoryview, pos: int) -> Enqueue | None:
    if pos + _ENTRY.size > len(data) or data[pos : pos + 4] != ENTRY_MAGIC:
        return None
    _, length, crc = _ENTRY.unpack_from(data, pos)
    start = pos + _ENTRY.size
    if start + length > len(data) or zlib.crc32(view[start : start + length]) != crc:
        return None
    try:
        return _entry_decoder.decode(view[start : start + length])
    except msgspec.DecodeError:
        return None


def numbered(directory: Path, suffix: str) -> list[int]:
    """The numbers of the files ``NNNNNNNN<suffix>`` in ``directory``, in order."""
    numbers = []
    for entry in directory.iterdir():
        if entry.name.endswith(suffix) and entry.name[: -len(suffix)].isdigit():
            numbers.append(int(entry.name[: -len(suffix)]))
    return sorted(numbers)
