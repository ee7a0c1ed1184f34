"""The rows a training run reads, as tensors, and the order every rank agrees on.

Batches are addressed by a global micro-batch number: epoch and position follow from it, so a run
resumed at step N reads exactly what the uninterrupted run would have read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tasks.tokenize.stage import IGNORE_INDEX


def _matrix(column: Any) -> torch.Tensor:
    # packed rows all have seq_len tokens: one (rows, seq_len) array, never a list of arrays
    arr = column if isinstance(column, np.ndarray) and column.dtype != object else np.stack(list(column))
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))


class Sampler:
    """A fresh permutation per epoch (seeded), cut into micro batches; rank r takes the r-th slice of
    every `micro * world` rows."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def indices(self, global_index: int, micro: int, rank: int, world: int) -> torch.Tensor:
        per = micro * world
        per_epoch = max(self.n // per, 1)
        epoch, within = divmod(global_index, per_epoch)
        start = within * per + rank * micro
        return self.order(epoch)[torch.arange(start, start + micro) % self.n]


def full_pass(n: int, micro: int, rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every row once, spread over the ranks: (indices, valid) per micro batch. Every rank gets the same
    number of batches (ZeRO-3's forward is collective); slots past the end repeat row 0, marked invalid."""
    per = micro * world
    batches = []
    for start in range(0, n, per):
        idx = torch.arange(start + rank * micro, start + rank * micro + micro)
        valid = idx < n
        batches.append((torch.where(valid, idx, torch.zeros_like(idx)), valid))
    return batches


class PackedRows:
    """A packed split (pack's output: input_ids, labels, position_ids of seq_len tokens each)."""

    def __init__(self, split):
        cols = [c for c in ("input_ids", "labels", "position_ids") if c in split.column_names]
        if "input_ids" not in cols:
            raise ValueError("the dataset has no input_ids column: is it the pack stage's output?")
        table = split.with_format("numpy", columns=cols)
        self.input_ids = _matrix(table["input_ids"])
        n, s = self.input_ids.shape
        self.labels = _matrix(table["labels"]) if "labels" in cols else self.input_ids.clone()
        self.position_ids = (
            _matrix(table["position_ids"]) if "position_ids" in cols else torch.arange(s).expand(n, s).clone()
        )
        # The first token of every document is never a target: with the shift inside the loss it would be
        # "predicted" from the previous document's last token, which the model must not see.
        self.labels = self.labels.masked_fill(self.position_ids == 0, IGNORE_INDEX)
        self.n, self.seq_len = n, s

    def batch(self, idx: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        labels = self.labels[idx]
        if valid is not None:
            labels = labels.masked_fill(~valid[:, None], IGNORE_INDEX)
        return {"input_ids": self.input_ids[idx], "labels": labels, "position_ids": self.position_ids[idx]}


class LabelledRows:
    """A classification split (classify_tokenize's output: input_ids of any length, an integer label),
    right-padded per batch to its longest row."""

    def __init__(self, split, pad_id: int):
        if "input_ids" not in split.column_names or "label" not in split.column_names:
            raise ValueError("the dataset has no input_ids / label columns: is it classify_tokenize's output?")
        self.rows = [np.asarray(r, dtype=np.int64) for r in split["input_ids"]]
        self.labels = torch.tensor(split["label"], dtype=torch.long)
        self.n = len(self.rows)
        self.pad_id = pad_id
        self.seq_len = max((len(r) for r in self.rows), default=0)

    def batch(self, idx: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        rows = [self.rows[i] for i in idx.tolist()]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.from_numpy(r)
            mask[j, : len(r)] = 1
        labels = self.labels[idx]
        if valid is not None:
            labels = labels.masked_fill(~valid, IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PreferenceRows:
    """A preference split (pref_tokenize's output): per pair a chosen and a rejected sequence, each with
    its labels (the prompt masked). A batch of B pairs is 2B rows, the chosen ones first, right-padded to
    the longest; `ref` holds reference log-probabilities per pair when an objective computed them."""

    def __init__(self, split, pad_id: int):
        need = {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
        if not need <= set(split.column_names):
            raise ValueError("the dataset has no chosen / rejected columns: is it pref_tokenize's output?")
        cols = {c: [np.asarray(r, dtype=np.int64) for r in split[c]] for c in need}
        self.chosen = list(zip(cols["chosen_input_ids"], cols["chosen_labels"]))
        self.rejected = list(zip(cols["rejected_input_ids"], cols["rejected_labels"]))
        self.n = len(self.chosen)
        self.pad_id = pad_id
        self.seq_len = max((len(ids) for ids, _ in self.chosen + self.rejected), default=0)
        self.ref: torch.Tensor | None = None  # (n, 2): reference log-probs of (chosen, rejected)

    def batch(self, idx: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pairs = idx.tolist()
        seqs = [self.chosen[i] for i in pairs] + [self.rejected[i] for i in pairs]
        width = max(len(ids) for ids, _ in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, (x, y) in enumerate(seqs):
            ids[j, : len(x)] = torch.from_numpy(x)
            labels[j, : len(y)] = torch.from_numpy(y)
            mask[j, : len(x)] = 1
        ok = torch.ones(len(pairs), dtype=torch.bool) if valid is None else valid.clone()
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "valid": ok}
        if self.ref is not None:
            out["ref_chosen"], out["ref_rejected"] = self.ref[idx, 0], self.ref[idx, 1]
        return out
