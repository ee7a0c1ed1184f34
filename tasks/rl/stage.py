"""The rl stage: PPO (or RLOO, REINFORCE with a baseline) of a policy against a reward, as one resumable
DeepSpeed run (the worker: tasks/rl/worker.py), committed as a model artifact like training's.

Inputs: prompts (the prompts stage's), the starting policy (a training section's model, `policy.from`,
or `policy.name_or_path`), and the reward: a reward model (a training section with objective reward,
`reward_from`, or a path) or a function / rule. Checked before the first rollout: the reward model has one
output, and reads the policy's tokens (the same vocabulary) unless `retokenize_for_reward`.

Output: the trained policy (save_pretrained, with the tokenizer; LoRA adds `adapter/` and is merged),
metrics.json (every iteration's reward, KL, entropy, clip fraction, value loss, reply length, and sample
tables), a metrics table, report.md with the curves, and resumable checkpoints of both engines.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pyarrow as pa

from tasks.artifacts import Artifact, ArtifactWriter, pick
from tasks.documents import parse_meta
from tasks.rl.config import RLConfig
from tasks.stage import Stage, StageInputError
from tasks.train import launch


class RLStage(Stage):
    name = "rl"
    version = 1
    Config = RLConfig

    stoppable = True

    def stop(self, directory: str, reason: str) -> bool:
        return launch.request_stop(directory, reason)

    def bindings(self, cfg: RLConfig) -> dict[str, str | None]:
        return {"prompts": "prompts", "policy": cfg.policy.from_, "reward_model": cfg.reward_from}

    def sources(self, cfg: RLConfig) -> Any:
        from tasks.prefs.score import ScoreConfig, ScoreStage
        from tasks.train.model import model_identity

        identity: dict[str, Any] = {"policy": model_identity(cfg.policy.name_or_path)}
        if cfg.function or cfg.reward_model_path:
            score = ScoreConfig(function=cfg.function, reward_model_path=cfg.reward_model_path)
            identity["reward"] = ScoreStage().sources(score)
        return identity

    @staticmethod
    def _parts(inputs: list[Artifact], cfg: RLConfig) -> tuple[Artifact, str, str | None]:
        prompts = pick(inputs, "prompts", ("prompts",))
        if prompts is None:
            raise StageInputError("inputs", "rl reads prompts: the prompts stage's output")
        policy = pick(inputs, "policy", ("train", "rl"))
        path = policy.path if policy is not None else cfg.policy.name_or_path
        if path is None:
            raise StageInputError("policy", "the policy is a saved model: policy.from (a training section) or a path")
        if not os.path.exists(os.path.join(path, "config.json")):
            raise StageInputError("policy", f"{path} holds no full model (config.json)")
        rm = pick(inputs, "reward_model", ("train",))
        return prompts, path, rm.path if rm is not None else cfg.reward_model_path

    def plan(self, inputs: list[Artifact], cfg: RLConfig) -> list[dict[str, Any]]:
        from tasks.prefs.score import check_reward_model

        _, policy, rm = self._parts(inputs, cfg)
        if rm is not None:
            check_reward_model(rm, "reward_from" if cfg.reward_from else "reward_model_path")
            if not cfg.retokenize_for_reward:
                from transformers import AutoTokenizer

                if AutoTokenizer.from_pretrained(policy).get_vocab() != AutoTokenizer.from_pretrained(rm).get_vocab():
                    raise StageInputError(
                        "retokenize_for_reward",
                        f"the policy ({policy}) and the reward model ({rm}) have different "
                        "tokenizers; set retokenize_for_reward: true to let the reward model read the text",
                    )
        world = launch.world_size(cfg)
        if cfg.rollout_prompts % world:
            raise StageInputError("rollout_prompts", f"{cfg.rollout_prompts} prompts do not split over {world} ranks")
        per_rank = cfg.rollout_prompts // world * cfg.samples
        if per_rank % (cfg.micro_batch_size * cfg.grad_accum):
            raise StageInputError(
                "micro_batch_size",
                f"a rank's {per_rank} replies per iteration are not whole "
                f"optimizer steps of micro_batch_size x grad_accum = {cfg.micro_batch_size * cfg.grad_accum}",
            )
        return [{"run": 0}]

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: RLConfig, out: ArtifactWriter) -> None:
        launch.check_hardware(cfg)
        if out.scratch is None:
            raise StageInputError("store.root", "the rl stage trains on a local store (its ranks read local files)")
        prompts, policy, rm = self._parts(inputs, cfg)
        rows = [
            [r["id"], parse_meta(r["meta"]).get("prompt")]
            for r in prompts.read_table(columns=["id", "meta"]).to_pylist()
        ]
        rows = [r for r in rows if r[1]]
        if not rows:
            raise StageInputError("inputs", f"{prompts.path} holds no prompts")
        prompts_file = os.path.join(out.scratch, "prompts.json")
        with open(prompts_file, "w") as f:
            json.dump(rows, f)
        ds_config = launch.deepspeed_config(cfg, launch.world_size(cfg))
        run = {
            "config": cfg.model_dump(mode="json"),
            "deepspeed_config": ds_config,
            "policy_dir": policy,
            "reward_model_dir": rm,
            "prompts_file": prompts_file,
            "output_dir": out.directory,
        }
        run_json = os.path.join(out.scratch, "run.json")
        with open(run_json, "w") as f:
            json.dump(run, f, indent=2)
        repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

        def on_event(event: dict[str, Any]) -> None:
            if event.get("kiln") == "rl":
                i = event["iteration"]
                out.progress(
                    i / cfg.iterations,
                    f"iteration {i}/{cfg.iterations}, reward {event['reward']:.4f}, KL {event['kl']:.4f}",
                )

        launch.run(cfg, run_json, on_event=on_event, cwd=repo_root, keep_fds=(out.lock_fd,), module="tasks.rl.worker")
        with open(os.path.join(out.directory, "metrics.json")) as f:
            metrics = json.load(f)
        history = [h for h in metrics["history"] if h["kind"] == "rl"]
        write_report(out.directory, cfg, metrics)
        out.table("metrics").write(
            pa.table(
                {
                    "iteration": pa.array([h["iteration"] for h in history for k in h if _scalar(h, k)], pa.int64()),
                    "metric": pa.array([k for h in history for k in h if _scalar(h, k)], pa.string()),
                    "value": pa.array([float(h[k]) for h in history for k in h if _scalar(h, k)], pa.float64()),
                }
            )
        )
        samples = [
            dict(r, iteration=h["iteration"]) for h in metrics["history"] if h["kind"] == "samples" for r in h["rows"]
        ]
        if samples:
            out.table("samples").write(pa.Table.from_pylist(samples))
        if history:
            out.stats.extra.update(
                iterations=metrics["iterations"],
                first_reward=history[0]["reward"],
                final_reward=history[-1]["reward"],
                final_kl=history[-1]["kl"],
            )

    def finalize(self, inputs: list[Artifact], cfg: RLConfig, directory: str, fs: Any) -> dict[str, Any]:
        return {"objective": "rl", "algorithm": cfg.algorithm, "method": cfg.method.method}


def _scalar(h: dict[str, Any], k: str) -> bool:
    return k not in ("kind", "iteration") and isinstance(h[k], (int, float)) and not isinstance(h[k], bool)


def write_report(out_dir: str, cfg: RLConfig, metrics: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = [h for h in metrics["history"] if h["kind"] == "rl"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), dpi=100)
    steps = [h["iteration"] for h in history]
    axes[0].plot(steps, [h["reward"] for h in history], marker="o")
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("mean reward of the rollouts")
    axes[1].plot(steps, [h["kl"] for h in history], marker="o", color="tab:red")
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("KL to the starting policy")
    fig.suptitle(f"{cfg.algorithm}: {cfg.method.method}, ZeRO-{cfg.deepspeed.zero_stage}")
    fig.tight_layout()
    png = os.path.join(out_dir, "reward_curve.png")
    fig.savefig(png)
    plt.close(fig)
    with open(png, "rb") as f:
        uri = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    cols = [
        "reward",
        "kl",
        "entropy",
        "clip_fraction",
        "value_loss",
        "reply_length",
        "rollout_s",
        "scoring_s",
        "update_s",
    ]
    cols = [c for c in cols if history and c in history[-1]]
    lines = [
        f"# RL ({cfg.algorithm}): {metrics['iterations']} iterations",
        "",
        "| iteration | " + " | ".join(cols) + " |",
        "|---:|" + "---:|" * len(cols),
    ]
    lines += [f"| {h['iteration']} | " + " | ".join(f"{h[c]:.4f}" for c in cols) + " |" for h in history]
    samples = [h for h in metrics["history"] if h["kind"] == "samples"]
    if samples:
        lines += ["", "## Samples", "", "| iteration | prompt | reply | reward |", "|---:|---|---|---:|"]
        for h in samples:
            for r in h["rows"]:

                def cell(t: str) -> str:
                    return " ".join(str(t).split())[:100].replace("|", "\\|")

                lines.append(f"| {h['iteration']} | {cell(r['prompt'])} | {cell(r['reply'])} | {r['reward']:.4f} |")
    lines += ["", f"![reward and KL]({uri})", ""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
