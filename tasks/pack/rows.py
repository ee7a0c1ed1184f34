"""Turning packed pieces into training rows with array operations (no Python loop per token).

A row is exactly `seq_len` tokens: its pieces, then padding. Per row we emit
- input_ids;
- labels: the item's labels (= its tokens for text, prompt-masked for instruction data), with the
  first token of every piece set to -100 so that no document is trained to follow another one, and
  -100 over padding;
- position_ids: 0, 1, 2, ... restarting at every piece and at the padding, so a trainer that derives
  attention boundaries from position_ids (flash-attention varlen, DataCollatorWithFlattening) keeps
  attention inside documents;
- seq_lens: the length of every piece (padding excluded), doc_ids and doc_offsets (which document, and
  where in it, each piece comes from), n_tokens (non-padding tokens).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from tasks.pack.binpack import Piece
from tasks.tokenize.stage import IGNORE_INDEX

PACKED_SCHEMA = pa.schema(
    [
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("labels", pa.list_(pa.int32())),
        pa.field("position_ids", pa.list_(pa.int32())),
        pa.field("seq_lens", pa.list_(pa.int32())),
        pa.field("doc_ids", pa.list_(pa.string())),
        pa.field("doc_offsets", pa.list_(pa.int32())),
        pa.field("n_tokens", pa.int32()),
    ]
)


def _list(values: pa.Array, offsets: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def assemble_rows(
    rows: list[list[Piece]],
    item_doc: np.ndarray,
    doc_starts: np.ndarray,
    tokens: np.ndarray,
    labels: np.ndarray,
    doc_ids: pa.Array,
    seq_len: int,
    pad_id: int,
    mask_piece_start: bool = True,
) -> pa.RecordBatch:
    """`item_doc[i]` is the document of item i; document d's tokens are `tokens[doc_starts[d]:...]`."""
    n_rows = len(rows)
    counts = np.fromiter(map(len, rows), dtype=np.int64, count=n_rows)
    n_pieces = int(counts.sum())
    piece_row = np.repeat(np.arange(n_rows, dtype=np.int64), counts)
    flat = np.fromiter((v for row in rows for piece in row for v in piece), dtype=np.int64, count=3 * n_pieces)
    piece_item, piece_offset, piece_len = flat[0::3], flat[1::3], flat[2::3]
    piece_doc = item_doc[piece_item]
    piece_src = doc_starts[piece_doc] + piece_offset

    used = np.bincount(piece_row, weights=piece_len, minlength=n_rows).astype(np.int64)
    pad_len = seq_len - used
    if (pad_len < 0).any():
        raise ValueError("a packed row is longer than seq_len")  # a packing bug, never bad input
    # Padding is one more piece per row, read from a block of pad tokens appended to the source arrays.
    pad_src = len(tokens)
    padded = np.flatnonzero(pad_len)
    all_row = np.concatenate([piece_row, padded])
    all_src = np.concatenate([piece_src, np.full(len(padded), pad_src, dtype=np.int64)])
    all_len = np.concatenate([piece_len, pad_len[padded]])
    is_real = np.concatenate([np.ones(n_pieces, dtype=bool), np.zeros(len(padded), dtype=bool)])
    order = np.argsort(all_row, kind="stable")  # each row's padding after its pieces
    all_src, all_len, is_real = all_src[order], all_len[order], is_real[order]

    starts = np.zeros(len(all_len), dtype=np.int64)
    np.cumsum(all_len[:-1], out=starts[1:])
    total = n_rows * seq_len
    within = np.arange(total, dtype=np.int64) - np.repeat(starts, all_len)
    gather = np.repeat(all_src, all_len) + within

    src_tokens = np.concatenate([tokens, np.full(seq_len, pad_id, dtype=np.int32)])
    src_labels = np.concatenate([labels, np.full(seq_len, IGNORE_INDEX, dtype=np.int32)])
    input_ids = src_tokens[gather]
    row_labels = src_labels[gather]
    if mask_piece_start:
        row_labels[starts[is_real]] = IGNORE_INDEX
    position_ids = within.astype(np.int32)

    row_offsets = np.arange(0, total + 1, seq_len, dtype=np.int64)
    piece_offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=piece_offsets[1:])
    return pa.RecordBatch.from_arrays(
        [
            _list(pa.array(input_ids, pa.int32()), row_offsets),
            _list(pa.array(row_labels, pa.int32()), row_offsets),
            _list(pa.array(position_ids, pa.int32()), row_offsets),
            _list(pa.array(piece_len.astype(np.int32)), piece_offsets),
            _list(doc_ids.take(pa.array(piece_doc)), piece_offsets),
            _list(pa.array(piece_offset.astype(np.int32)), piece_offsets),
            pa.array(used.astype(np.int32)),
        ],
        schema=PACKED_SCHEMA,
    )
