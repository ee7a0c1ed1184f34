"""The training recipe, run once per rank: setup -> train (step, validate, checkpoint) -> export -> cleanup.

The loop is the same for every objective; an objective (tasks/train/objectives.py) brings the data
view, the loss and the validation metrics. State that a resumed run needs is the small `TrainState`,
saved with every DeepSpeed checkpoint; the data order follows from the step, so a run resumed after a
kill reads and computes exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tasks.train import checkpoints
from tasks.train.config import TrainConfig
from tasks.train.data import Sampler, full_pass
from tasks.train.model import build_model, merged_model, model_flops_per_token, peak_tflops
from tasks.train.objectives import objective_for


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    best: float | None = None  # best value of the monitored validation metric so far
    best_step: int | None = None
    bad_evals: int = 0
    stopped: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class Recipe:
    def __init__(self, run: dict[str, Any], emit: Any):
        self.run = run
        self.cfg = TrainConfig.model_validate(run["config"])
        self.emit = emit
        self.out_dir = run["output_dir"]
        self.ckpt_dir = os.path.join(self.out_dir, "checkpoints")
        self.state = TrainState()
        self.metric, self.mode = self.cfg.monitored()

    # ---------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        import deepspeed
        import torch.distributed as dist
        from datasets import load_from_disk
        from transformers import AutoTokenizer, get_cosine_with_min_lr_schedule_with_warmup

        cfg, run = self.cfg, self.run
        gpu = cfg.launch.device == "gpu"
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))

        self.tokenizer = AutoTokenizer.from_pretrained(run["tokenizer_dir"]) if run.get("tokenizer_dir") else None
        self.objective = objective_for(cfg, self.tokenizer, run.get("dataset_info") or {})
        data = load_from_disk(run["dataset_dir"])
        self.train_rows = self.objective.rows(data["train"])
        has_val = "validation" in data and len(data["validation"])
        self.val_rows = self.objective.rows(data["validation"]) if has_val else None
        if cfg.objective != "classification" and cfg.seq_len is not None and self.train_rows.seq_len != cfg.seq_len:
            raise ValueError(
                f"seq_len: the config says {cfg.seq_len}, "
                f"the dataset's sequences have {self.train_rows.seq_len} tokens "
                "(pack with the same seq_len, or change train.seq_len)"
            )
        self.sampler = Sampler(self.train_rows.n, cfg.seed)

        ds_config = run["deepspeed_config"]
        dtype = (
            torch.bfloat16
            if ds_config.get("bf16", {}).get("enabled")
            else (torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32)
        )
        model = build_model(cfg, self.objective, self.tokenizer, dtype, run.get("model_source"))
        if cfg.method.method == "prefix" and self.rank == 0:
            self.emit(
                "warning",
                message="prefix tuning: PEFT's prefix attention mask does not keep packed documents "
                "apart; use one document per sequence (SFT packing) for exact boundaries",
            )
        params = [p for p in model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in params)
        self.n_total = sum(p.numel() for p in model.parameters())
        self.flops_per_token = model_flops_per_token(model, max(self.train_rows.seq_len, 1))
        self.peak = peak_tflops(cfg.launch, cfg.launch.device)
        optimizer = None
        if "optimizer" not in ds_config:  # CPU: torch AdamW as a client optimizer (no op compilation)
            optimizer = torch.optim.AdamW(
                params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay
            )
        schedule = lambda opt: get_cosine_with_min_lr_schedule_with_warmup(  # noqa: E731
            opt, cfg.optim.warmup_steps, cfg.max_steps, min_lr_rate=cfg.optim.min_lr_ratio
        )
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, config=ds_config, lr_scheduler=schedule
        )

        self.objective.prepare(self)  # the engine holds the starting weights (DPO's reference is taken here)
        tag = checkpoints.latest(self.ckpt_dir)
        if tag:
            _, client = self.engine.load_checkpoint(self.ckpt_dir, tag=tag)
            known = {k: v for k, v in (client or {}).get("kiln_state", {}).items() if k in TrainState.__annotations__}
            self.state = TrainState(**known)
            if self.rank == 0:
                self.emit("resumed", step=self.state.step, tag=tag)
        self.writer = None
        if self.rank == 0 and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.out_dir, "tensorboard"))

    # ---------------------------------------------------------------------------------------- train

    def train(self) -> None:
        cfg, state = self.cfg, self.state
        self.engine.train()
        window_t, window_tokens, window_steps = time.perf_counter(), 0, 0
        while state.step < cfg.max_steps:
            loss, metrics, tokens = self.train_step()
            state.step += 1
            state.tokens += tokens
            window_tokens += tokens
            window_steps += 1
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                dt = time.perf_counter() - window_t
                tps = window_tokens / dt if dt > 0 else 0.0
                mfu = (tps * self.flops_per_token / self.world) / (self.peak * 1e12) if self.peak else None
                self.record(
                    "train",
                    loss=loss,
                    lr=self.scheduler.get_last_lr()[0],
                    tokens_per_s=tps,
                    step_s=dt / window_steps,
                    mfu=mfu,
                    tokens=state.tokens,
                    **metrics,
                )
                window_t, window_tokens, window_steps = time.perf_counter(), 0, 0
            if (state.step % cfg.eval_every == 0 or state.step == cfg.max_steps) and self.validate():
                break  # early stopping
            if state.step % cfg.save_every == 0 and state.step < cfg.max_steps:
                self.save_checkpoint()
        self.save_checkpoint(final=True)

    def train_step(self) -> tuple[float, dict[str, float], int]:
        """One optimizer step over grad_accum micro batches; loss and metrics averaged over them and the ranks."""
        import torch.distributed as dist

        cfg, engine = self.cfg, self.engine
        sums: dict[str, torch.Tensor] = {}
        tokens = torch.zeros((), dtype=torch.float64)
        for k in range(cfg.grad_accum):
            idx = self.sampler.indices(
                self.state.step * cfg.grad_accum + k, cfg.micro_batch_size, self.rank, self.world
            )
            batch = self._to_device(self.train_rows.batch(idx))
            loss, metrics = self.objective.loss(engine, batch)
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer on the last micro batch of the accumulation
            for name, value in {"loss": loss.detach(), **metrics}.items():
                sums[name] = sums.get(name, 0) + value.double().to(engine.device) / cfg.grad_accum
            tokens += self.objective.tokens(batch)
        names = sorted(sums)
        packed = torch.stack([sums[n] for n in names] + [tokens.to(engine.device)])
        dist.all_reduce(packed)
        values = {n: float(v) / self.world for n, v in zip(names, packed[:-1])}
        loss = values.pop("loss")
        if not math.isfinite(loss):
            raise NonFiniteLoss(
                f"loss is {loss} at step {self.state.step + 1}; stopping. The last good checkpoint is kept in "
                f"{self.ckpt_dir} (lower optim.lr, check the data, or use bf16 instead of fp16)"
            )
        return loss, values, int(packed[-1])

    def evaluate(self) -> dict[str, Any] | None:
        """Validation metrics: `eval_batches` sampled micro batches per rank, or the whole split."""
        import torch.distributed as dist

        if self.val_rows is None:
            return None
        cfg = self.cfg
        if cfg.eval_batches is None:
            batches = full_pass(self.val_rows.n, cfg.micro_batch_size, self.rank, self.world)
        else:
            sampler = Sampler(self.val_rows.n, cfg.seed)
            batches = [
                (sampler.indices(i, cfg.micro_batch_size, self.rank, self.world), None) for i in range(cfg.eval_batches)
            ]
        self.engine.eval()
        sums: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for idx, valid in batches:
                part = self.objective.eval_sums(self.engine, self._to_device(self.val_rows.batch(idx, valid)))
                for name, value in part.items():
                    sums[name] = sums.get(name, 0) + value
        for value in sums.values():
            dist.all_reduce(value)
        self.engine.train()
        return self.objective.eval_metrics(sums)

    def validate(self) -> bool:
        """Evaluate, record, keep the best weights; True when early stopping ends the run."""
        cfg, state = self.cfg, self.state
        metrics = self.evaluate()
        if metrics is None:
            return False
        self.record("validation", **metrics)
        if self.metric not in metrics:
            raise ValueError(
                f"monitor: the {cfg.objective} objective has no validation metric {self.metric!r} "
                f"(it has: {', '.join(k for k in metrics if not isinstance(metrics[k], list))})"
            )
        value = metrics[self.metric]
        better = state.best is None or (value < state.best if self.mode == "min" else value > state.best)
        if better:
            state.best, state.best_step, state.bad_evals = value, state.step, 0
            if cfg.export == "best":
                self.save_best()
            return False
        state.bad_evals += 1
        if cfg.early_stopping_patience and state.bad_evals >= cfg.early_stopping_patience:
            state.stopped = (
                f"early stopping: no better validation {self.metric} in {state.bad_evals} evaluations "
                f"(best {state.best:.4f} at step {state.best_step})"
            )
            if self.rank == 0:
                self.emit("early_stop", step=state.step, reason=state.stopped)
            return True
        return False

    # ------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, final: bool = False) -> None:
        """A resumable DeepSpeed checkpoint (weights, optimizer, scheduler, TrainState)."""
        tag = f"step{self.state.step}"
        checkpoints.save(self.engine, self.ckpt_dir, tag, {"kiln_state": asdict(self.state)}, self.rank)
        if self.rank == 0:
            checkpoints.prune(self.ckpt_dir, "step", self.cfg.keep_checkpoints)
            # the newest best, and the one the previous checkpoint refers to
            checkpoints.prune(self.ckpt_dir, "best-step", 2)
            self.emit("checkpoint", step=self.state.step, tag=tag, final=final)

    def save_best(self) -> None:
        """The weights of a new best validation, exported as a model directory (written beside, then
        renamed into place, so the directory a checkpoint's state names is always whole)."""
        final = os.path.join(self.ckpt_dir, f"best-step{self.state.step}")
        self.export_model(final + ".tmp")
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(final + ".tmp", final)

    # ----------------------------------------------------------------------------------------- export

    def export(self) -> None:
        """The artifact's model: the best validation's weights (or the last step's), saved with
        save_pretrained, plus metrics.json."""
        import torch.distributed as dist

        state = self.state
        best_dir = os.path.join(self.ckpt_dir, f"best-step{state.best_step}") if state.best_step is not None else None
        use_best = self.cfg.export == "best" and best_dir is not None and os.path.isdir(best_dir)
        if not use_best:
            self.export_model(self.out_dir)
        elif self.rank == 0:
            for name in os.listdir(best_dir):
                src = os.path.join(best_dir, name)
                (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(self.out_dir, name))
        if self.rank == 0:
            summary = {
                "objective": self.cfg.objective,
                "steps": state.step,
                "tokens": state.tokens,
                "monitor": self.metric,
                "best": state.best,
                "best_step": state.best_step,
                "exported_step": state.best_step if use_best else state.step,
                "best_validation_loss": min(
                    (h["loss"] for h in state.history if h["kind"] == "validation"), default=None
                ),
                "stopped": state.stopped,
                "trainable_parameters": self.n_trainable,
                "parameters": self.n_total,
                "history": state.history,
            }
            with open(os.path.join(self.out_dir, "metrics.json"), "w") as f:
                json.dump(summary, f, indent=1)
            self.emit("saved", path=self.out_dir, steps=state.step, exported_step=summary["exported_step"])
        dist.barrier()

    def export_model(self, directory: str) -> None:
        """Consolidate the weights on rank 0 (a collective under ZeRO-3) and save them with
        save_pretrained (safetensors): the model, for PEFT methods `adapter/` (and LoRA merged), the tokenizer."""
        import torch.distributed as dist

        cfg = self.cfg
        if cfg.deepspeed.zero_stage == 3:
            state_dict = self.engine._zero3_consolidated_16bit_state_dict()  # gathered on rank 0
        else:
            state_dict = self.engine.module.state_dict() if self.rank == 0 else None
        if self.rank == 0:
            os.makedirs(directory, exist_ok=True)
            module = self.engine.module
            cpu = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in state_dict.items()}
            if cfg.method.method == "full":
                module.save_pretrained(directory, state_dict=cpu, safe_serialization=True)
            else:
                module.save_pretrained(os.path.join(directory, "adapter"), state_dict=cpu, safe_serialization=True)
                merged = merged_model(cfg, self.objective, self.tokenizer, self.run.get("model_source"), cpu)
                if merged is not None:
                    merged.save_pretrained(directory, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(directory)
        dist.barrier()

    # ---------------------------------------------------------------------------------------- helpers

    def record(self, kind: str, **values: Any) -> None:
        entry = {"kind": kind, "step": self.state.step, **values}
        self.state.history.append(entry)
        if self.rank == 0:
            self.emit(kind, **{k: v for k, v in entry.items() if k != "kind"})
            if self.writer:
                for k, v in values.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self.writer.add_scalar(f"{kind}/{k}", v, self.state.step)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.engine.device) for k, v in batch.items()}

    def cleanup(self) -> None:
        import torch.distributed as dist

        if self.writer:
            self.writer.close()
        self.engine.destroy()
        dist.destroy_process_group()
