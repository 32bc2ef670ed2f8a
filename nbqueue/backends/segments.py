"""Segment files: many ``(task_id, bytes)`` frames in one immutable file.

fq:// writes task payloads and results in segments so that one batch costs one write and one
fsync, however many tasks it holds. Layout::

    b"NBQSEG1\\n" | u32 count | count × (u16 id_len, u32 data_len) | ids and data, in order
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

MAGIC = b"NBQSEG1\n"
_COUNT = struct.Struct("<I")
_ENTRY = struct.Struct("<HI")


class CorruptSegment(ValueError):
    """The bytes are not a well-formed segment."""


def encode(frames: Sequence[tuple[str, bytes]]) -> bytes:
    """Pack frames into one segment."""
    ids = [task_id.encode() for task_id, _ in frames]
    head = [MAGIC, _COUNT.pack(len(frames))]
    head += [_ENTRY.pack(len(i), len(data)) for i, (_, data) in zip(ids, frames, strict=True)]
    body = []
    for i, (_, data) in zip(ids, frames, strict=True):
        body.append(i)
        body.append(data)
    return b"".join(head + body)


def decode(blob: bytes) -> list[tuple[str, bytes]]:
    """Unpack a segment; raise CorruptSegment on anything malformed (never anything else)."""
    view = memoryview(blob)
    if view[: len(MAGIC)] != MAGIC or len(view) < len(MAGIC) + _COUNT.size:
        raise CorruptSegment("not a segment file (bad magic)")
    (count,) = _COUNT.unpack_from(view, len(MAGIC))
    pos = len(MAGIC) + _COUNT.size
    end_index = pos + count * _ENTRY.size
    if end_index > len(view):
        raise CorruptSegment("segment index runs past the end of the file")
    sizes = list(_ENTRY.iter_unpack(view[pos:end_index]))
    pos = end_index
    frames = []
    for id_len, data_len in sizes:
        if pos + id_len + data_len > len(view):
            raise CorruptSegment("segment frame runs past the end of the file")
        try:
            task_id = bytes(view[pos : pos + id_len]).decode("ascii")
        except UnicodeDecodeError as exc:
            raise CorruptSegment("segment holds a non-ASCII task id") from exc
        pos += id_len
        frames.append((task_id, bytes(view[pos : pos + data_len])))
        pos += data_len
    if pos != len(view):
        raise CorruptSegment("segment has trailing bytes")
    return frames
