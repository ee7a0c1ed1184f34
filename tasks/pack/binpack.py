"""Packing documents of known token lengths into rows of `seq_len` tokens.

Both strategies return rows as lists of pieces `(item, offset, length)`: tokens
`[offset, offset + length)` of item `item`. Items flagged `whole` (instruction examples) are never
split; the caller rejects any that are longer than a row. Everything else is pretraining text.

- `pack_concat`: the classic stream. Items follow each other in order and are cut at row
  boundaries; a whole item that does not fit in the rest of a row starts the next row (the gap is padding).
- `pack_best_fit_decreasing`: an item longer than a row is split into full rows plus a remainder
  (the only splitting there is); then items, longest first, go into the open row with the least room
  that still fits them. With many short items the rows come out nearly full.
"""

from __future__ import annotations

from collections.abc import Sequence

Piece = tuple[int, int, int]  # (item, offset within the item, length)


def pack_concat(lengths: Sequence[int], whole: Sequence[bool], seq_len: int) -> list[list[Piece]]:
    rows: list[list[Piece]] = []
    row: list[Piece] = []
    room = seq_len
    for item, (length, keep_whole) in enumerate(zip(lengths, whole)):
        if keep_whole:
            if length > room:
                rows.append(row)
                row, room = [], seq_len
            row.append((item, 0, length))
            room -= length
        else:
            offset = 0
            while offset < length:
                take = min(room, length - offset)
                row.append((item, offset, take))
                offset += take
                room -= take
                if room == 0:
                    rows.append(row)
                    row, room = [], seq_len
        if room == 0 and row:
            rows.append(row)
            row, room = [], seq_len
    if row:
        rows.append(row)
    return rows


def pack_best_fit_decreasing(lengths: Sequence[int], whole: Sequence[bool], seq_len: int) -> list[list[Piece]]:
    rows: list[list[Piece]] = []
    pending: list[Piece] = []
    for item, (length, keep_whole) in enumerate(zip(lengths, whole)):
        if length > seq_len and not keep_whole:
            full = length // seq_len
            rows.extend([(item, k * seq_len, seq_len)] for k in range(full))
            if length - full * seq_len:
                pending.append((item, full * seq_len, length - full * seq_len))
        else:
            pending.append((item, 0, length))
    pending.sort(key=lambda piece: -piece[2])  # stable: equal lengths keep input order (deterministic)

    # Open rows indexed by their free room. Bit r of `has_room` is set while some row has exactly r
    # tokens free, so "the smallest room >= length" is the lowest set bit at or above `length`: one
    # shift and one isolate-lowest-bit on a seq_len-bit integer per item, instead of a scan over rows.
    bins: list[list[Piece]] = []
    rows_with_room: dict[int, list[int]] = {}
    has_room = 0
    for piece in pending:
        length = piece[2]
        candidates = has_room >> length
        if candidates:
            room = length + (candidates & -candidates).bit_length() - 1
            stack = rows_with_room[room]
            b = stack.pop()
            if not stack:
                has_room &= ~(1 << room)
        else:
            b, room = len(bins), seq_len
            bins.append([])
        bins[b].append(piece)
        left = room - length
        if left:
            stack = rows_with_room.setdefault(left, [])
            if not stack:
                has_room |= 1 << left
            stack.append(b)
    rows.extend(bins)
    return rows
