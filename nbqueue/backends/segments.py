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


def decode(blob: bytes, lo: int = 0, hi: int | None = None) -> list[tuple[str, bytes]]:
    """Unpack frames ``lo..hi-1`` of a segment (all by default); raise CorruptSegment on anything
    malformed (never anything else). The whole index is checked; only wanted frames are copied."""
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
    if pos + sum(i + d for i, d in sizes) != len(view):
        raise CorruptSegment("segment frames do not fill the file exactly")
    hi = len(sizes) if hi is None else min(hi, len(sizes))
    frames = []
    for k, (id_len, data_len) in enumerate(sizes):
        if lo <= k < hi:
            try:
                task_id = bytes(view[pos : pos + id_len]).decode("ascii")
            except UnicodeDecodeError as exc:
                raise CorruptSegment("segment holds a non-ASCII task id") from exc
            frames.append((task_id, bytes(view[pos + id_len : pos + id_len + data_len])))
        pos += id_len + data_len
    return frames
