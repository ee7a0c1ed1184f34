"""Held-out measurements that need no benchmark: perplexity and bits per byte on a packed validation split,
a classifier's metrics on its validation split, and replies to held-out instructions scored against
their references (exact match, ROUGE-L, BLEU) and by a reward.

Perplexity is the training objective's own validation (tasks/train/objectives.py CausalLM): packed rows
keep their documents apart (position_ids restart at each document, so the model attends within a
document only), and the first token of a document is never a target. Classification is the training
objective's confusion matrix and `classification_metrics`. So a model scores here what its training run
reported on the same split, over every row rather than the `eval_batches` the run looked at.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Any

from tasks.artifacts import Artifact
from tasks.stage import StageInputError

_MODELS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def load_model(model_dir: str, auto_class: str, dtype: str, device: str) -> Any:
    """A transformers model in eval mode, once per process (units in threads of one worker share it)."""
    import torch

    from tasks.tokenize.hf import from_transformers
    from tasks.train.model import model_identity

    key = (model_dir, str(model_identity(model_dir)), auto_class, dtype, device)
    with _LOCK:
        if key not in _MODELS:
            (cls,) = from_transformers(auto_class)
            model = cls.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
            if len(_MODELS) >= 2:
                _MODELS.clear()
            _MODELS[key] = model
        return _MODELS[key]


def load_split(data: Artifact, split: str = "validation") -> Any:
    """One split of a dataset artifact's Hugging Face DatasetDict (`hf/`)."""
    import datasets

    from tasks.tokenize.hf import local_directory

    rel = (data.manifest.get("hf_dataset") or {}).get("path", "hf")
    path = os.path.join(local_directory(data.path) if "://" in data.path else data.path, rel)
    if not os.path.isdir(path):
        raise StageInputError("data_from", f"{data.path} has no Hugging Face dataset ({rel}/)")
    dd = datasets.load_from_disk(path)
    if split not in dd:
        raise StageInputError("data_from", f"{data.path} has no {split} split (its splits: {', '.join(dd)})")
    return dd[split]


# --------------------------------------------------------------------------------------------------
# perplexity and bits per byte


@dataclass
class Perplexity:
    loss: float  # nats per predicted token
    tokens: int
    bytes: int | None  # UTF-8 bytes the predicted tokens decode to (None: no tokenizer to decode with)
    rows: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    @property
    def bits_per_byte(self) -> float | None:
        if not self.bytes:
            return None
        return self.loss * self.tokens / math.log(2) / self.bytes


def target_runs(labels: list[int], ignore: int) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive predicted positions (a document's tokens after its first, less
    any masked prompt or padding)."""
    runs, start = [], None
    for i, y in enumerate(labels):
        if y != ignore and start is None:
            start = i
        elif y == ignore and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(labels)))
    return runs


def perplexity(model: Any, split: Any, batch_size: int, tokenizer: Any | None, progress: Any = None) -> Perplexity:
    """The mean negative log-likelihood of every token a document may predict in the split, and the bytes
    those tokens spell (decoded run by run, special tokens spelling nothing)."""
    import torch

    from tasks.tokenize.stage import IGNORE_INDEX
    from tasks.train.data import PackedRows
    from tasks.train.objectives import CausalLM

    try:
        rows = PackedRows(split)
    except ValueError as e:
        raise StageInputError("data_from", str(e)) from None
    vocab = model.get_input_embeddings().weight.shape[0]
    if rows.n and int(rows.input_ids.max()) >= vocab:
        raise StageInputError(
            "data_from",
            f"the data has token id {int(rows.input_ids.max())}, the model's vocabulary {vocab} ids: the data was "
            "tokenized with another tokenizer than the model's",
        )
    objective = CausalLM(None, tokenizer, {})
    loss_sum, tokens, nbytes = 0.0, 0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, rows.n, batch_size):
            batch = rows.batch(torch.arange(start, min(start + batch_size, rows.n)))
            sums = objective.eval_sums(model, {k: v.to(device) for k, v in batch.items()})
            loss_sum += float(sums["loss_sum"])
            tokens += int(sums["tokens"])
            if tokenizer is not None:
                for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
                    for a, b in target_runs(labels, IGNORE_INDEX):
                        nbytes += len(tokenizer.decode(ids[a:b], skip_special_tokens=True).encode("utf-8"))
            if progress:
                progress(min(start + batch_size, rows.n) / max(rows.n, 1), f"{min(start + batch_size, rows.n)} rows")
    return Perplexity(loss_sum / max(tokens, 1), tokens, nbytes if tokenizer is not None else None, rows.n)


# --------------------------------------------------------------------------------------------------
# classification


@dataclass
class ClassifierResult:
    metrics: dict[str, Any]  # classification_metrics: accuracy, f1 (macro), per-class, confusion
    labels: list[int]
    predicted: list[int]


def check_labels(model: Any, names: list[str], where: str) -> None:
    id2label = getattr(model.config, "id2label", None) or {}
    have = [id2label.get(i, id2label.get(str(i))) for i in range(len(id2label))]
    if have != names:
        raise StageInputError(
            where,
            f"the classifier's labels {have} are not the dataset's {names}: it was trained on other labels "
            "(or in another order), so its predictions cannot be scored against these",
        )


def classify(model: Any, split: Any, names: list[str], batch_size: int, progress: Any = None) -> ClassifierResult:
    """Predictions over the whole split; the confusion matrix [true, predicted] and the metrics the
    training objective reports from it."""
    import torch

    from tasks.train.data import LabelledRows
    from tasks.train.objectives import classification_metrics

    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    try:
        rows = LabelledRows(split, pad)
    except ValueError as e:
        raise StageInputError("data_from", str(e)) from None
    if rows.n and int(rows.labels.max()) >= len(names):
        raise StageInputError("data_from", f"a label id {int(rows.labels.max())} is outside the {len(names)} labels")
    device = next(model.parameters()).device
    labels, predicted = [], []
    with torch.no_grad():
        for start in range(0, rows.n, batch_size):
            batch = rows.batch(torch.arange(start, min(start + batch_size, rows.n)))
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            predicted += model(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
            if progress:
                progress(min(start + batch_size, rows.n) / max(rows.n, 1), f"{min(start + batch_size, rows.n)} rows")
    k = len(names)
    pairs = torch.tensor(labels, dtype=torch.long) * k + torch.tensor(predicted, dtype=torch.long)
    confusion = torch.bincount(pairs, minlength=k * k).reshape(k, k)
    return ClassifierResult(classification_metrics(confusion, names), labels, predicted)


# --------------------------------------------------------------------------------------------------
# generation on held-out instructions


@dataclass
class Instruction:
    id: str
    prompt: list[dict[str, str]]  # the conversation up to the reply
    reference: str  # the reference reply


def instruction_of(doc_id: str, meta: dict[str, Any]) -> Instruction | None:
    """An sft_ingest document as (prompt, reference): the last assistant turn is the reference."""
    from tasks.tokenize.sft import as_messages

    example = meta.get("sft")
    if not isinstance(example, dict):
        return None
    messages = as_messages(example)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0 or messages[last - 1]["role"] != "user":
        return None
    return Instruction(doc_id, messages[:last], messages[last]["content"])


def greedy_replies(
    model: Any, tok: Any, texts: list[str], max_new_tokens: int, batch_size: int, progress: Any = None
) -> list[tuple[str, str]]:
    """(reply, finished) per rendered prompt, greedy: the same replies on every run."""
    from tasks.prefs.generate import generate_batches

    replies = generate_batches(model, tok, texts, batch_size, progress, do_sample=False, max_new_tokens=max_new_tokens)
    return [(reply, finished) for reply, finished, _ in replies]


def exact_match(reply: str, reference: str) -> bool:
    """Equal once surrounding whitespace and runs of whitespace are disregarded."""
    return " ".join(reply.split()) == " ".join(reference.split())


def text_metrics(replies: list[str], references: list[str]) -> dict[str, Any]:
    """Exact match and ROUGE-L F1 (Google's rouge_score) per reply and on average, and corpus BLEU
    (sacrebleu, 0-100)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    exact = [exact_match(r, ref) for r, ref in zip(replies, references)]
    rouge = [scorer.score(ref, r)["rougeL"].fmeasure for r, ref in zip(replies, references)]
    bleu = sacrebleu.corpus_bleu(replies, [references]).score if replies else 0.0
    n = max(len(replies), 1)
    return {
        "exact": exact,
        "rouge_l_each": rouge,
        "exact_match": sum(exact) / n,
        "rouge_l": sum(rouge) / n,
        "bleu": bleu,
    }


def reward_scores(
    reward: Any, inputs: list[Artifact], prompts: list[list[dict[str, str]]], replies: list[str], device: str, bs: int
) -> list[float | Exception]:
    """A score per reply from the configured reward: a rule, a function (`module:function(prompt, reply)`)
    or a reward model; the score stage's own pieces (tasks/prefs/score.py)."""
    from tasks.artifacts import pick
    from tasks.prefs.score import check_reward_model, load_function, load_reward_model, reward_model_scores

    if reward.rule is not None or reward.function is not None:
        fn = reward.rule if reward.rule is not None else load_function(reward.function)
        out: list[float | Exception] = []
        for p, r in zip(prompts, replies):
            try:
                value = float(fn(p, r))
                out.append(value if math.isfinite(value) else ValueError(f"the reward is {value}"))
            except Exception as e:  # one reply's failure is that reply's, counted
                out.append(e)
        return out
    rm = pick(inputs, "reward_model", ("train",))
    path = rm.path if rm is not None else reward.reward_model_path
    check_reward_model(path, "generation.reward")
    model, tok = load_reward_model(path, "gpu" if device == "cuda" else "cpu")
    return list(reward_model_scores(model, tok, prompts, replies, reward.template, reward.max_length, bs))
