"""Preference optimisation and RL on the CPU: the figures the preference and RLHF issues ask for.

1. Generate throughput: the generate stage against a plain `model.generate` loop on the same model, the
   same prompts (rendered the same way) and the same settings (sampling, batch size, max_new_tokens).
   Generated tokens per second, model load included on both sides, best of `--repeats`.
2. A preference training step (SimPO, DPO) against an SFT step: the same model, micro batch and sequence
   length (every SFT row and every chosen / rejected sequence about `--seq-len` tokens), run by `kiln run`
   with DeepSpeed ZeRO-2 on 2 gloo ranks. Median seconds per optimizer step (the train events' `step_s`,
   the first two steps left out as warm-up).
3. PPO: seconds per iteration in rollout / scoring / update, for 8, 16 and 32 rollout prompts (median
   of the iterations after the first).

The model: a random Llama over a character vocabulary (tests/train_fixtures.py) of `--hidden` width.

    .venv/bin/python bench/bench_prefs.py [--hidden 256] [--work /tmp/kiln-bench-prefs]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from tasks.artifacts import Artifact, ArtifactStore  # noqa: E402
from tasks.prefs import GenerateConfig, GenerateStage, PromptsConfig, PromptsStage  # noqa: E402
from tasks.stage import run_in_store  # noqa: E402

from train_fixtures import make_char_policy, write_prompts  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _words(rng: random.Random, chars: int) -> str:
    out = []
    while sum(len(w) + 1 for w in out) < chars:
        out.append("".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 8))))
    return " ".join(out)[:chars]


# --------------------------------------------------------------------------------------------------
# 1. generate


def bench_generate(policy: str, work: str, prompts: int, samples: int, max_new: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.prefs.generate import _MODELS
    from tasks.tokenize.sft import render_prompt

    path = write_prompts(os.path.join(work, "prompts.txt"), prompts)
    settings = dict(samples=samples, temperature=1.0, max_new_tokens=max_new, template="alpaca", batch_size=16)
    # warm-up: the first sampled, left-padded batch in a process pays ~5 s of one-off set-up (imports, lazy
    # kernels), whoever calls it; pay it here so neither side below does
    warm, warm_tok = AutoModelForCausalLM.from_pretrained(policy), AutoTokenizer.from_pretrained(policy)
    enc = warm_tok(["a b c", "a"], return_tensors="pt", padding=True, padding_side="left")
    warm.generate(**enc, do_sample=True, max_new_tokens=2, pad_token_id=warm_tok.pad_token_id)
    kiln, plain = [], []
    for rep in range(repeats):
        store = ArtifactStore(os.path.join(work, f"gen-store-{rep}"))
        p = run_in_store(PromptsStage(), PromptsConfig(paths=[path]), [], store)
        _MODELS.clear()  # the stage loads the model inside the timed run, as the plain loop does
        t0 = time.perf_counter()
        art = run_in_store(
            GenerateStage(),
            GenerateConfig(model_path=policy, device="cpu", **settings),
            [Artifact.open(p.path, "prompts")],
            store,
        )
        dt = time.perf_counter() - t0
        tokens = sum(art.read_table(columns=["n_tokens"]).column("n_tokens").to_pylist())
        kiln.append((tokens / dt, tokens, dt))

        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(policy).eval()
        tok = AutoTokenizer.from_pretrained(policy)
        texts = [
            render_prompt([{"role": "user", "content": line.strip()}], tok, "alpaca")
            for line in open(path)
            if line.strip()
        ]
        tokens = 0
        for k in range(samples):
            torch.manual_seed(k)
            for start in range(0, len(texts), 16):
                enc = tok(texts[start : start + 16], return_tensors="pt", padding=True, padding_side="left")
                with torch.no_grad():
                    out = model.generate(
                        **enc,
                        do_sample=True,
                        temperature=1.0,
                        top_p=1.0,
                        max_new_tokens=max_new,
                        eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id,
                    )
                for row in out[:, enc["input_ids"].shape[1] :].tolist():
                    tokens += row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
        dt = time.perf_counter() - t0
        plain.append((tokens / dt, tokens, dt))
        print(f"  repeat {rep + 1}: generate stage {kiln[-1][2]:.2f} s, model.generate {dt:.2f} s")
    k, p_ = max(kiln), max(plain)
    return {
        "kiln_tokens_per_s": k[0],
        "kiln_tokens": k[1],
        "kiln_seconds": k[2],
        "plain_tokens_per_s": p_[0],
        "plain_tokens": p_[1],
        "plain_seconds": p_[2],
        "ratio": k[0] / p_[0],
    }


# --------------------------------------------------------------------------------------------------
# 2 and 3: training runs through `kiln run`


def _train_block(objective: str, steps: int, micro: int, **extra) -> dict:
    return {
        "objective": objective,
        "max_steps": steps,
        "micro_batch_size": micro,
        "log_every": 1,
        "eval_every": steps,
        "eval_batches": 1,
        "save_every": steps,
        "optim": {"lr": 1e-4, "warmup_steps": 0},
        **extra,
    }


def training_config(policy: str, work: str, seq_len: int, steps: int, micro: int, rollouts: list[int]) -> dict:
    from transformers import AutoTokenizer

    from tasks.tokenize.sft import render_prompt

    tok = AutoTokenizer.from_pretrained(policy)
    rng = random.Random(0)
    sft, prefs = [], []
    for i in range(256):
        instruction = _words(rng, 30)
        prompt = render_prompt([{"role": "user", "content": instruction}], tok, "alpaca")
        reply = seq_len - len(tok(prompt)["input_ids"]) - 4  # the reply fills the sequence (one character, one token)
        sft.append({"id": f"s{i}", "instruction": instruction, "output": _words(rng, reply)})
        prefs.append(
            {"id": f"p{i}", "prompt": instruction, "chosen": _words(rng, reply), "rejected": _words(rng, reply)}
        )
    for name, rows in (("sft.jsonl", sft), ("prefs.jsonl", prefs)):
        with open(os.path.join(work, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    cfg: dict = {
        "name": "bench-prefs",
        "store": {"root": os.path.join(work, "store")},
        "sft_ingest": {"paths": [os.path.join(work, "sft.jsonl")]},
        "sft_tokenize": {"template": "alpaca", "tokenizer": policy},
        "pack": {"seq_len": seq_len, "validation_fraction": 0.05},
        "pref_ingest": {"paths": [os.path.join(work, "prefs.jsonl")]},
        "pref_tokenize": {
            "template": "alpaca",
            "tokenizer": policy,
            "max_length": seq_len,
            "validation_fraction": 0.05,
            "inputs": {"pairs": "pref_ingest"},
        },
        "prompts": {"paths": [write_prompts(os.path.join(work, "rl-prompts.txt"), 96)]},
    }
    model = {"model": {"name_or_path": policy}}
    cfg["sft"] = {"kind": "train", **model, "inputs": {"data": "pack"}, **_train_block("sft", steps, micro)}
    for objective in ("simpo", "dpo"):
        cfg[objective] = {
            "kind": "train",
            **model,
            "inputs": {"data": "pref_tokenize"},
            **_train_block(objective, steps, micro),
        }
    for n in rollouts:
        cfg[f"ppo_{n}"] = {
            "kind": "rl",
            "algorithm": "ppo",
            "policy": {"name_or_path": policy},
            "rule": {"kind": "char_fraction", "chars": "a"},
            "template": "alpaca",
            "iterations": 4,
            "rollout_prompts": n,
            "samples": 2,
            "max_new_tokens": 32,
            "micro_batch_size": 8,
            "save_every": 4,
            "optim": {"lr": 1e-4, "warmup_steps": 0, "min_lr_ratio": 1.0},
        }
    return cfg


def run_training(cfg: dict, work: str) -> dict:
    import yaml

    path = os.path.join(work, "bench-prefs.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", path], cwd=REPO, env=env, capture_output=True, text=True
    )
    if r.returncode != 0:
        sys.exit(r.stdout[-4000:] + r.stderr[-4000:])
    print(f"kiln run: {time.perf_counter() - t0:.1f} s")
    from flows.config import PipelineConfig
    from flows.plan import plan_pipeline

    planned = plan_pipeline(PipelineConfig.model_validate(cfg))
    store = ArtifactStore(cfg["store"]["root"])
    return {p.name: store.open(p.stage.name, p.fingerprint) for p in planned}


def step_seconds(art: Artifact) -> dict:
    history = json.load(open(os.path.join(art.path, "metrics.json")))["history"]
    steps = [h["step_s"] for h in history if h["kind"] == "train"][2:]
    tokens = [h["tokens_per_s"] for h in history if h["kind"] == "train"][2:]
    return {
        "step_s": statistics.median(steps),
        "tokens_per_s": statistics.median(tokens),
        "stage_s": art.manifest.get("wall_seconds", art.stats.seconds),
    }


def ppo_split(art: Artifact) -> dict:
    history = [h for h in json.load(open(os.path.join(art.path, "metrics.json")))["history"] if h["kind"] == "rl"]
    later = history[1:]
    return {k: statistics.median(h[k] for h in later) for k in ("rollout_s", "scoring_s", "update_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--work", default="/tmp/kiln-bench-prefs")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--rollouts", default="8,16,32")
    ap.add_argument("--skip", default="", help="Comma-separated parts to skip: generate, train.")
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    policy = make_char_policy(os.path.join(a.work, "policy"), hidden=a.hidden)
    skip = set(filter(None, a.skip.split(",")))
    print(f"model: a random Llama, hidden {a.hidden}, 2 layers, character vocabulary; torch threads {os.cpu_count()}")

    if "generate" not in skip:
        g = bench_generate(policy, a.work, a.prompts, a.samples, a.max_new_tokens, a.repeats)
        print(f"generate, {a.prompts} prompts x {a.samples} samples, max_new_tokens {a.max_new_tokens}, batch 16:")
        for who, key in (("generate stage", "kiln"), ("model.generate", "plain")):
            print(
                f"  {who}  {g[key + '_tokens_per_s']:8.1f} tokens/s "
                f"({g[key + '_tokens']} tokens, {g[key + '_seconds']:.2f} s)"
            )
        print(f"  ratio {g['ratio']:.3f} (goal >= 0.9)")

    if "train" not in skip:
        rollouts = [int(x) for x in a.rollouts.split(",")]
        arts = run_training(training_config(policy, a.work, a.seq_len, a.steps, a.micro_batch, rollouts), a.work)
        sft = step_seconds(arts["sft"])
        print(f"training step, micro batch {a.micro_batch} per rank x 2 ranks, sequences of ~{a.seq_len} tokens:")
        for name in ("sft", "simpo", "dpo"):
            s = step_seconds(arts[name])
            print(
                f"  {name:6s} {s['step_s']:.3f} s/step ({s['step_s'] / sft['step_s']:.2f}x SFT), "
                f"{s['tokens_per_s']:,.0f} tokens/s, stage {s['stage_s']:.1f} s"
            )
        print("PPO, 2 samples per prompt, max_new_tokens 32, seconds per iteration (median of iterations 2-4):")
        print("  rollout prompts | rollout | scoring | update | total")
        for n in rollouts:
            s = ppo_split(arts[f"ppo_{n}"])
            total = sum(s.values())
            print(f"  {n:15d} | {s['rollout_s']:7.2f} | {s['scoring_s']:7.3f} | {s['update_s']:6.2f} | {total:5.2f}")


if __name__ == "__main__":
    main()
