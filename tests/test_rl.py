"""RLHF: the RL arithmetic against hand-computed values, feedback (votes, a judge, answer files, the
labelling flow through a real Prefect server), a reward model, PPO and RLOO on 2 CPU ranks raising the true
reward, and a SIGKILLed PPO run resumed to the same metrics."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest
import torch

from flows.config import PipelineConfig
from tasks.artifacts import Artifact, ArtifactStore
from tasks.prefs.feedback import FeedbackConfig, FeedbackStage, offered_pairs
from tasks.prefs.schema import CANDIDATES_SCHEMA
from tasks.rl import algorithms as alg
from tasks.stage import run_in_store

from conftest import REPO, write_jsonl
from train_fixtures import make_char_policy, write_prompts

# --------------------------------------------------------------------------------------------------
# the arithmetic


def test_gae_matches_a_hand_computation_with_the_reply_after_its_prompt():
    # positions 0-1 are the prompt, 2-4 the reply, 5 padding
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]], dtype=torch.float32)
    values = torch.tensor([[9.0, 9.0, 0.5, 0.6, 0.7, 9.0]])
    rewards = torch.tensor([[0.0, 0.0, -0.1, -0.1, 0.9, 0.0]])
    adv, ret = alg.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    d4 = 0.9 - 0.7  # the last token: no value after it
    d3 = -0.1 + 0.7 - 0.6
    d2 = -0.1 + 0.6 - 0.5
    a4, a3 = d4, d3 + 0.95 * d4
    a2 = d2 + 0.95 * a3
    assert torch.allclose(adv, torch.tensor([[0, 0, a2, a3, a4, 0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0, 0, a2 + 0.5, a3 + 0.6, a4 + 0.7, 0]]), atol=1e-6)
    adv, _ = alg.gae(rewards, values, mask, gamma=0.5, lam=1.0)  # discounting: delta_t = r + 0.5 V' - V
    e4, e3 = 0.9 - 0.7, -0.1 + 0.5 * 0.7 - 0.6
    assert adv[0, 3].item() == pytest.approx(e3 + 0.5 * e4)


def test_kl_estimators_rewards_and_baselines_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.allclose(alg.kl_estimate(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]  # (q/p - 1) - log(q/p)
    assert torch.allclose(alg.kl_estimate(logp, ref, "k3"), torch.tensor(k3), atol=1e-6)
    assert (alg.kl_estimate(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float32)
    kl = torch.tensor([[9.0, 0.2, 0.4, 9.0], [0.1, 0.1, 0.1, 0.1]])
    r = alg.token_rewards(torch.tensor([1.0, 2.0]), kl * mask, mask, kl_coef=0.5)
    assert torch.allclose(r, torch.tensor([[0, -0.1, 0.8, 0], [-0.05, -0.05, -0.05, 1.95]]))
    # RLOO: each sample against the mean of the others in its group of 3
    adv = alg.rloo_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), group=3)
    assert torch.allclose(adv, torch.tensor([1 - 4, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0]))


def test_clipped_losses_by_hand():
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.9]]))  # ratios 1.5 and 0.9
    adv = torch.tensor([[1.0, -1.0]])
    loss, clipped = alg.policy_loss(logp, old, adv, mask, clip=0.2)
    # token 1: max(-1*1.5, -1*1.2) = -1.2 (clipped); token 2: max(1*0.9, 1*0.9) = 0.9
    assert loss.item() == pytest.approx((-1.2 + 0.9) / 2) and clipped.item() == pytest.approx(0.5)
    v = alg.value_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 1.0]]), mask, 0.5)
    # token 1: max((2-3)^2, (1.5-3)^2) = 2.25; token 2: max(1, 1) = 1
    assert v.item() == pytest.approx(0.5 * (2.25 + 1) / 2)
    w = alg.whiten(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.allclose(w, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4)


# --------------------------------------------------------------------------------------------------
# feedback


def _candidates(store: ArtifactStore, groups: dict[str, list[str]]) -> Artifact:
    rows = [
        {
            "id": f"{p}#{k}",
            "prompt_id": p,
            "sample": k,
            "prompt": json.dumps([{"role": "user", "content": f"q {p}"}]),
            "reply": reply,
            "finished": "eos",
            "n_tokens": len(reply),
        }
        for p, replies in groups.items()
        for k, reply in enumerate(replies)
    ]
    staging = store.staging("generate", "cands")
    w = staging.begin_unit(0)
    w.write(pa.Table.from_pylist(rows, schema=CANDIDATES_SCHEMA))
    staging.finish_unit(0, w)
    return staging.commit({"stage": "generate", "fingerprint": "cands", "config": {}, "inputs": []}, 1)


def test_feedback_votes_from_answer_files_and_a_judge(tmp_path):
    store = ArtifactStore(str(tmp_path / "s"))
    cands = _candidates(
        store, {"p1": ["aa", "b"], "p2": ["x", "x", "ya"], "p3": ["same", "same"], "p4": ["a", "c"], "p5": ["q", "r"]}
    )
    pairs = {p["pair_id"]: p for p in offered_pairs(cands, FeedbackConfig(ui=False))}
    assert sorted(pairs) == ["p1:0-1", "p2:0-2", "p4:0-1", "p5:0-1"]  # identical replies are never offered
    answers = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"pair_id": "p1:0-1", "choice": "A", "annotator": "ann1"},
            {"pair_id": "p1:0-1", "choice": "A", "annotator": "ann2"},
            {"pair_id": "p2:0-2", "choice": "B", "annotator": "ann1"},
            {"pair_id": "p2:0-2", "choice": "A", "annotator": "ann2"},
            {"pair_id": "p4:0-1", "choice": "skip"},
            {"pair_id": "nope", "choice": "A"},
            {"pair_id": "p1:0-1", "choice": "C"},
        ],
    )
    (tmp_path / "b.csv").write_text("pair_id,choice,annotator\np2:0-2,B,ann3\n")
    art = run_in_store(
        FeedbackStage(), FeedbackConfig(ui=False, answers=[answers, str(tmp_path / "b.csv")]), [cands], store
    )
    rows = {r["id"]: r for r in art.read_table().to_pylist()}
    assert sorted(rows) == ["p1:0-1", "p2:0-2"]
    assert (rows["p1:0-1"]["chosen"], rows["p2:0-2"]["chosen"]) == ("aa", "ya")  # p2: B wins 2 to 1
    assert art.stats.rejected == {"skipped": 1, "unanswered": 1}
    assert art.stats.extra["pairs_with_several_votes"] == 2 and art.stats.extra["agreement"] == 0.5
    bad = art.read_table(table="bad_answers").to_pylist()
    assert sorted(b["reason"] for b in bad) == ["bad_choice", "unknown_pair"] and art.stats.extra["bad_answers"] == 2
    judged = run_in_store(
        FeedbackStage(),
        FeedbackConfig(ui=False, judge={"rule": {"kind": "char_fraction", "chars": "a"}}),
        [cands],
        store,
    )
    out = {r["id"]: r for r in judged.read_table().to_pylist()}
    assert out["p1:0-1"]["chosen"] == "aa" and out["p4:0-1"]["chosen"] == "a"
    assert judged.stats.rejected == {"tie": 1}  # p5: neither has an "a"
    assert json.loads(out["p1:0-1"]["meta"])["simulated"] is True


def _label_config(tmp_path, policy: str) -> dict:
    return {
        "store": {"root": str(tmp_path / "store")},
        "prompts": {"paths": [write_prompts(str(tmp_path / "prompts.txt"), 4)]},
        "generate": {"model_path": policy, "samples": 2, "max_new_tokens": 10, "template": "alpaca"},
        "feedback": {"journal": str(tmp_path / "answers.jsonl"), "retries": 0},
    }


@pytest.mark.slow
def test_labelling_in_the_prefect_ui_survives_a_kill_and_becomes_preferences(tmp_path, prefect_server):
    """`kiln label` against a real Prefect server: it generates the candidates, then the flow run pauses on
    each pair with a form; answers sent through the API resume it and are kept at once; a choice not
    offered is refused; after a kill, a new run asks only the pairs left; the answers are committed as a
    preference artifact."""
    import yaml

    from flows.plan import plan_pipeline

    policy = make_char_policy(str(tmp_path / "policy"))
    cfg = _label_config(tmp_path, policy)
    (tmp_path / "label.yaml").write_text(yaml.safe_dump(cfg))
    planned = {p.name: p for p in plan_pipeline(PipelineConfig.model_validate(cfg))}
    assert not planned["generate"].committed  # kiln label generates the candidates it asks about

    cmd = [sys.executable, "-m", "flows.cli", "label", str(tmp_path / "label.yaml"), "feedback"]

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=prefect_server.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    dead: set[str] = set()  # a killed run stays Paused on the server: its pauses are nobody's to answer

    def paused_run(seen: set[str]) -> dict:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = prefect_server.post("/flow_runs/filter", {"flows": {"name": {"any_": ["kiln-label"]}}}).json()
            for r in runs:
                if r["id"] in dead:
                    continue
                keyset = (r.get("state") or {}).get("state_details", {}).get("run_input_keyset")
                if r["state_type"] == "PAUSED" and keyset and f"{r['id']}{keyset['response']}" not in seen:
                    got = prefect_server.get(f"/flow_runs/{r['id']}/input/{keyset['description']}")
                    if got.status_code == 200:
                        return {"run": r, "keyset": keyset, "description": got.json()}  # a JSON string
            time.sleep(0.3)
        raise AssertionError("no paused labelling run")

    seen: set[str] = set()
    proc = start()
    try:
        asked = []
        for answer in ("A", "B"):
            p = paused_run(seen)
            if not asked:
                pairs = offered_pairs(Artifact.open(planned["generate"].path), planned["feedback"].cfg)
                assert len(pairs) == 4
            asked.append(next(x["pair_id"] for x in pairs if f"`{x['pair_id']}`" in p["description"]))
            assert "Which reply is better?" in p["description"]
            if answer == "A":  # a choice not offered is refused by the server; the run stays paused
                r = prefect_server.post(f"/flow_runs/{p['run']['id']}/resume", {"run_input": {"choice": "C"}})
                assert r.json()["status"] == "REJECT", r.text
            r = prefect_server.post(
                f"/flow_runs/{p['run']['id']}/resume", {"run_input": {"choice": answer, "note": "test"}}
            )
            assert r.json()["status"] == "ACCEPT", r.text
            seen.add(f"{p['run']['id']}{p['keyset']['response']}")
        deadline = time.monotonic() + 60  # both answers on disk before the kill
        while len(open(cfg["feedback"]["journal"]).read().splitlines()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    dead |= {
        r["id"] for r in prefect_server.post("/flow_runs/filter", {"flows": {"name": {"any_": ["kiln-label"]}}}).json()
    }

    proc = start()  # the rerun asks only the two pairs left
    try:
        for answer in ("tie", "A"):
            p = paused_run(seen)
            pair_id = next(x["pair_id"] for x in pairs if f"`{x['pair_id']}`" in p["description"])
            assert pair_id not in asked
            asked.append(pair_id)
            r = prefect_server.post(f"/flow_runs/{p['run']['id']}/resume", {"run_input": {"choice": answer}})
            assert r.json()["status"] == "ACCEPT", r.text
            seen.add(f"{p['run']['id']}{p['keyset']['response']}")
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert sorted(asked) == sorted(p["pair_id"] for p in pairs)
    final = {p.name: p for p in plan_pipeline(PipelineConfig.model_validate(cfg))}["feedback"]
    art = Artifact.open(final.path)
    assert art.num_rows == 3 and art.stats.rejected == {"tie": 1}
    votes = art.read_table(table="votes").to_pylist()
    assert sorted(v["choice"] for v in votes) == ["A", "A", "B", "tie"] and {v["annotator"] for v in votes} == {"ui"}


# --------------------------------------------------------------------------------------------------
# reward model, PPO, RLOO: a tiny random model, the share of "a" in its replies as the true reward


def rl_block(algorithm: str, iterations: int, **over) -> dict:
    block = {
        "algorithm": algorithm,
        "template": "alpaca",
        "iterations": iterations,
        "rollout_prompts": 16,
        "samples": 2 if algorithm == "ppo" else 4,
        "max_new_tokens": 16,
        "micro_batch_size": 8,
        "kl_coef": 0.02,
        "save_every": 4,
        "optim": {"lr": 0.003, "warmup_steps": 0, "min_lr_ratio": 1.0},
    }
    return {**block, **over}


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory, prefect_harness):
    from flows.pipeline import pipeline

    d = tmp_path_factory.mktemp("ppo")
    policy = make_char_policy(str(d / "policy"))
    cfg = {
        "store": {"root": str(d / "store")},
        "prompts": {"paths": [write_prompts(str(d / "p.txt"), 48)], "source": "ppo-prompts"},
        "rl": {
            **rl_block("ppo", 12),
            "policy": {"name_or_path": policy},
            "rule": {"kind": "char_fraction", "chars": "a"},
        },
    }
    refs = pipeline(config=PipelineConfig.model_validate(cfg))
    return {"dir": d, "cfg": cfg, "refs": refs}


def _rl_history(path: str) -> list[dict]:
    return [h for h in json.load(open(os.path.join(path, "metrics.json")))["history"] if h["kind"] == "rl"]


@pytest.mark.slow
def test_ppo_raises_the_reward_with_the_kl_logged(ppo_run):
    history = _rl_history(ppo_run["refs"]["rl"]["path"])
    assert len(history) == 12
    first, last = history[0]["reward"], sum(h["reward"] for h in history[-2:]) / 2
    assert last >= 4 * first, [h["reward"] for h in history]
    assert all({"kl", "entropy", "clip_fraction", "value_loss", "reply_length"} <= set(h) for h in history)
    assert history[-1]["kl"] > history[0]["kl"]  # the policy moved away from where it started
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ppo_run["refs"]["rl"]["path"])  # the export loads
    report = open(os.path.join(ppo_run["refs"]["rl"]["path"], "report.md")).read()
    assert "## Samples" in report and "![reward and KL](data:image/png;base64," in report


@pytest.mark.slow
def test_a_killed_ppo_run_resumes_from_its_last_checkpoint_with_the_same_metrics(ppo_run, tmp_path):
    import yaml

    from flows.plan import plan_pipeline

    cfg = json.loads(json.dumps(ppo_run["cfg"]))
    cfg["store"]["root"] = str(tmp_path / "store")
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rl = {p.name: p for p in plan_pipeline(PipelineConfig.model_validate(cfg))}["rl"]
    latest = tmp_path / "store" / "rl" / f".staging-{rl.fingerprint}" / "checkpoints" / "policy" / "latest"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    cmd = [sys.executable, "-m", "flows.cli", "run", str(path)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not (latest.exists() and latest.read_text() == "iter4"):
        assert proc.poll() is None and time.monotonic() < deadline, "never saw the iteration-4 checkpoint"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = _rl_history(str(tmp_path / "store" / "rl" / rl.fingerprint))
    reference = _rl_history(ppo_run["refs"]["rl"]["path"])
    assert [h["iteration"] for h in resumed] == list(range(1, 13))
    for got, want in zip(resumed[4:], reference[4:]):
        for key in ("reward", "kl", "value_loss", "policy_loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (got["iteration"], key)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_simulated_feedback_reward_model_and_rloo_raise_the_true_reward(tmp_path):
    """A judge stands in for people (simulated preferences, recorded as such) -> a reward model on the
    policy's backbone -> RLOO against the reward model; the true reward of fresh samples rises."""
    from flows.pipeline import pipeline

    policy = make_char_policy(str(tmp_path / "policy"))
    truth = {"rule": {"kind": "char_fraction", "chars": "a"}}
    sample = {"samples": 4, "temperature": 1.0, "max_new_tokens": 16, "template": "alpaca"}
    cfg = {
        "store": {"root": str(tmp_path / "store")},
        "prompts": {"paths": [write_prompts(str(tmp_path / "p.txt"), 96)], "source": "rm-prompts"},
        "generate": {"model_path": policy, **sample},
        "truth": {"kind": "score", **truth},
        "feedback": {"ui": False, "pairs_per_prompt": 3, "judge": truth},
        "pref_tokenize": {
            "tokenizer": policy,
            "template": "alpaca",
            "validation_fraction": 0.2,
            "inputs": {"pairs": "feedback"},
        },
        "rm": {
            "kind": "train",
            "objective": "reward",
            "model": {"name_or_path": policy},
            "inputs": {"data": "pref_tokenize"},
            "max_steps": 60,
            "micro_batch_size": 8,
            "eval_every": 20,
            "eval_batches": None,
            "save_every": 100,
            "optim": {"lr": 0.002, "warmup_steps": 5},
        },
        "rl": {**rl_block("rloo", 10), "policy": {"name_or_path": policy}, "reward_from": "rm"},
        "final": {"kind": "generate", "model_from": "rl", **sample, "seed": 5},
        "final_truth": {"kind": "score", **truth, "inputs": {"candidates": "final"}},
    }
    refs = pipeline(config=PipelineConfig.model_validate(cfg))
    rm = json.load(open(os.path.join(refs["rm"]["path"], "metrics.json")))
    assert [h for h in rm["history"] if h["kind"] == "validation"][-1]["accuracy"] >= 0.9
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(refs["rm"]["path"]).config.num_labels == 1
    before = Artifact.open(refs["truth"]["path"]).manifest["scores"]["mean"]
    after = Artifact.open(refs["final_truth"]["path"]).manifest["scores"]["mean"]
    assert after >= 4 * before, (before, after)
    assert all("kl" in h for h in _rl_history(refs["rl"]["path"]))
