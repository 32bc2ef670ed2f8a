"""Segment files: many ``(task_id, bytes)`` frames in one immutable file.

fq:// writes task payloads and results in segments so that one batch costs one write and one
fsync, however many tasks it holds. Layout::

    b"NBQSEG1\\n" | u32 count | count × (u16 id_len, u32 data_len) | ids and data, in order
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from itertools import chain
from typing import BinaryIO

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
    first, sizes = _layout(view, view[len(MAGIC) + _COUNT.size :], len(view))
    lo, hi, offset = _span(sizes, lo, hi)
    return _frames(view[first + offset :], sizes[lo:hi])


def read(f: BinaryIO, lo: int = 0, hi: int | None = None) -> list[tuple[str, bytes]]:
    """``decode`` of the segment open in ``f``, reading only its header, its index and the wanted
    frames: taking a few tasks from a large segment costs their bytes, not the file's."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(len(MAGIC) + _COUNT.size)
    count = _count(head, size)
    first, sizes = _layout(head, f.read(count * _ENTRY.size), size)
    lo, hi, offset = _span(sizes, lo, hi)
    f.seek(first + offset)
    want = _bytes_of(sizes[lo:hi])
    body = f.read(want)
    if len(body) != want:
        raise CorruptSegment("segment file is shorter than its index says")
    return _frames(memoryview(body), sizes[lo:hi])


def _count(head: bytes | memoryview, size: int) -> int:
    if len(head) < len(MAGIC) + _COUNT.size or head[: len(MAGIC)] != MAGIC:
        raise CorruptSegment("not a segment file (bad magic)")
    (count,) = _COUNT.unpack_from(head, len(MAGIC))
    if len(MAGIC) + _COUNT.size + count * _ENTRY.size > size:
        raise CorruptSegment("segment index runs past the end of the file")
    return count


def _bytes_of(sizes: list[tuple[int, int]]) -> int:
    """The bytes of these frames. Summed in C: reading one task of a 500-task segment (a retried
    or released task is queued alone) sums the whole index, once per task."""
    return sum(chain.from_iterable(sizes))


def _layout(
    head: bytes | memoryview, index: bytes | memoryview, size: int
) -> tuple[int, list[tuple[int, int]]]:
    """Where the frames start, and each frame's (id length, data length); checked against ``size``."""
    count = _count(head, size)
    first = len(MAGIC) + _COUNT.size + count * _ENTRY.size
    sizes = list(_ENTRY.iter_unpack(index[: count * _ENTRY.size]))
    if first + _bytes_of(sizes) != size:
        raise CorruptSegment("segment frames do not fill the file exactly")
    return first, sizes


def _span(sizes: list[tuple[int, int]], lo: int, hi: int | None) -> tuple[int, int, int]:
    """``lo`` and ``hi`` within the segment, and the byte offset of frame ``lo`` from the first."""
    hi = len(sizes) if hi is None else min(hi, len(sizes))
    lo = min(max(lo, 0), hi)
    return lo, hi, _bytes_of(sizes[:lo])


def _frames(body: memoryview, sizes: list[tuple[int, int]]) -> list[tuple[str, bytes]]:
    frames = []
    pos = 0
    for id_len, data_len in sizes:
        try:
            task_id = bytes(body[pos : pos + id_len]).decode("ascii")
        except UnicodeDecodeError as exc:
            raise CorruptSegment("segment holds a non-ASCII task id") from exc
        frames.append((task_id, bytes(body[pos + id_len : pos + id_len + data_len])))
        pos += id_len + data_len
    return frames
