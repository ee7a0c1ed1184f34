"""The eval stage against lm-evaluation-harness's own CLI on the same model, task files and settings.

    .venv/bin/python bench/bench_eval.py [--copies 8] [--hidden 256] [--layers 4] [--repeats 2]

Workload: the four look-alike benchmarks of examples/eval (HellaSwag 10-shot, Winogrande 5-shot,
TruthfulQA mc2 0-shot, MMLU 5-shot), each row repeated `--copies` times with its text marked per copy (so
no two requests are the same), as plain lm_eval task files (an absolute include, absolute data files);
a random Llama (`--hidden`, `--layers`) over a 2k byte-level BPE trained on the repo's sample text. Both
sides evaluate in float32 on the CPU with batch size `--batch-size`.

Runs, alternated `--repeats` times (a fresh process each; the best of each counts, the least disturbed
on a shared machine):
- cli: `lm_eval run --model hf ... --include_path DIR --tasks ... --output_path OUT --log_samples`;
- stage, 1 worker: `kiln stage eval --workers 1 ...`: the four units one after the other in one process;
- stage, 2 workers: `kiln stage eval --workers 2 ...`: the units spread over two worker processes.
For the stage, the figure is its wall time (the manifest's `wall_seconds`: planning, every unit with its
model load, the commit), and the whole command's too. Every run's numbers must equal the CLI's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FIXTURES = os.path.join(REPO, "examples", "eval")
TASKS = {
    "hellaswag_fixture": ("hellaswag.yaml", "ctx_a"),
    "winogrande_fixture": ("winogrande.yaml", "sentence"),
    "truthfulqa_mc2_fixture": ("truthfulqa_mc2.yaml", "question"),
    "mmlu_fixture": ("mmlu.yaml", "question"),
}


def build_model(directory: str, hidden: int, layers: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    with open(os.path.join(REPO, "examples", "data", "stdlib_docstrings.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(directory)


def build_tasks(directory: str, copies: int) -> list[str]:
    """The fixtures as plain lm_eval files over data repeated `copies` times, each copy's text marked."""
    import yaml

    from tasks.eval.harness import installed_tasks_dir

    os.makedirs(os.path.join(directory, "data"), exist_ok=True)
    paths = []
    for file, field in TASKS.values():
        with open(os.path.join(FIXTURES, file)) as f:
            cfg = yaml.safe_load(f)
        cfg["include"] = os.path.join(installed_tasks_dir(), cfg["include"])
        files = {}
        for split, rel in cfg["dataset_kwargs"]["data_files"].items():
            with open(os.path.join(FIXTURES, rel)) as f:
                rows = [json.loads(line) for line in f]
            # shots come from the first rows of train / dev splits: those stay as they are
            n = 1 if split in ("train", "dev") else copies
            out = os.path.join(directory, rel)
            with open(out, "w") as f:
                for k in range(n):
                    for r in rows:
                        r = dict(r)
                        if k:
                            r[field] = f"In case {k}, {r[field][0].lower()}{r[field][1:]}"
                        f.write(json.dumps(r) + "\n")
            files[split] = out
        cfg["dataset_kwargs"]["data_files"] = files
        path = os.path.join(directory, file)
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        paths.append(path)
    return paths


def run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


def cli_numbers(out: str) -> dict[tuple[str, str], float]:
    (path,) = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.startswith("results_")]
    with open(path) as f:
        results = json.load(f)["results"]
    return {
        (task, key.partition(",")[0]): v
        for task, values in results.items()
        for key, v in values.items()
        if "," in key and "_stderr" not in key and isinstance(v, float)
    }


def stage_numbers(out: str) -> tuple[dict[tuple[str, str], float], float]:
    from tasks.artifacts import Artifact

    art = Artifact.open(out)
    rows = art.read_table().to_pylist()
    return {(r["subtask"], r["metric"]): r["value"] for r in rows}, art.manifest["wall_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-eval-") as tmp:
        model = os.path.join(tmp, "model")
        build_model(model, args.hidden, args.layers)
        tasks = build_tasks(os.path.join(tmp, "tasks"), args.copies)
        cli = [
            os.path.join(bin_dir, "lm_eval"), "run", "--model", "hf",
            "--model_args", f"pretrained={model},dtype=float32", "--tasks", ",".join(TASKS),
            "--include_path", os.path.join(tmp, "tasks"), "--device", "cpu",
            "--batch_size", str(args.batch_size), "--log_samples",
        ]  # fmt: skip
        stage = [
            os.path.join(bin_dir, "kiln"), "stage", "eval", "--set", f"model_path={model}",
            "--set", f"tasks={json.dumps(tasks)}", "--set", f"batch_size={args.batch_size}", "--set", "device=cpu",
        ]  # fmt: skip
        best: dict[str, float] = {}
        stage_wall: dict[str, float] = {}
        reference = None
        for r in range(args.repeats):
            out = os.path.join(tmp, f"cli-{r}")
            seconds = run([*cli, "--output_path", out], env)
            best["cli"] = min(best.get("cli", seconds), seconds)
            reference = cli_numbers(out)
            for workers in (1, 2):
                name = f"stage, {workers} worker{'s' if workers > 1 else ''}"
                out = os.path.join(tmp, f"stage-{workers}-{r}")
                seconds = run([*stage, "--output", out, "--workers", str(workers)], env)
                numbers, wall = stage_numbers(out)
                mismatched = [k for k, v in reference.items() if abs(numbers[k] - v) > 1e-6]
                if mismatched:
                    sys.exit(f"{name}: numbers differ from the CLI's: {mismatched}")
                best[name] = min(best.get(name, seconds), seconds)
                stage_wall[name] = min(stage_wall.get(name, wall), wall)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"model: Llama hidden {args.hidden} x {args.layers} layers, vocab 2048; {args.copies} copies of the "
        f"fixtures; batch size {args.batch_size}; best of {args.repeats}"
    )
    numbers = ", ".join(f"{t} {m} {v:.4f}" for (t, m), v in sorted(reference.items()))
    print(f"{len(reference)} numbers, equal in every run: {numbers}")
    print("| | whole command (s) | ratio to the CLI | the stage's wall time (s) | ratio to the CLI |")
    print("|---|---:|---:|---:|---:|")
    print(f"| lm_eval run (CLI) | {best['cli']:.1f} | 1.00x | | |")
    for name in ("stage, 1 worker", "stage, 2 workers"):
        print(
            f"| kiln {name} | {best[name]:.1f} | {best[name] / best['cli']:.2f}x | {stage_wall[name]:.1f} | "
            f"{stage_wall[name] / best['cli']:.2f}x |"
        )


if __name__ == "__main__":
    main()
