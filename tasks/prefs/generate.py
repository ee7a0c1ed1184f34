"""generate: sample candidate replies to prompts from a model.

Inputs: the prompts (the `prompts` stage's documents) and the model, a training run's artifact (slot
`model`, wired by `model_from` or `inputs:`), or else `model_path` (a local directory or a hub name).
One unit per (prompt shard, sample): unit k of a shard draws the k-th reply to each of its prompts with
the seed `seed * 1_000_003 + k`, in batches of `batch_size` left-padded prompts, so a rerun writes the
same candidates whichever worker runs which unit. A reply ends at the model's EOS (`finished: eos`) or
at `max_new_tokens` (`finished: length`); an empty or unfinished reply is kept and marked, and the
pairs stage decides what to do with it.

Runs on the CPU, or on the unit's GPU when `device: auto` finds one (units spread over the task
runner's workers, one model per worker process).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from tasks.artifacts import Artifact, ArtifactWriter, pick, read_unit
from tasks.documents import parse_meta
from tasks.prefs.schema import CANDIDATES_SCHEMA, messages_json
from tasks.stage import Stage, StageConfig, StageInputError
from tasks.tokenize.sft import SftRecordError, render_prompt

_MODELS: dict[tuple[str, str, str], Any] = {}
_LOCK = threading.Lock()
# torch's random generator is one per process: two units sampling at once in threads of one worker would
# draw from it in turns and neither would be reproducible. One unit samples at a time in a process (each
# still uses every core through torch's own threads); processes, Dask or Ray workers run units in parallel.
_SAMPLING = threading.Lock()


class GenerateConfig(StageConfig):
    """How candidates are sampled."""

    execution_fields = StageConfig.execution_fields | {"device"}

    model_from: str | None = Field(None, description="A training section whose model generates (its artifact).")
    model_path: str | None = Field(None, description="Or a local model directory / hub name (needs internet).")
    samples: int = Field(4, ge=1, le=256, description="Candidates per prompt (K).")
    temperature: float = Field(0.8, gt=0, le=10, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens with this mass.")
    max_new_tokens: int = Field(
        128, ge=1, le=1 << 16, description="A reply longer than this is cut (finished: length)."
    )
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description="How a prompt is rendered: the tokenizer's chat template, the Alpaca prompt, or auto."
    )
    seed: int = Field(0, description="Base seed; unit k of a shard samples with seed * 1_000_003 + k.")
    batch_size: int = Field(16, ge=1, description="Prompts generated together (part of what is drawn: fingerprinted).")
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description="auto: a GPU when torch sees one.")

    @model_validator(mode="after")
    def _one_model(self) -> GenerateConfig:
        if self.model_from is not None and self.model_path is not None:
            raise ValueError("set model_from (a training section) or model_path, not both")
        return self


def load_causal_lm(path: str, device: str) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer), loaded once per process and device."""
    import torch

    from tasks.tokenize.hf import from_transformers

    AutoModelForCausalLM, AutoTokenizer = from_transformers("AutoModelForCausalLM", "AutoTokenizer")
    dev = "cuda" if device == "gpu" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    key = (os.path.abspath(path) if os.path.isdir(path) else path, dev, str(_stamp(path)))
    with _LOCK:
        if key not in _MODELS:
            tok = AutoTokenizer.from_pretrained(path)
            dtype = torch.bfloat16 if dev == "cuda" else torch.float32
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
            if len(_MODELS) > 4:
                _MODELS.clear()
            _MODELS[key] = (model, tok)
        return _MODELS[key]


def _stamp(path: str) -> Any:
    if not os.path.isdir(path):
        return None
    return sorted((n, os.path.getmtime(os.path.join(path, n))) for n in os.listdir(path) if n.endswith(".safetensors"))


def model_directory(inputs: list[Artifact], cfg: Any, field: str = "model_path") -> str:
    """Where the generating model is: the `model` input's artifact, or the configured path."""
    art = pick(inputs, "model", ("train",))
    if art is not None:
        from tasks.tokenize.hf import local_model_directory

        return local_model_directory(art.path)
    path = getattr(cfg, field)
    if path is None:
        raise StageInputError(field, "no model: wire a training section (model_from) or set a model path")
    return path


def sample_replies(
    model: Any, tok: Any, texts: list[str], cfg: GenerateConfig, seed: int
) -> list[tuple[str, str, int]]:
    """(reply, finished, tokens) for each prompt text: left-padded batches, sampling seeded once per call."""

    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    with _SAMPLING:
        return _sample(model, tok, texts, cfg, seed)


def _sample(model: Any, tok: Any, texts: list[str], cfg: GenerateConfig, seed: int) -> list[tuple[str, str, int]]:
    import torch

    torch.manual_seed(seed)
    return generate_batches(
        model,
        tok,
        texts,
        cfg.batch_size,
        do_sample=True,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
    )


def generate_batches(
    model: Any, tok: Any, texts: list[str], batch_size: int, progress: Any = None, **settings: Any
) -> list[tuple[str, str, int]]:
    """(reply, finished: eos | length, tokens) per rendered prompt: batches of left-padded prompts (each
    encoded as training encodes it: `encode_prompt`) through `model.generate(**settings)`, which stops
    a reply at the tokenizer's EOS. `progress(fraction, message)` after each batch."""
    import torch

    from tasks.prefs.tokenize import encode_prompt

    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    device = next(model.parameters()).device
    out: list[tuple[str, str, int]] = []
    for start in range(0, len(texts), batch_size):
        rows = [encode_prompt(tok, t) for t in texts[start : start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):  # left padding: every row continues from its last real token
            ids[j, width - len(r) :] = torch.tensor(r)
            mask[j, width - len(r) :] = 1
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id,
                **settings,
            )
        for row in gen[:, width:].tolist():
            if eos is not None and eos in row:
                row, finished = row[: row.index(eos)], "eos"
            else:
                finished = "length"
            out.append((tok.decode(row, skip_special_tokens=True), finished, len(row)))
        if progress:
            progress(len(out) / max(len(texts), 1), f"{len(out)}/{len(texts)} replies")
    return out


class GenerateStage(Stage):
    name = "generate"
    version = 1
    Config = GenerateConfig

    def bindings(self, cfg: GenerateConfig) -> dict[str, str | None]:
        return {"model": cfg.model_from}

    def sources(self, cfg: GenerateConfig) -> Any:
        from tasks.train.model import model_identity

        if cfg.model_path is None:
            return None
        if not os.path.isdir(cfg.model_path) and "/" not in cfg.model_path:
            raise StageInputError("model_path", f"no such model directory: {cfg.model_path!r}")
        return {"model": model_identity(cfg.model_path) or cfg.model_path}

    def plan(self, inputs: list[Artifact], cfg: GenerateConfig) -> list[dict[str, Any]]:
        prompts = pick(inputs, "prompts", ("prompts",))
        if prompts is None:
            raise StageInputError("inputs", "generate reads prompts: the prompts stage's output")
        model_directory(inputs, cfg)
        i = inputs.index(prompts)
        return [{"input": i, "shard": s, "sample": k} for s in range(len(prompts.shards())) for k in range(cfg.samples)]

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: GenerateConfig, out: ArtifactWriter) -> None:
        model, tok = load_causal_lm(model_directory(inputs, cfg), cfg.device)
        k = unit["sample"]
        ids, prompts, texts = [], [], []
        for batch in read_unit(inputs[unit["input"]], unit, ["id", "meta"], stats=out.stats):
            for doc_id, raw in zip(batch.column("id").to_pylist(), batch.column("meta").to_pylist()):
                messages = parse_meta(raw).get("prompt")
                if not messages:
                    out.reject(
                        "no_prompt",
                        "the document's meta has no prompt (is it the prompts stage's output?)",
                        id=doc_id,
                        meta=raw,
                    )
                    continue
                try:
                    texts.append(render_prompt(messages, tok, cfg.template))
                except SftRecordError as e:
                    out.reject(e.reason, e.detail, id=doc_id, meta=raw)
                    continue
                ids.append(doc_id)
                prompts.append(messages_json(messages))
        replies = []
        for start in range(0, len(texts), 64):  # progress between slices; one seed draw per unit keeps it reproducible
            replies += sample_replies(
                model, tok, texts[start : start + 64], cfg, cfg.seed * 1_000_003 + k + 7919 * start
            )
            out.progress(len(replies) / max(len(texts), 1), f"sample {k}: {len(replies)}/{len(texts)} prompts")
        if not replies:
            return
        out.write(
            pa.RecordBatch.from_pydict(
                {
                    "id": [f"{i}#{k}" for i in ids],
                    "prompt_id": ids,
                    "sample": [k] * len(ids),
                    "prompt": prompts,
                    "reply": [r[0] for r in replies],
                    "finished": [r[1] for r in replies],
                    "n_tokens": [r[2] for r in replies],
                },
                schema=CANDIDATES_SCHEMA,
            )
        )
        out.count("unfinished", sum(r[1] == "length" for r in replies))
        out.count("empty_replies", sum(not r[0] for r in replies))
        out.count("generated_tokens", sum(r[2] for r in replies))
