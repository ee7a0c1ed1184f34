"""The training worker: one process per rank, started by torchrun or the DeepSpeed launcher.

    python -m tasks.train.worker --spec RUN.json

RUN.json holds the TrainConfig, the DeepSpeed config, and the paths: the packed dataset
(a DatasetDict saved with save_to_disk: train / validation with input_ids, labels, position_ids),
the tokenizer directory, and the output directory (the artifact being built: the final model, the
tokenizer, metrics, TensorBoard logs, and `checkpoints/`, from which a rerun resumes).

Rank 0 prints one JSON object per line for the launcher (`{"kiln": "train", ...}`); every rank prints
its errors the same way, so the task can fail with the failing rank's message.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import traceback
from typing import Any

EXIT_NAN = 3


class NonFiniteLoss(RuntimeError):
    pass


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout, written with a single write(): every rank shares torchrun's output pipe,
    and print() writes the text and its newline separately, so two ranks' lines could run together."""
    data = (json.dumps({"kiln": event, **fields}, default=float) + "\n").encode()
    sys.stdout.flush()
    fd = sys.stdout.fileno()
    while data:
        data = data[os.write(fd, data):]


# --------------------------------------------------------------------------------------------------
# model


def build_model(cfg, tokenizer_dir: str | None, device_dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else None
    m = cfg.model
    if m.init is not None:
        init = dict(m.init)
        model_type = init.pop("model_type", "llama")
        if tok is not None:
            init.setdefault("vocab_size", len(tok))
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if getattr(tok, name, None) is not None:
                    init.setdefault(name, getattr(tok, name))
        init.setdefault("max_position_embeddings", max(cfg.seq_len or 0, 2048))
        config = AutoConfig.for_model(model_type, **init)
        config._attn_implementation = m.attn_implementation
        torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
        model = AutoModelForCausalLM.from_config(config, attn_implementation=m.attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            m.name_or_path, attn_implementation=m.attn_implementation, dtype=device_dtype
        )
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return wrap_method(model, cfg.method), tok


def wrap_method(model, method):
    if method.method == "full":
        return model
    from peft import AdaptionPromptConfig, LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

    if method.method == "lora":
        pc = LoraConfig(task_type=TaskType.CAUSAL_LM, r=method.lora_r, lora_alpha=method.lora_alpha,
                        lora_dropout=method.lora_dropout, target_modules=method.target_modules)
    elif method.method == "prefix":
        pc = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=method.prefix_tokens)
    else:
        pc = AdaptionPromptConfig(task_type=TaskType.CAUSAL_LM, adapter_len=method.adapter_len,
                                  adapter_layers=min(method.adapter_layers, model.config.num_hidden_layers))
    return get_peft_model(model, pc)


def model_flops_per_token(model, seq_len: int) -> float:
    """~6N for the dense weights plus 12 * layers * hidden * seq for attention (forward + backward)."""
    cfg = getattr(model, "config", None)
    n = sum(p.numel() for p in model.parameters())
    attn = 0
    if cfg is not None and hasattr(cfg, "num_hidden_layers"):
        attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
    return 6.0 * n + attn


def peak_tflops(launch, device: str) -> float | None:
    if launch.peak_tflops:
        return launch.peak_tflops
    if device != "gpu":
        return None
    import torch

    name = torch.cuda.get_device_name().lower()
    for key, tf in (("h200", 989.0), ("h100", 989.0), ("a100", 312.0), ("l40s", 362.0), ("a10", 125.0)):
        if key in name:
            return tf  # dense bf16
    return None


# --------------------------------------------------------------------------------------------------
# data


class PackedData:
    """A packed split as tensors, and the deterministic order every rank agrees on."""

    def __init__(self, split, seed: int):
        import torch

        cols = [c for c in ("input_ids", "labels", "position_ids") if c in split.column_names]
        if "input_ids" not in cols:
            raise ValueError("the dataset has no input_ids column: is it the pack stage's output?")
        table = split.with_format("numpy", columns=cols)

        def matrix(name: str):
            import numpy as np

            col = table[name]  # packed rows all have seq_len tokens: one (rows, seq_len) array
            arr = col if isinstance(col, np.ndarray) and col.dtype != object else np.stack(list(col))
            return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))

        self.input_ids = matrix("input_ids")
        n, s = self.input_ids.shape
        self.labels = matrix("labels") if "labels" in cols else self.input_ids.clone()
        if "position_ids" in cols:
            self.position_ids = matrix("position_ids")
        else:
            self.position_ids = torch.arange(s).expand(n, s).clone()
        # The first token of every document is never a target: with the shift inside the loss it would be
        # "predicted" from the previous document's last token, which the model must not see.
        self.labels = self.labels.masked_fill(self.position_ids == 0, -100)
        self.n, self.seq_len = n, s
        self.seed = seed

    def order(self, epoch: int):
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def batch(self, global_index: int, micro: int, rank: int, world: int):
        """Micro batch number `global_index` (counted over the whole run) for this rank."""
        per = micro * world
        per_epoch = max(self.n // per, 1)
        epoch, within = divmod(global_index, per_epoch)
        perm = self.order(epoch)
        start = within * per + rank * micro
        idx = perm[torch_arange(start, start + micro) % self.n]
        return self.input_ids[idx], self.labels[idx], self.position_ids[idx]


def torch_arange(a: int, b: int):
    import torch

    return torch.arange(a, b)


# --------------------------------------------------------------------------------------------------
# the loop


def lr_lambda(optim, max_steps: int):
    def f(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        span = max(max_steps - optim.warmup_steps, 1)
        progress = min(max(step - optim.warmup_steps, 0) / span, 1.0)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def latest_checkpoint(ckpt_dir: str) -> str | None:
    path = os.path.join(ckpt_dir, "latest")
    if os.path.exists(path):
        with open(path) as f:
            tag = f.read().strip()
        if os.path.isdir(os.path.join(ckpt_dir, tag)):
            return tag
    return None


def prune_checkpoints(ckpt_dir: str, keep: int) -> None:
    tags = sorted((d for d in os.listdir(ckpt_dir) if d.startswith("step")), key=lambda d: int(d[4:]))
    for tag in tags[:-keep]:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


def train(run: dict[str, Any]) -> int:
    import deepspeed
    import torch
    import torch.distributed as dist
    from datasets import load_from_disk

    from tasks.train.config import TrainConfig

    cfg = TrainConfig.model_validate(run["config"])
    ds_config = run["deepspeed_config"]
    out_dir = run["output_dir"]
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    device = cfg.launch.device
    deepspeed.init_distributed(dist_backend="nccl" if device == "gpu" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "gpu":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))

    data = load_from_disk(run["dataset_dir"])
    train_data = PackedData(data["train"], cfg.seed)
    val_data = PackedData(data["validation"], cfg.seed) if "validation" in data and len(data["validation"]) else None
    if cfg.seq_len is not None and train_data.seq_len != cfg.seq_len:
        raise ValueError(
            f"seq_len: the config says {cfg.seq_len}, the dataset's sequences have {train_data.seq_len} tokens "
            "(pack with the same seq_len, or change train.seq_len)"
        )

    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else (
        torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32)
    model, tokenizer = build_model(cfg, run.get("tokenizer_dir"), dtype)
    if cfg.method.method == "prefix" and rank == 0:
        emit("warning", message="prefix tuning: PEFT's prefix attention mask does not keep packed documents apart; "
                                "use one document per sequence (SFT packing) for exact boundaries")
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    flops_per_token = model_flops_per_token(model, train_data.seq_len)
    peak = peak_tflops(cfg.launch, device)

    optimizer = None
    if "optimizer" not in ds_config:  # CPU: torch AdamW as a client optimizer (no op compilation)
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                      weight_decay=cfg.optim.weight_decay)
    schedule = lr_lambda(cfg.optim, cfg.max_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )

    state = {"step": 0, "best_val": None, "bad_evals": 0, "history": [], "tokens": 0, "stopped": None}
    tag = latest_checkpoint(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    if tag:
        _, client = engine.load_checkpoint(ckpt_dir, tag=tag)
        state.update({k: v for k, v in (client or {}).items() if k in state})  # not DeepSpeed's own keys
        if rank == 0:
            emit("resumed", step=state["step"], tag=tag)

    writer = None
    if rank == 0 and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def record(kind: str, **values: Any) -> None:
        entry = {"kind": kind, "step": state["step"], **values}
        state["history"].append(entry)
        if rank == 0:
            emit(kind, **{k: v for k, v in entry.items() if k != "kind"})
            if writer:
                for k, v in values.items():
                    if isinstance(v, (int, float)) and v is not None:
                        writer.add_scalar(f"{kind}/{k}", v, state["step"])

    def save(final: bool = False) -> None:
        tag = f"step{state['step']}"
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=dict(state))
        if rank == 0:
            prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
            emit("checkpoint", step=state["step"], tag=tag, final=final)

    def to_device(*tensors):
        return [t.to(engine.device) for t in tensors]

    def evaluate() -> float | None:
        if val_data is None:
            return None
        engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=engine.device)
        with torch.no_grad():
            for i in range(cfg.eval_batches):
                ids, labels, pos = to_device(*val_data.batch(i, cfg.micro_batch_size, rank, world))
                out = engine(input_ids=ids, labels=labels, position_ids=pos, use_cache=False)
                n = (labels[:, 1:] != -100).sum()
                total += torch.stack([out.loss.double() * n, n.double()])
        dist.all_reduce(total)
        engine.train()
        return float(total[0] / total[1].clamp(min=1))

    engine.train()
    micro, ga = cfg.micro_batch_size, cfg.grad_accum
    tokens_per_step = micro * ga * world * train_data.seq_len
    t_window, tok_window = time.perf_counter(), 0
    while state["step"] < cfg.max_steps:
        step_loss = torch.zeros(1, dtype=torch.float64, device=engine.device)
        for k in range(ga):
            ids, labels, pos = to_device(*train_data.batch(state["step"] * ga + k, micro, rank, world))
            loss = engine(input_ids=ids, labels=labels, position_ids=pos, use_cache=False).loss
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().double() / ga
        dist.all_reduce(step_loss)
        step_loss /= world
        train_loss = float(step_loss)
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(
                f"loss is {train_loss} at step {state['step'] + 1}; stopping. The last good checkpoint is kept "
                f"in {ckpt_dir} (lower optim.lr, check the data, or use bf16 instead of fp16)"
            )
        state["step"] += 1
        state["tokens"] += tokens_per_step
        tok_window += tokens_per_step
        if state["step"] % cfg.log_every == 0 or state["step"] == cfg.max_steps:
            dt = time.perf_counter() - t_window
            tps = tok_window / dt if dt > 0 else 0.0
            mfu = (tps * flops_per_token / world) / (peak * 1e12) if peak else None
            record("train", loss=train_loss, lr=scheduler.get_last_lr()[0], tokens_per_s=tps, mfu=mfu,
                   tokens=state["tokens"])
            t_window, tok_window = time.perf_counter(), 0
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.max_steps:
            val = evaluate()
            if val is not None:
                record("validation", loss=val, perplexity=math.exp(min(val, 50)))
                if state["best_val"] is None or val < state["best_val"]:
                    state["best_val"], state["bad_evals"] = val, 0
                else:
                    state["bad_evals"] += 1
                    if cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience:
                        state["stopped"] = f"early stopping: no better validation loss in {state['bad_evals']} evaluations"
                        if rank == 0:
                            emit("early_stop", step=state["step"], reason=state["stopped"])
                        break
        if state["step"] % cfg.save_every == 0 and state["step"] < cfg.max_steps:
            save()
    save(final=True)
    export(engine, model, tokenizer, cfg, run, state, rank, n_trainable, n_total)
    if writer:
        writer.close()
    engine.destroy()
    dist.destroy_process_group()
    # Everything this rank had to write is written. The launcher accepts a rank that dies after this line
    # (DeepSpeed's ZeRO-3 ranks now and then abort during interpreter teardown on CPU).
    emit("finished", rank=rank)
    return 0


def export(engine, model, tokenizer, cfg, run, state, rank: int, n_trainable: int, n_total: int) -> None:
    """Consolidate the weights on rank 0 and save them with save_pretrained (safetensors)."""
    import torch.distributed as dist

    out_dir = run["output_dir"]
    if cfg.deepspeed.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # gathered on rank 0, collective
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    if rank == 0:
        module = engine.module
        module_cpu_sd = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in state_dict.items()}
        if cfg.method.method == "full":
            module.save_pretrained(out_dir, state_dict=module_cpu_sd, safe_serialization=True)
        else:
            adapter_dir = os.path.join(out_dir, "adapter")
            module.save_pretrained(adapter_dir, state_dict=module_cpu_sd, safe_serialization=True)
            merged = merged_model(cfg, run, module_cpu_sd)
            if merged is not None:
                merged.save_pretrained(out_dir, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        summary = {
            "steps": state["step"],
            "tokens": state["tokens"],
            "best_validation_loss": state["best_val"],
            "stopped": state["stopped"],
            "trainable_parameters": n_trainable,
            "parameters": n_total,
            "history": state["history"],
        }
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(summary, f, indent=1)
        emit("saved", path=out_dir, steps=state["step"])
    dist.barrier()


def merged_model(cfg, run, peft_state_dict):
    """The base model with the trained adapter folded in, when the method allows it (LoRA; others are
    saved as adapters only, to be loaded with peft)."""
    if cfg.method.method != "lora":
        return None
    import torch

    model, _ = build_model(cfg, run.get("tokenizer_dir"), torch.float32)
    model.load_state_dict(peft_state_dict)
    return model.merge_and_unload()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spec", required=True, help="the run spec (JSON) written by the train stage")
    args = ap.parse_args(argv)
    with open(args.spec) as f:
        run = json.load(f)
    rank = int(os.environ.get("RANK", 0))
    try:
        return train(run)
    except NonFiniteLoss as e:
        emit("error", rank=rank, error=str(e), kind="non_finite_loss")
        return EXIT_NAN
    except BaseException as e:
        emit("error", rank=rank, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2500:])  # one line under PIPE_BUF
        raise


if __name__ == "__main__":
    sys.exit(main())
