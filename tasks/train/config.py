"""Training config: the objective, the model, the method (full / LoRA / prefix / adapter), the optimiser,
regularisation, validation and early stopping, DeepSpeed, the launch."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.stage import StageConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DropoutConfig(_Section):
    """Dropout where the model has it (None leaves the model's own setting). Each maps onto the names
    model configs use: attention (attention_dropout, attention_probs_dropout_prob, attn_pdrop), hidden
    (hidden_dropout, hidden_dropout_prob, resid_pdrop, embd_pdrop, dropout), classifier
    (classifier_dropout). A rate for a part the model does not have is refused, naming the field."""

    attention: float | None = Field(None, ge=0, lt=1, description="Dropout on attention probabilities.")
    hidden: float | None = Field(None, ge=0, lt=1, description="Dropout on hidden states / residual branches.")
    classifier: float | None = Field(None, ge=0, lt=1, description="Dropout before a classification head.")


class ModelConfig(_Section):
    """Where the starting weights come from: a Hugging Face model by hub name or local path, another
    training section's model (`from`), or a new model from a config with random weights."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name_or_path: str | None = Field(None, description="Hub id (needs internet) or local directory of a model.")
    from_: str | None = Field(
        None,
        alias="from",
        description="The name of another training section of this pipeline: start from the model it exports "
        "(e.g. an SFT run from the pretraining run). Its fingerprint becomes part of this run's.",
    )
    init: dict[str, Any] | None = Field(
        None,
        description="Build a new model with random weights from these config values, e.g. "
        "{model_type: llama, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4}. "
        "vocab_size and the special token ids come from the tokenizer.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel. Document boundaries are kept with every one of them."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    dropout: DropoutConfig = Field(default_factory=DropoutConfig)

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if sum(x is not None for x in (self.name_or_path, self.init, self.from_)) != 1:
            raise ValueError(
                "set exactly one of model.name_or_path (load a model), model.from (another training "
                "section's model) or model.init (random init)"
            )
        return self


class MethodConfig(_Section):
    """What is trained. PEFT methods come from the peft library."""

    method: Literal["full", "lora", "prefix", "adapter"] = Field(
        "full",
        description="full: every weight. lora: low-rank adapters. prefix: prefix tuning. adapter: LLaMA-Adapter "
        "(peft adaption_prompt: zero-gated learned prompts in the top layers; Llama-family models).",
    )
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], description="Modules LoRA wraps."
    )
    prefix_tokens: int = Field(16, ge=1, description="Virtual tokens for prefix tuning.")
    adapter_len: int = Field(10, ge=1, description="Adaption prompt length (adapter).")
    adapter_layers: int = Field(2, ge=1, description="Top layers that get an adaption prompt (adapter).")


class OptimConfig(_Section):
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay.")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(
        10,
        ge=0,
        description="Linear warmup from 0, then cosine decay to min_lr_ratio * lr "
        "(transformers' get_cosine_with_min_lr_schedule_with_warmup).",
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clipping (0: off).")


class DeepSpeedOptions(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="ZeRO-Offload of optimizer state (GPU runs).")
    offload_params: Literal["none", "cpu"] = Field("none", description="ZeRO-3 parameter offload (GPU runs).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU."
    )


class LaunchConfig(_Section):
    """How the ranks are started. Not fingerprinted: the same run on other hardware is the same run."""

    device: Literal["cpu", "gpu"] = Field("cpu", description="cpu: gloo ranks. gpu: NCCL, one rank per GPU.")
    procs_per_node: int = Field(2, ge=1, description="Ranks per node (CPU processes, or GPUs).")
    hostfile: str | None = Field(None, description="DeepSpeed hostfile (`host slots=N` lines) for several nodes.")
    master_addr: str = Field("127.0.0.1", description="Rendezvous address (the first node's, for several nodes).")
    master_port: int | None = Field(None, ge=1024, le=65535, description="Rendezvous port; default: a free one.")
    devices: list[int] | None = Field(
        None,
        description="This node's devices the run may use: GPU ids (CUDA_VISIBLE_DEVICES), or on CPU the cores "
        "its ranks are pinned to. Default: all. `kiln hpo` sets it to split a machine between parallel trials.",
    )
    peak_tflops: float | None = Field(
        None, gt=0, description="Peak dense TFLOP/s of one device, for the MFU estimate (known GPUs are detected)."
    )


class PreferenceConfig(_Section):
    """SimPO and DPO settings (objective simpo / dpo)."""

    beta: float | None = Field(
        None,
        gt=0,
        description="The scale of the log-probability difference. Default: 2.0 for SimPO (its paper's "
        "range is 2-10), 0.1 for DPO.",
    )
    gamma: float | None = Field(
        None, ge=0, description="SimPO's target margin gamma; default: 0.5 * beta (the official gamma/beta ratio)."
    )
    sft_weight: float = Field(
        0.0, ge=0, description="SimPO: weight of an NLL term on the chosen reply (CPO's alpha). 0: the pure SimPO loss."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Assumed share of flipped preferences (conservative DPO / smoothed SimPO)."
    )

    def resolved_beta(self, objective: str) -> float:
        return self.beta if self.beta is not None else (2.0 if objective == "simpo" else 0.1)

    def resolved_gamma(self) -> float:
        return self.gamma if self.gamma is not None else 0.5 * self.resolved_beta("simpo")


class TrainConfig(StageConfig):
    """One training run over a dataset artifact (pack's, or classify_tokenize's for classification)."""

    execution_fields = StageConfig.execution_fields | {
        "launch",
        "log_every",
        "save_every",
        "keep_checkpoints",
        "tensorboard",
    }

    objective: Literal["causal_lm", "sft", "classification", "simpo", "dpo", "reward"] = Field(
        "causal_lm",
        description="causal_lm: next-token loss on packed documents. sft: the same loss, where the pack stage "
        "masked prompt tokens out of the labels. classification: a sequence classifier "
        "(AutoModelForSequenceClassification) on classify_tokenize's dataset, judged by accuracy and macro-F1. "
        "simpo / dpo: preference optimisation on pref_tokenize's pairs (see `preference`). reward: a reward model "
        "(a one-output sequence classifier, Bradley-Terry on pref_tokenize's pairs) for the score and ppo stages.",
    )
    model: ModelConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedOptions = Field(default_factory=DeepSpeedOptions)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy loss.")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    seq_len: int | None = Field(None, ge=8, description="Expected sequence length; a dataset that differs is refused.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per rank per micro step.")
    grad_accum: int = Field(1, ge=1, description="Micro steps per optimizer step.")
    seed: int = 0
    eval_every: int = Field(20, ge=1, description="Validation every N steps (and at the end).")
    eval_batches: int | None = Field(
        8, ge=1, description="Micro batches per rank in one validation pass; null: the whole validation split."
    )
    monitor: str | None = Field(
        None,
        description="The validation metric early stopping and the best checkpoint follow: loss (the default "
        "for language models), accuracy or f1 (macro-F1, the default for classifiers), ...",
    )
    monitor_mode: Literal["auto", "min", "max"] = Field(
        "auto", description="Whether a lower or a higher `monitor` is better; auto: min for loss and perplexity."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validations without a better `monitor` value."
    )
    export: Literal["best", "last"] = Field(
        "best",
        description="Which weights the artifact's model holds: the best validation by `monitor` (kept as a "
        "checkpoint when it happens), or the last step's. Without a validation split: the last.",
    )
    log_every: int = Field(5, ge=1)
    save_every: int = Field(50, ge=1, description="Resumable DeepSpeed checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1)
    tensorboard: bool = True

    def fingerprint_config(self) -> dict[str, Any]:
        data = super().fingerprint_config()
        data["model"].pop("from_", None)  # which section: its model's fingerprint is an input already
        return data

    def monitored(self) -> tuple[str, str]:
        """(metric, 'min' | 'max') that early stopping and the best checkpoint follow."""
        metric = self.monitor or ("f1" if self.objective == "classification" else "loss")
        mode = self.monitor_mode
        if mode == "auto":
            mode = "min" if metric in ("loss", "perplexity") or metric.endswith("loss") else "max"
        return metric, mode
