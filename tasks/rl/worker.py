"""The RL worker, one process per rank: rollouts with the policy, rewards, and updates (PPO, RLOO,
REINFORCE with a baseline), under DeepSpeed like training.

    python -m tasks.rl.worker --spec RUN.json

An iteration: the rank's share of this iteration's prompts (a seeded permutation, so a resumed run draws
what the uninterrupted one drew) -> replies sampled from the policy -> log-probabilities of the replies
under the policy and the starting model (the reference: a frozen copy, or the policy with its LoRA
adapter switched off), the critic's values (PPO) and the reward -> per-token rewards (a KL penalty,
the score at the last token) -> advantages (GAE; or leave-one-out / batch-mean baselines) -> `ppo_epochs`
passes of clipped updates. Checkpoints hold both engines and the state (iteration, history, RNG).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

from tasks.train import checkpoints
from tasks.train.worker import EXIT_NAN, emit


class NonFiniteRL(RuntimeError):
    pass


@dataclass
class RLState:
    iteration: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class RLRecipe:
    def __init__(self, run: dict[str, Any]):
        from tasks.rl.config import RLConfig

        self.run = run
        self.cfg = RLConfig.model_validate(run["config"])
        self.out_dir = run["output_dir"]
        self.ckpt_dir = os.path.join(self.out_dir, "checkpoints")
        self.state = RLState()

    # ---------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        import deepspeed
        import torch
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

        from tasks.train.model import wrap_method

        cfg, run = self.cfg, self.run
        gpu = cfg.launch.device == "gpu"
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        source = run["policy_dir"]
        self.tok = AutoTokenizer.from_pretrained(source)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        with open(run["prompts_file"]) as f:
            self.prompts = json.load(f)  # [[id, messages], ...]
        ds_config = run["deepspeed_config"]
        dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32

        torch.manual_seed(cfg.seed)  # the same starting weights (and new heads) on every rank
        policy = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        policy.config.use_cache = False
        self.lora = cfg.method.method == "lora"
        policy = wrap_method(policy, cfg.method)
        self.reference = None
        if not self.lora:  # under LoRA the reference is the policy with its adapter off
            self.reference = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
            self.reference.requires_grad_(False)
        self.policy = self._engine(policy, cfg.optim.lr, ds_config)
        self.critic = None
        if cfg.algorithm == "ppo":
            critic = AutoModelForTokenClassification.from_pretrained(source, num_labels=1, dtype=dtype)
            critic.config.use_cache = False
            self.critic = self._engine(critic, cfg.critic_lr or cfg.optim.lr, ds_config)
        self.device = self.policy.device
        if self.reference is not None:
            self.reference.to(self.device)
        self.reward = self._reward()
        self._resume()
        self.writer = None
        if self.rank == 0 and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.out_dir, "tensorboard"))

    def _engine(self, model: Any, lr: float, ds_config: dict[str, Any]) -> Any:
        import copy

        import deepspeed
        import torch

        cfg = self.cfg
        config = copy.deepcopy(ds_config)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = None
        if "optimizer" in config:
            config["optimizer"]["params"]["lr"] = lr
        else:  # CPU: torch AdamW as a client optimizer (no op compilation)
            optimizer = torch.optim.AdamW(
                params, lr=lr, betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay
            )
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer, config=config)
        return engine

    def _reward(self) -> Any:
        """A function (messages list, replies) -> list of floats."""
        cfg, run = self.cfg, self.run
        if run.get("reward_model_dir"):
            from tasks.prefs.score import load_reward_model, reward_model_scores

            model, tok = load_reward_model(run["reward_model_dir"], "gpu" if cfg.launch.device == "gpu" else "cpu")
            return lambda prompts, replies: reward_model_scores(model, tok, prompts, replies, cfg.template, 1024, 32)
        if cfg.rule is not None:
            fn = cfg.rule
        else:
            from tasks.prefs.score import load_function

            fn = load_function(cfg.function)
        return lambda prompts, replies: [float(fn(p, r)) for p, r in zip(prompts, replies)]

    def _resume(self) -> None:
        import torch

        tag = checkpoints.latest(os.path.join(self.ckpt_dir, "policy"))
        if not tag:
            return
        _, client = self.policy.load_checkpoint(os.path.join(self.ckpt_dir, "policy"), tag=tag)
        if self.critic is not None:  # saved first: a policy checkpoint's tag is always there for the critic
            self.critic.load_checkpoint(os.path.join(self.ckpt_dir, "critic"), tag=tag)
        saved = (client or {}).get("kiln_state", {})
        self.state = RLState(iteration=saved.get("iteration", 0), history=saved.get("history", []))
        rng = (client or {}).get("kiln_rng")
        if rng is not None:
            torch.set_rng_state(rng)
        if self.rank == 0:
            emit("resumed", iteration=self.state.iteration, tag=tag)

    # ---------------------------------------------------------------------------------------- the loop

    def train(self) -> None:
        cfg, state = self.cfg, self.state
        while state.iteration < cfg.iterations:
            t0 = time.perf_counter()
            batch = self.rollout(state.iteration)
            t1 = time.perf_counter()
            self.score_and_advantages(batch)
            t2 = time.perf_counter()
            metrics = self.update(batch, state.iteration)
            t3 = time.perf_counter()
            state.iteration += 1
            metrics.update(rollout_s=t1 - t0, scoring_s=t2 - t1, update_s=t3 - t2)
            if state.iteration % cfg.log_every == 0 or state.iteration == cfg.iterations:
                self.record("rl", **metrics)
            if self.rank == 0 and (state.iteration % cfg.samples_every == 0 or state.iteration == 1):
                self.record(
                    "samples",
                    rows=[
                        {"prompt": p[-1]["content"], "reply": r, "reward": s}
                        for p, r, s in list(zip(batch["messages"], batch["replies"], batch["scores"].tolist()))[:3]
                    ],
                )
            if state.iteration % cfg.save_every == 0 or state.iteration == cfg.iterations:
                self.save_checkpoint()

    def _iteration_prompts(self, iteration: int) -> list[tuple[str, list[dict[str, str]]]]:
        """This rank's prompts for an iteration: a seeded permutation per pass over the prompts, the
        iteration's slice of it, every world-th prompt from this rank's position."""
        import torch

        cfg, n = self.cfg, len(self.prompts)
        chosen = []
        for j in range(cfg.rollout_prompts):
            position = iteration * cfg.rollout_prompts + j
            epoch = position // n
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
            chosen.append(self.prompts[int(perm[position % n])])
        return chosen[self.rank :: self.world]

    def rollout(self, iteration: int) -> dict[str, Any]:
        """Sample the replies, build the sequences, and the policy's and the reference's log-probabilities
        (and the critic's values) of the reply tokens, all without gradients."""
        import torch

        from tasks.prefs.tokenize import encode_prompt
        from tasks.tokenize.sft import render_prompt

        cfg, tok = self.cfg, self.tok
        prompts = [m for _, m in self._iteration_prompts(iteration) for _ in range(cfg.samples)]
        encoded = [encode_prompt(tok, render_prompt(m, tok, cfg.template)) for m in prompts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for j, e in enumerate(encoded):  # left padding for generation
            ids[j, width - len(e) :] = torch.tensor(e)
            attn[j, width - len(e) :] = 1
        torch.manual_seed(cfg.seed * 7919 + iteration * 131 + self.rank)
        module = self.policy.module
        module.eval()
        with torch.no_grad(), self._gathered(self.policy):
            generated = module.generate(
                input_ids=ids.to(self.device),
                attention_mask=attn.to(self.device),
                do_sample=True,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                use_cache=True,
            )
        module.train()
        replies, sequences, reply_lens = [], [], []
        for e, row in zip(encoded, generated[:, width:].tolist()):
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]  # the EOS is an action too: the model chose to stop
            replies.append(tok.decode(row, skip_special_tokens=True))
            sequences.append(e + row)
            reply_lens.append(len(row))
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        mask = torch.zeros((len(sequences), length - 1), dtype=torch.float32)  # positions of the shifted targets
        for j, (e, s) in enumerate(zip(encoded, sequences)):
            input_ids[j, : len(s)] = torch.tensor(s)
            attention[j, : len(s)] = 1
            mask[j, len(e) - 1 : len(s) - 1] = 1
        batch = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention.to(self.device),
            "mask": mask.to(self.device),
            "messages": prompts,
            "replies": replies,
            "reply_lens": torch.tensor(reply_lens, dtype=torch.float32),
        }
        with torch.no_grad():
            batch["old_logp"], _ = self.logprobs(self.policy, batch, train=False)
            batch["ref_logp"] = self.reference_logprobs(batch)
            if self.critic is not None:
                batch["old_values"] = self.values(self.critic, batch)
        return batch

    def score_and_advantages(self, batch: dict[str, Any]) -> None:
        import torch
        import torch.distributed as dist

        from tasks.rl import algorithms as alg

        cfg = self.cfg
        scores = torch.tensor(self.reward(batch["messages"], batch["replies"]), dtype=torch.float32)
        bad = ~torch.isfinite(scores)
        flag = torch.tensor([float(bad.any())], device=self.device)
        dist.all_reduce(flag)
        if flag.item():
            raise NonFiniteRL(
                f"a reward is {scores[bad][0].item() if bad.any() else 'not finite'} at iteration "
                f"{self.state.iteration + 1}; stopping. The last good checkpoint is kept in "
                f"{self.ckpt_dir} (check the reward)"
            )
        batch["scores"] = scores
        mask = batch["mask"]
        kl = alg.kl_estimate(batch["old_logp"], batch["ref_logp"], cfg.kl_estimator) * mask
        batch["kl"] = kl.sum(-1)
        score = scores.to(self.device)
        if cfg.algorithm == "ppo":
            rewards = alg.token_rewards(score, kl, mask, cfg.kl_coef)
            advantages, returns = alg.gae(rewards, batch["old_values"], mask, cfg.gamma, cfg.lam)
            batch["returns"] = returns
        else:  # one return per reply, spread over its tokens
            total = score - cfg.kl_coef * batch["kl"]
            if cfg.algorithm == "rloo":
                seq_adv = alg.rloo_advantages(total, cfg.samples)
            else:
                stats = torch.stack([total.sum(), torch.tensor(float(len(total)), device=self.device)])
                dist.all_reduce(stats)
                seq_adv = total - stats[0] / stats[1]
            advantages = seq_adv[:, None] * mask
        if cfg.whiten_advantages:
            sums = torch.stack([(advantages * mask).sum(), mask.sum()])
            dist.all_reduce(sums)
            mean = sums[0] / sums[1].clamp(min=1)
            var_sum = ((advantages - mean) ** 2 * mask).sum()
            dist.all_reduce(var_sum)
            advantages = alg.whiten(advantages, mask, stats=(mean, var_sum / sums[1].clamp(min=1)))
        batch["advantages"] = advantages

    def update(self, batch: dict[str, Any], iteration: int) -> dict[str, float]:
        import torch
        import torch.distributed as dist

        from tasks.rl import algorithms as alg

        cfg = self.cfg
        n = batch["input_ids"].shape[0]
        sums: dict[str, float] = {"policy_loss": 0.0, "clip_fraction": 0.0, "entropy": 0.0, "value_loss": 0.0}
        steps = 0
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 7 * iteration + epoch))
            for start in range(0, n, cfg.micro_batch_size):
                idx = order[start : start + cfg.micro_batch_size].to(self.device)
                part = {k: batch[k][idx] for k in ("input_ids", "attention_mask", "mask", "old_logp", "advantages")}
                logp, entropy = self.logprobs(self.policy, part, train=True)
                loss, clipped = alg.policy_loss(
                    logp, part["old_logp"], part["advantages"], part["mask"], cfg.clip_range
                )
                if not torch.isfinite(loss):
                    raise NonFiniteRL(
                        f"the policy loss is {loss.item()} at iteration {iteration + 1}; stopping. "
                        f"The last good checkpoint is kept in {self.ckpt_dir}"
                    )
                self.policy.backward(loss)
                self.policy.step()
                sums["policy_loss"] += loss.item()
                sums["clip_fraction"] += clipped.item()
                sums["entropy"] += ((entropy * part["mask"]).sum() / part["mask"].sum().clamp(min=1)).item()
                if self.critic is not None:
                    values = self.values(self.critic, part)
                    vloss = alg.value_loss(
                        values, batch["old_values"][idx], batch["returns"][idx], part["mask"], cfg.clip_range_value
                    )
                    self.critic.backward(cfg.vf_coef * vloss)
                    self.critic.step()
                    sums["value_loss"] += vloss.item()
                steps += 1
        local = {k: v / max(steps, 1) for k, v in sums.items()}
        local.update(
            reward=float(batch["scores"].mean()),
            kl=float(batch["kl"].mean()),
            reply_length=float(batch["reply_lens"].mean()),
            non_score_reward=float(-cfg.kl_coef * batch["kl"].mean()),
        )
        if self.critic is None:
            local.pop("value_loss")
        names = sorted(local)
        values = torch.tensor([local[k] for k in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return {k: float(v) / self.world for k, v in zip(names, values)}

    # ---------------------------------------------------------------------------------------- pieces

    def logprobs(self, engine: Any, batch: dict[str, Any], train: bool) -> tuple[Any, Any]:
        """Log-probabilities of each next token, and the entropy of the distribution it came from."""
        import torch
        import torch.nn.functional as F

        context = contextlib.nullcontext() if train else torch.no_grad()
        with context:
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            logits = logits.float() / self.cfg.temperature  # the distribution the replies were sampled from
            targets = batch["input_ids"][:, 1:]
            logp = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            entropy = None
            if train:
                probs = logits.softmax(-1)
                entropy = -(probs * logits.log_softmax(-1)).sum(-1)
        return logp, entropy

    def reference_logprobs(self, batch: dict[str, Any]) -> Any:
        import torch

        if self.reference is not None:
            logp, _ = self.logprobs(self.reference, batch, train=False)
            return logp
        with torch.no_grad(), self.policy.module.disable_adapter():
            logp, _ = self.logprobs(self.policy, batch, train=False)
        return logp

    def values(self, engine: Any, batch: dict[str, Any]) -> Any:
        """The critic's value of each state, aligned with the next-token positions."""
        return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, 0].float()

    def _gathered(self, engine: Any) -> Any:
        if self.cfg.deepspeed.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()))

    def record(self, kind: str, **values: Any) -> None:
        entry = {"kind": kind, "iteration": self.state.iteration, **values}
        self.state.history.append(entry)
        if self.rank == 0:
            emit(kind, **{k: v for k, v in entry.items() if k != "kind"})
            if self.writer:
                for k, v in values.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self.writer.add_scalar(f"{kind}/{k}", v, self.state.iteration)

    def save_checkpoint(self) -> None:
        import torch

        tag = f"iter{self.state.iteration}"
        client = {"kiln_state": asdict(self.state), "kiln_rng": torch.get_rng_state()}
        if self.critic is not None:  # the critic first: a policy checkpoint names a tag both engines have
            checkpoints.save(self.critic, os.path.join(self.ckpt_dir, "critic"), tag, client, self.rank)
        checkpoints.save(self.policy, os.path.join(self.ckpt_dir, "policy"), tag, client, self.rank)
        if self.rank == 0:
            for sub in ("policy", "critic"):
                checkpoints.prune(os.path.join(self.ckpt_dir, sub), "iter", self.cfg.keep_checkpoints)
            emit("checkpoint", iteration=self.state.iteration, tag=tag)

    def export(self) -> None:
        import torch.distributed as dist

        engine = self.policy
        if self.cfg.deepspeed.zero_stage == 3:
            state_dict = engine._zero3_consolidated_16bit_state_dict()
        else:
            state_dict = engine.module.state_dict() if self.rank == 0 else None
        if self.rank == 0:
            cpu = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in state_dict.items()}
            module = engine.module
            if self.lora:  # the adapter, and a fresh base model with it folded in (the engine's may be partitioned)
                from transformers import AutoModelForCausalLM

                from tasks.train.model import wrap_method

                module.save_pretrained(os.path.join(self.out_dir, "adapter"), state_dict=cpu, safe_serialization=True)
                fresh = wrap_method(AutoModelForCausalLM.from_pretrained(self.run["policy_dir"]), self.cfg.method)
                fresh.load_state_dict(cpu)
                fresh.merge_and_unload().save_pretrained(self.out_dir, safe_serialization=True)
            else:
                module.save_pretrained(self.out_dir, state_dict=cpu, safe_serialization=True)
            self.tok.save_pretrained(self.out_dir)
            with open(os.path.join(self.out_dir, "metrics.json"), "w") as f:
                json.dump(
                    {
                        "algorithm": self.cfg.algorithm,
                        "iterations": self.state.iteration,
                        "history": self.state.history,
                    },
                    f,
                    indent=1,
                )
            emit("saved", path=self.out_dir, iterations=self.state.iteration)
        dist.barrier()

    def cleanup(self) -> None:
        import torch.distributed as dist

        if self.writer:
            self.writer.close()
        self.policy.destroy()
        if self.critic is not None:
            self.critic.destroy()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from tasks.train.launch import die_with_parent

    die_with_parent()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spec", required=True, help="the run spec (JSON) written by the rl stage")
    args = ap.parse_args(argv)
    with open(args.spec) as f:
        run = json.load(f)
    rank = int(os.environ.get("RANK", 0))
    try:
        recipe = RLRecipe(run)
        recipe.setup()
        recipe.train()
        recipe.export()
        rank = recipe.rank
        recipe.cleanup()
        emit("finished", rank=rank)
        return 0
    except NonFiniteRL as e:
        emit("error", rank=rank, error=str(e), kind="non_finite_loss")
        return EXIT_NAN
    except BaseException as e:
        emit("error", rank=rank, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2500:])
        raise


if __name__ == "__main__":
    sys.exit(main())
