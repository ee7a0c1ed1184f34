"""Building the model a run trains: random init from a config, a local or hub checkpoint, or another
training run's export; dropout where the model has it; the PEFT method around it."""

from __future__ import annotations

import os
from typing import Any


def model_identity(path: str | None) -> Any:
    """What a local model directory's content is, for a fingerprint: its files and their sizes (a hub
    name is its own identity: None here)."""
    if path and os.path.isdir(path):
        return sorted(
            (os.path.relpath(os.path.join(r, n), path), os.path.getsize(os.path.join(r, n)))
            for r, _, files in os.walk(path)
            for n in files
        )
    return None


# config attribute names model families use for each kind of dropout
DROPOUT_NAMES = {
    "attention": ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop"),
    "hidden": ("hidden_dropout", "hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "dropout"),
    "classifier": ("classifier_dropout",),
}


def apply_dropout(config: Any, dropout: Any) -> None:
    """Set the configured dropout rates on a transformers config; a rate for a part the model does not
    have is an error naming the field."""
    for part, names in DROPOUT_NAMES.items():
        rate = getattr(dropout, part)
        if rate is None:
            continue
        found = [n for n in names if hasattr(config, n)]
        if part == "classifier" and not found:
            found = ["classifier_dropout"]  # heads that read it with a fallback (BERT) accept it unset
        if not found:
            have = sorted(n for ns in DROPOUT_NAMES.values() for n in ns if hasattr(config, n))
            raise ValueError(
                f"model.dropout.{part}: the {config.model_type} config has no {part} dropout "
                f"(its dropout settings: {', '.join(have) or 'none'})"
            )
        for n in found:
            setattr(config, n, rate)


def model_config(cfg: Any, tokenizer: Any, extra: dict[str, Any], source: str | None) -> Any:
    """The transformers config the run builds its model from (no weights loaded)."""
    from transformers import AutoConfig

    m = cfg.model
    if m.init is not None:
        init = dict(m.init)
        model_type = init.pop("model_type", "llama")
        if tokenizer is not None:
            init.setdefault("vocab_size", len(tokenizer))
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if getattr(tokenizer, name, None) is not None:
                    init.setdefault(name, getattr(tokenizer, name))
        if model_type not in ("bert", "roberta", "distilbert", "electra"):  # absolute-position models keep theirs
            init.setdefault("max_position_embeddings", max(cfg.seq_len or 0, 2048))
        config = AutoConfig.for_model(model_type, **{**init, **extra})
    else:
        config = AutoConfig.from_pretrained(source, **extra)
    apply_dropout(config, m.dropout)
    return config


def build_model(cfg: Any, objective: Any, tokenizer: Any, dtype: Any, source: str | None) -> Any:
    """The model, wrapped for the method. `source` is where pretrained weights come from (a hub name, a
    local directory, another run's artifact); None builds random weights from `model.init`."""
    import torch
    import transformers

    m = cfg.model
    cls = getattr(transformers, objective.auto_class)
    config = model_config(cfg, tokenizer, objective.model_kwargs(), source)
    config._attn_implementation = m.attn_implementation
    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights (and new heads)
    if m.init is not None:
        model = cls.from_config(config, attn_implementation=m.attn_implementation)
    else:
        model = cls.from_pretrained(source, config=config, attn_implementation=m.attn_implementation, dtype=dtype)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return wrap_method(model, cfg.method, objective.peft_task)


def wrap_method(model: Any, method: Any, task: str = "CAUSAL_LM") -> Any:
    if method.method == "full":
        return model
    from peft import AdaptionPromptConfig, LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

    task_type = getattr(TaskType, task)
    if method.method == "lora":
        pc = LoraConfig(
            task_type=task_type,
            r=method.lora_r,
            lora_alpha=method.lora_alpha,
            lora_dropout=method.lora_dropout,
            target_modules=method.target_modules,
        )
    elif method.method == "prefix":
        pc = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=method.prefix_tokens)
    else:
        pc = AdaptionPromptConfig(
            task_type=task_type,
            adapter_len=method.adapter_len,
            adapter_layers=min(method.adapter_layers, model.config.num_hidden_layers),
        )
    return get_peft_model(model, pc)


def merged_model(cfg: Any, objective: Any, tokenizer: Any, source: str | None, peft_state_dict: dict[str, Any]) -> Any:
    """The base model with the trained adapter folded in, when the method allows it (LoRA; others are
    saved as adapters only, to be loaded with peft)."""
    if cfg.method.method != "lora":
        return None
    import torch

    model = build_model(cfg, objective, tokenizer, torch.float32, source)
    model.load_state_dict(peft_state_dict)
    return model.merge_and_unload()


def model_flops_per_token(model: Any, seq_len: int) -> float:
    """~6N for the dense weights plus 12 * layers * hidden * seq for attention (forward + backward)."""
    cfg = getattr(model, "config", None)
    n = sum(p.numel() for p in model.parameters())
    attn = 0
    if cfg is not None and hasattr(cfg, "num_hidden_layers"):
        attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
    return 6.0 * n + attn


def peak_tflops(launch: Any, device: str) -> float | None:
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
