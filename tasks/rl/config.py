"""The RL stage's config: the policy, the reward, the algorithm (PPO, RLOO, REINFORCE with a baseline),
rollouts, the update, and the same DeepSpeed and launch settings as training."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.prefs.score import RuleConfig
from tasks.stage import StageConfig
from tasks.train.config import DeepSpeedOptions, LaunchConfig, MethodConfig, ModelConfig, OptimConfig


class RLConfig(StageConfig):
    """Optimise a policy against a reward: rollouts with generate, a per-token KL penalty towards the
    starting model with the score at the last token, and updates of the policy (and, for PPO, a critic)."""

    execution_fields = StageConfig.execution_fields | {
        "launch",
        "log_every",
        "save_every",
        "keep_checkpoints",
        "samples_every",
    }

    algorithm: Literal["ppo", "rloo", "reinforce"] = Field(
        "ppo",
        description="ppo: a critic, GAE, clipped policy and value losses. rloo: no critic; each of a prompt's "
        "samples against the mean of the others. reinforce: no critic; against the batch's mean return.",
    )
    policy: ModelConfig = Field(..., description="The starting policy: {from: <training section>}, a path, or init.")
    method: MethodConfig = Field(default_factory=MethodConfig)
    # the reward (exactly one)
    reward_from: str | None = Field(None, description="A training section (objective: reward) whose model scores.")
    reward_model_path: str | None = Field(None, description="Or a reward model (one-output classifier) by path.")
    function: str | None = Field(None, description="Or a Python function `module:function(prompt, reply) -> float`.")
    rule: RuleConfig | None = Field(None, description="Or a built-in rule (see the score stage).")
    retokenize_for_reward: bool = Field(
        False,
        description="Let a reward model with another tokenizer read the text re-tokenized; without it "
        "different tokenizers are refused before the first rollout.",
    )
    template: Literal["auto", "chat", "alpaca"] = Field("auto", description="How prompts are rendered.")
    # rollouts
    iterations: int = Field(20, ge=1, description="Rollout + update rounds.")
    rollout_prompts: int = Field(16, ge=1, description="Prompts per iteration, over all ranks.")
    samples: int = Field(1, ge=1, le=64, description="Replies per prompt (rloo needs 2 or more).")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    # the update
    ppo_epochs: int = Field(2, ge=1, description="Passes over each rollout.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per rank per forward / backward.")
    grad_accum: int = Field(1, ge=1, description="Micro batches per optimizer step.")
    kl_coef: float = Field(0.05, ge=0, description="The per-token KL penalty towards the starting policy.")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="k1: log p - log q; k3: the non-negative estimator.")
    clip_range: float = Field(0.2, gt=0, description="PPO's policy ratio clip.")
    clip_range_value: float = Field(0.2, gt=0, description="PPO's value clip.")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE's lambda.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss (its own optimiser; scales its gradient).")
    whiten_advantages: bool = True
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=0, min_lr_ratio=1.0))
    critic_lr: float | None = Field(None, gt=0, description="The critic's learning rate; default: optim.lr.")
    deepspeed: DeepSpeedOptions = Field(default_factory=DeepSpeedOptions)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    seed: int = 0
    log_every: int = Field(1, ge=1, description="Iterations between logged metrics.")
    samples_every: int = Field(5, ge=1, description="Iterations between sample tables (prompt, reply, reward).")
    save_every: int = Field(5, ge=1, description="Iterations between resumable checkpoints (and at the end).")
    keep_checkpoints: int = Field(2, ge=1)
    tensorboard: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> RLConfig:
        given = [n for n in ("reward_from", "reward_model_path", "function", "rule") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of reward_from, reward_model_path, function or rule")
        if self.algorithm == "rloo" and self.samples < 2:
            raise ValueError("samples: rloo compares a prompt's samples with each other: 2 or more")
        if self.method.method not in ("full", "lora"):
            raise ValueError("method.method: RL trains full weights or LoRA")
        return self

    # what the launcher and the DeepSpeed config read, under the names training uses
    @property
    def max_steps(self) -> int:
        return self.iterations
