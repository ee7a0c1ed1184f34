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

from tasks.train.data import IGNORE_INDEX, LabelledRows, PackedRows, PreferenceRows, full_pass


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

    def prepare(self, recipe: Any) -> None:
        """Called once the engine holds the starting weights, before a checkpoint is loaded into it (DPO
        computes its reference log-probabilities here). Default: nothing."""


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


class _Preference(Objective):
    """Shared by the preference objectives: log-probabilities of whole replies under the model."""

    def rows(self, split: Any) -> PreferenceRows:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return PreferenceRows(split, 0 if pad is None else pad)

    @staticmethod
    def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the reply tokens' log-probabilities, number of reply tokens) per row."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logits = logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        token_logps = -F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        n = (labels != IGNORE_INDEX).sum(-1)
        return token_logps.sum(-1), n

    @property
    def pref(self) -> Any:
        return self.cfg.preference

    def pair_terms(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model, batch):
        t = self.pair_terms(model, batch)
        return t["losses"].mean(), {
            k: t[k].detach().double().mean() for k in ("margin", "accuracy", "chosen_logps", "rejected_logps")
        }

    def eval_sums(self, model, batch):
        t = self.pair_terms(model, batch)
        v = batch["valid"].double()
        sums = {
            k: (t[k].detach().double() * v).sum()
            for k in ("losses", "margin", "accuracy", "chosen_logps", "rejected_logps")
        }
        return {**sums, "pairs": v.sum()}

    def eval_metrics(self, sums):
        n = sums["pairs"].clamp(min=1)
        return {
            "loss": float(sums["losses"] / n),
            "margin": float(sums["margin"] / n),
            "accuracy": float(sums["accuracy"] / n),
            "chosen_logps": float(sums["chosen_logps"] / n),
            "rejected_logps": float(sums["rejected_logps"] / n),
        }

    def tokens(self, batch):
        return int(batch["attention_mask"].sum())


def simpo_loss(
    avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, beta: float, gamma: float, label_smoothing: float = 0.0
) -> torch.Tensor:
    """SimPO (Meng et al. 2024): -log sigmoid(beta * (mean log p(chosen) - mean log p(rejected)) - gamma),
    the log-probabilities averaged over the reply's tokens; no reference model."""
    x = beta * (avg_chosen - avg_rejected) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * ((log p - log p_ref)(chosen) - (log p - log p_ref)(rejected))),
    summed log-probabilities; with label smoothing, the conservative DPO of Mitchell (2023)."""
    x = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


class SimPO(_Preference):
    name = "simpo"

    def pair_terms(self, model, batch):
        s, n = self.sequence_logps(model, batch)
        b = len(s) // 2
        avg = s / n.clamp(min=1)
        c, r = avg[:b], avg[b:]
        beta, gamma = self.pref.resolved_beta("simpo"), self.pref.resolved_gamma()
        losses = simpo_loss(c, r, beta, gamma, self.pref.label_smoothing)
        if self.pref.sft_weight:  # the chosen reply's NLL per token: CPO's term, off unless asked
            losses = losses - self.pref.sft_weight * c
        return {
            "losses": losses,
            "margin": beta * (c - r),
            "accuracy": (c > r).double(),
            "chosen_logps": c,
            "rejected_logps": r,
        }


class DPO(_Preference):
    """The reference is the starting model: its log-probabilities of every pair are computed once, before
    the first step, and kept beside the checkpoints (a resumed run reads them back). Under LoRA the
    starting model is the base model with the adapter at zero, so this is the adapter-disabled model."""

    name = "dpo"
    REFERENCE_FILE = "reference_logps.safetensors"

    def pair_terms(self, model, batch):
        s, _ = self.sequence_logps(model, batch)
        b = len(s) // 2
        c, r = s[:b], s[b:]
        if "ref_chosen" not in batch:
            raise RuntimeError("DPO needs the reference log-probabilities (prepare was not run)")
        beta = self.pref.resolved_beta("dpo")
        ref_c, ref_r = batch["ref_chosen"].to(c.dtype), batch["ref_rejected"].to(c.dtype)
        losses = dpo_loss(c, r, ref_c, ref_r, beta, self.pref.label_smoothing)
        rc, rr = beta * (c - ref_c), beta * (r - ref_r)
        return {
            "losses": losses,
            "margin": rc - rr,
            "accuracy": (rc > rr).double(),
            "chosen_logps": c,
            "rejected_logps": r,
        }

    def prepare(self, recipe: Any) -> None:
        import os

        import torch.distributed as dist
        from safetensors.torch import load_file, save_file

        path = os.path.join(recipe.ckpt_dir, self.REFERENCE_FILE)
        splits = {"train": recipe.train_rows, "validation": recipe.val_rows}
        if os.path.exists(path):
            saved = load_file(path)
            for name, rows in splits.items():
                if rows is not None:
                    rows.ref = saved[name].double()
            return
        engine = recipe.engine
        engine.eval()
        for rows in splits.values():
            if rows is None:
                continue
            ref = torch.zeros((rows.n, 2), dtype=torch.float64, device=engine.device)
            with torch.no_grad():  # every rank the same number of batches: ZeRO-3's forward is collective
                for idx, valid in full_pass(rows.n, recipe.cfg.micro_batch_size, recipe.rank, recipe.world):
                    batch = recipe._to_device(rows.batch(idx, valid))
                    s, _ = self.sequence_logps(engine, batch)
                    b = len(s) // 2
                    keep = valid.to(engine.device)
                    ref[idx.to(engine.device)[keep], 0] = s[:b][keep].double()
                    ref[idx.to(engine.device)[keep], 1] = s[b:][keep].double()
            dist.all_reduce(ref)  # each pair was computed by exactly one rank
            rows.ref = ref.cpu()
        engine.train()
        if recipe.rank == 0:
            os.makedirs(recipe.ckpt_dir, exist_ok=True)
            tensors = {name: rows.ref.contiguous() for name, rows in splits.items() if rows is not None}
            save_file(tensors, path + ".tmp")
            os.replace(path + ".tmp", path)
            recipe.emit("reference", pairs=sum(r.n for r in splits.values() if r is not None), path=path)
        dist.barrier()


class RewardModel(_Preference):
    """A reward model: a sequence classifier with one output, trained Bradley-Terry style on preference
    pairs, -log sigmoid(r(chosen) - r(rejected)). Held-out pairwise accuracy at every validation; the
    export loads with AutoModelForSequenceClassification and scores candidates in the score stage."""

    name = "reward"
    auto_class = "AutoModelForSequenceClassification"
    peft_task = "SEQ_CLS"

    def model_kwargs(self) -> dict[str, Any]:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return {"num_labels": 1, "pad_token_id": pad}

    def pair_terms(self, model, batch):
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
        b = len(rewards) // 2
        c, r = rewards[:b], rewards[b:]
        return {
            "losses": -F.logsigmoid(c - r),
            "margin": c - r,
            "accuracy": (c > r).double(),
            "chosen_logps": c,
            "rejected_logps": r,
        }

    def eval_metrics(self, sums):
        out = super().eval_metrics(sums)
        # for a reward model the two "log-prob" terms are the mean rewards of the chosen and rejected replies
        out["chosen_reward"], out["rejected_reward"] = out.pop("chosen_logps"), out.pop("rejected_logps")
        return out


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


OBJECTIVES: dict[str, type[Objective]] = {
    "causal_lm": CausalLM,
    "sft": CausalLM,
    "classification": Classification,
    "simpo": SimPO,
    "dpo": DPO,
    "reward": RewardModel,
}


def objective_for(cfg: Any, tokenizer: Any, dataset_info: dict[str, Any]) -> Objective:
    return OBJECTIVES[cfg.objective](cfg, tokenizer, dataset_info)
