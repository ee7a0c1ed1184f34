"""Training objectives: what a run optimises. Each is a data view, a loss and its validation metrics;
the recipe's loop is the same for all of them (tasks/train/recipe.py).

An objective's `eval_sums` returns tensors that add up over batches and ranks (a loss sum and a
count, a confusion matrix), so one all-reduce gives exact metrics over the whole validation pass.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from tasks.train.data import IGNORE_INDEX, LabelledRows, PackedRows


class Objective:
    name: ClassVar[str]
    auto_class: ClassVar[str] = "AutoModelForCausalLM"  # the transformers class the model is built with
    peft_task: ClassVar[str] = "CAUSAL_LM"

    def __init__(self, cfg: Any, tokenizer: Any, dataset_info: dict[str, Any]):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.info = dataset_info  # the dataset artifact's manifest fields the objective needs

    def rows(self, split: Any) -> Any:
        raise NotImplementedError

    def model_kwargs(self) -> dict[str, Any]:
        """Config values the model is built with (a classifier's labels)."""
        return {}

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of one micro batch, and metrics to log beside it (averaged like the loss)."""
        raise NotImplementedError

    def eval_sums(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def eval_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, Any]:
        raise NotImplementedError

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].numel())


class CausalLM(Objective):
    """Next-token prediction over packed rows; `sft` is the same loss where pack masked the prompts."""

    name = "causal_lm"

    def rows(self, split: Any) -> PackedRows:
        return PackedRows(split)

    def _token_losses(
        self, model: Any, batch: dict[str, torch.Tensor], smoothing: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        logits = logits[:, :-1].float()  # position t predicts token t+1
        labels = batch["labels"][:, 1:]
        losses = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            label_smoothing=smoothing,
            reduction="sum",
        )
        return losses, (labels != IGNORE_INDEX).sum()

    def loss(self, model, batch):
        total, n = self._token_losses(model, batch, self.cfg.label_smoothing)
        return total / n.clamp(min=1), {}

    def eval_sums(self, model, batch):
        total, n = self._token_losses(model, batch, 0.0)
        return {"loss_sum": total.detach().double(), "tokens": n.double()}

    def eval_metrics(self, sums):
        loss = float(sums["loss_sum"] / sums["tokens"].clamp(min=1))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


class Classification(Objective):
    """A sequence classifier over labelled rows; accuracy, macro-F1, per-class precision / recall and the
    confusion matrix at every validation."""

    name = "classification"
    auto_class = "AutoModelForSequenceClassification"
    peft_task = "SEQ_CLS"

    @property
    def labels(self) -> list[str]:
        return list(self.info["labels"])

    def rows(self, split: Any) -> LabelledRows:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return LabelledRows(split, 0 if pad is None else pad)

    def model_kwargs(self) -> dict[str, Any]:
        names = self.labels
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
            "problem_type": "single_label_classification",
            "pad_token_id": pad,
        }

    def _logits(self, model, batch) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    def loss(self, model, batch):
        logits = self._logits(model, batch)
        loss = F.cross_entropy(
            logits, batch["labels"], ignore_index=IGNORE_INDEX, label_smoothing=self.cfg.label_smoothing
        )
        accuracy = (logits.argmax(-1) == batch["labels"]).double().mean()
        return loss, {"accuracy": accuracy.detach()}

    def eval_sums(self, model, batch):
        logits = self._logits(model, batch)
        labels = batch["labels"]
        valid = labels != IGNORE_INDEX
        k = len(self.labels)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        pairs = labels[valid] * k + logits.argmax(-1)[valid]  # confusion[true, predicted]
        confusion = torch.bincount(pairs, minlength=k * k).reshape(k, k)
        return {"loss_sum": loss.detach().double(), "rows": valid.sum().double(), "confusion": confusion.double()}

    def eval_metrics(self, sums):
        return classification_metrics(
            sums["confusion"].long().cpu(), self.labels, float(sums["loss_sum"] / sums["rows"].clamp(min=1))
        )


def classification_metrics(confusion: torch.Tensor, names: list[str], loss: float | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision / recall / F1 from a confusion matrix [true, predicted].
    A class never predicted has precision 0, a class absent from the data recall 0 (scikit-learn's
    zero_division=0)."""
    c = confusion.double()
    tp = c.diag()
    predicted, actual = c.sum(0), c.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    total = float(c.sum())
    out: dict[str, Any] = {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "f1": float(f1.mean()),
    }
    if loss is not None:
        out = {"loss": loss, **out}
    for i, name in enumerate(names):
        out[f"precision/{name}"] = float(precision[i])
        out[f"recall/{name}"] = float(recall[i])
        out[f"f1/{name}"] = float(f1[i])
    out["confusion"] = confusion.tolist()
    return out


OBJECTIVES: dict[str, type[Objective]] = {"causal_lm": CausalLM, "sft": CausalLM, "classification": Classification}


def objective_for(cfg: Any, tokenizer: Any, dataset_info: dict[str, Any]) -> Objective:
    return OBJECTIVES[cfg.objective](cfg, tokenizer, dataset_info)
