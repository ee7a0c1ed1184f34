"""A trial's wall time against the same training run alone (issue 16: goal <= 10 % overhead).

    flock /tmp/kiln-heavy.lock .venv/bin/python bench/bench_hpo.py [--rounds 3] [--steps 150]

One store: the data stages (examples/data -> BPE -> pack, 128-token rows) run once. Then, round by round,
the same training run (the demo's Llama: hidden 128, 2 layers, 2 gloo ranks, ZeRO-2) three ways, each
with a learning rate not used before, so that every run trains from scratch and none comes from cache:

  alone  the train stage through the plain runner (no Prefect, no study): what the run costs by itself
  flow   the kiln-train flow in this process (the Prefect tasks `kiln run` runs a training with)
  trial  one more trial of a study (the kiln-hpo flow, resumed each round with one more trial to run):
         Optuna's duration of the trial, from ask to tell: sampling, the kiln-hpo-trial subflow, the
         validation values reported as they stream, the objective read back, the study's storage writes

Overhead = median(trial) / median(alone) - 1. The study's own start per round (opening the storage, the
shared stages from cache, the outputs and plots) is printed too; it is paid once per study, not per trial.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def pipeline(root: str, steps: int) -> dict:
    return {
        "name": "bench-hpo",
        "store": {"root": os.path.join(root, "store")},
        "ingest": {"paths": [os.path.join(REPO, "examples", "data")]},
        "tokenizer": {"vocab_size": 2048},
        "tokenize": {},
        "pack": {"seq_len": 128, "validation_fraction": 0.1},
        "train": {
            "model": {
                "init": {
                    "model_type": "llama",
                    "hidden_size": 128,
                    "intermediate_size": 256,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 4,
                }
            },
            "launch": {"device": "cpu", "procs_per_node": 2},
            "seq_len": 128,
            "max_steps": steps,
            "micro_batch_size": 8,
            "eval_every": max(1, steps // 4),
            "eval_batches": 4,
            "save_every": steps,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()

    from flows import embedded

    server = embedded.start_if_needed()
    if server:
        server.wait_ready()
    try:
        run(args)
    finally:
        if server:
            server.stop()


def run(args) -> None:
    import optuna

    from flows.config import parse_config
    from flows.data import data_flow
    from flows.hpo.flow import hpo_flow
    from flows.plan import plan_pipeline
    from flows.train import train_flow
    from tasks.artifacts import Artifact, ArtifactStore
    from tasks.stage import run_in_store
    from tasks.train.stage import TrainStage

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, no GPU, Python {platform.python_version()}; "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-hpo-") as tmp:
        base = pipeline(tmp, args.steps)
        data_flow(config=parse_config(base))
        planned = {p.name: p for p in plan_pipeline(parse_config(base))}
        train = planned["train"]
        inputs = [Artifact.open(planned[i].path, slot) for i, slot in zip(train.inputs, train.slots)]
        store = ArtifactStore(base["store"]["root"])

        trial_lrs = [round(3e-3 * (1 + 0.01 * k), 8) for k in range(max(2, args.rounds))]
        study = {
            **base,
            "hpo": {
                "study": "bench",
                "directory": os.path.join(tmp, "hpo"),
                "params": {"train.optim.lr": {"choices": trial_lrs}},  # a grid: each round a value not run before
                "sampler": "grid",
                "pruner": {"kind": "none"},  # the values are still reported as they stream
            },
        }
        alone, flow, trial, study_overhead = [], [], [], []

        def train_alone(r: int, lr: float = 2e-3) -> None:
            cfg = parse_config({**base, "train": {**base["train"], "optim": {"lr": round(lr * (1 + 0.01 * r), 8)}}})
            t0 = time.perf_counter()
            run_in_store(TrainStage(), cfg.train, inputs, store)
            alone.append(time.perf_counter() - t0)

        def train_in_flow(r: int) -> None:
            cfg = parse_config({**base, "train": {**base["train"], "optim": {"lr": round(1e-3 * (1 + 0.01 * r), 8)}}})
            t0 = time.perf_counter()
            refs = train_flow(config=cfg)
            flow.append(time.perf_counter() - t0)
            assert not refs["train"]["cached"]

        def one_more_trial(r: int) -> None:
            study["hpo"]["n_trials"] = r + 1
            t0 = time.perf_counter()
            out = hpo_flow(config=parse_config(study))
            whole = time.perf_counter() - t0
            last = max(optuna.load_study(study_name="bench", storage=out["storage"]).trials, key=lambda t: t.number)
            assert last.state.name == "COMPLETE" and not last.user_attrs.get("cached"), last
            trial.append(last.duration.total_seconds())
            study_overhead.append(whole - trial[-1])

        train_alone(0, lr=5e-3)  # warm-up (the first launch after the data stages pays for cold caches): not counted
        alone.clear()
        ways = [train_alone, train_in_flow, one_more_trial]
        for r in range(args.rounds):
            for way in ways[r % 3 :] + ways[: r % 3]:  # each way first, second and third in turn
                way(r)
            print(
                f"round {r + 1}: alone {alone[-1]:.2f} s, kiln-train flow {flow[-1]:.2f} s, trial {trial[-1]:.2f} s "
                f"(the study flow around it {study_overhead[-1]:.2f} s more)"
            )
        a, f, t = statistics.median(alone), statistics.median(flow), statistics.median(trial)
        print(
            f"median of {args.rounds}: alone {a:.2f} s, kiln-train flow {f:.2f} s, trial {t:.2f} s; "
            f"trial overhead vs alone {100 * (t / a - 1):+.1f} % ({t - a:+.2f} s), vs the flow "
            f"{100 * (t / f - 1):+.1f} %; the study's own start and outputs {statistics.median(study_overhead):.2f} s "
            f"per run of the study"
        )
        print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
