"""Real multi-process DeepSpeed training on CPU (2 gloo ranks): ZeRO-2, ZeRO-3, LoRA, resume, faults."""

from __future__ import annotations

import json
import os

import pytest

from tasks.artifacts import Artifact, ArtifactStore
from tasks.stage import run_in_store
from tasks.train.config import TrainConfig
from tasks.train.launch import TrainLaunchError
from tasks.train.stage import TrainStage

from train_fixtures import make_packed, make_tokenizer

pytestmark = pytest.mark.slow

TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("train-inputs")
    tok = make_tokenizer(str(d / "tokenizer"))
    pack = make_packed(str(d / "pack"), tok.path, seq_len=64)
    return pack, tok


def train_cfg(**over) -> TrainConfig:
    base = dict(
        model={"init": TINY},
        max_steps=12,
        micro_batch_size=4,
        eval_every=6,
        eval_batches=2,
        log_every=1,
        save_every=4,
        seq_len=64,
        optim={"lr": 3e-3, "warmup_steps": 2},
    )
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return TrainConfig.model_validate(base)


def run(tmp_path, inputs, **over):
    return run_in_store(TrainStage(), train_cfg(**over), list(inputs), ArtifactStore(str(tmp_path / "store")))


def losses(art, kind="train"):
    return [
        (h["step"], h["loss"])
        for h in json.load(open(os.path.join(art.path, "metrics.json")))["history"]
        if h["kind"] == kind
    ]


def test_zero2_full_finetune_saves_a_model_that_loads_and_generates(tmp_path, inputs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    art = run(tmp_path, inputs, deepspeed={"zero_stage": 2})
    files = set(os.listdir(art.path))
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "deepspeed_config.json",
        "metrics.json",
        "loss_curve.png",
        "report.md",
        "checkpoints",
        "tensorboard",
    } <= files
    val = losses(art, "validation")
    assert len(val) == 2 and val[-1][1] < val[0][1]  # validation loss falls
    assert art.stats.extra["steps"] == 12 and art.table_rows("metrics") > 12
    model = AutoModelForCausalLM.from_pretrained(art.path)
    tok = AutoTokenizer.from_pretrained(art.path)
    out = model.generate(**tok("The module", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > 2
    ds = json.load(open(os.path.join(art.path, "deepspeed_config.json")))
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 8


def test_early_stopping_ends_the_run_and_still_saves(tmp_path, inputs):
    # A learning rate far below float32 resolution leaves the weights as they are: the validation loss
    # never improves after the first evaluation, so patience 2 stops the run at the third (step 6 of 12).
    art = run(tmp_path, inputs, optim={"lr": 1e-30, "warmup_steps": 0}, eval_every=2, early_stopping_patience=2)
    metrics = json.load(open(os.path.join(art.path, "metrics.json")))
    assert metrics["steps"] == 6, metrics["stopped"]
    assert metrics["stopped"].startswith("early stopping: no better validation loss in 2 evaluations")
    assert [s for s, _ in losses(art, "validation")] == [2, 4, 6]
    assert os.path.exists(os.path.join(art.path, "model.safetensors"))


def test_remote_store_trains_on_local_copies_and_uploads_the_model(tmp_path, inputs, monkeypatch):
    """A store that is not a local directory (fsspec's in-memory filesystem here, s3:// for users): the
    inputs are fetched to a local cache, the ranks train there, the model is uploaded into the artifact."""
    import fsspec
    from transformers import AutoModelForCausalLM

    fs = fsspec.filesystem("memory")
    remote_inputs = []
    for art in inputs:
        dest = f"/kiln-remote-inputs/{tmp_path.name}/{art.stage}"
        fs.put(art.path, dest, recursive=True)
        remote_inputs.append(Artifact.open(f"memory://{dest}"))
    monkeypatch.setenv("KILN_TRAIN_CACHE", str(tmp_path / "cache"))
    store = ArtifactStore(f"memory://kiln-store-{tmp_path.name}")
    art = run_in_store(TrainStage(), train_cfg(max_steps=6, eval_every=3), remote_inputs, store)
    assert art.path.startswith("memory://") and art.stats.extra["steps"] == 6
    assert art.table_rows("metrics") > 6
    local = tmp_path / "downloaded"
    art.fs.get(art.fs._strip_protocol(art.path), str(local), recursive=True)
    assert {"model.safetensors", "tokenizer.json", "metrics.json", "report.md"} <= set(os.listdir(local))
    assert AutoModelForCausalLM.from_pretrained(str(local)).config.num_hidden_layers == 2
    assert os.listdir(tmp_path / "cache") == []  # the local working copy is gone once uploaded

    # the remote model samples: generate copies its top-level files (weights included) to a local directory
    from tasks.prefs import GenerateConfig, GenerateStage, PromptsConfig, PromptsStage

    (tmp_path / "prompts.txt").write_text("say something\nsay more\n")
    prompts = run_in_store(PromptsStage(), PromptsConfig(paths=[str(tmp_path / "prompts.txt")]), [], store)
    cands = run_in_store(
        GenerateStage(),
        GenerateConfig(samples=1, max_new_tokens=4, template="alpaca", device="cpu"),
        [Artifact.open(prompts.path, "prompts"), Artifact.open(art.path, "model")],
        store,
    )
    assert cands.num_rows == 2


def test_zero3_full_finetune(tmp_path, inputs):
    from transformers import AutoModelForCausalLM

    art = run(tmp_path, inputs, deepspeed={"zero_stage": 3}, max_steps=4, eval_every=4)
    model = AutoModelForCausalLM.from_pretrained(art.path)
    assert model.config.hidden_size == 64 and sum(p.numel() for p in model.parameters()) > 100_000


def test_lora_under_zero2_saves_adapter_and_merged_model(tmp_path, inputs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    art = run(tmp_path, inputs, method={"method": "lora", "lora_r": 4}, max_steps=6, eval_every=6)
    assert os.path.exists(os.path.join(art.path, "adapter", "adapter_model.safetensors"))
    assert art.stats.extra["trainable_parameters"] < art.stats.extra["parameters"] / 10
    merged = AutoModelForCausalLM.from_pretrained(art.path)
    base = AutoModelForCausalLM.from_pretrained(art.path)  # any model of the same shape takes the adapter
    assert isinstance(PeftModel.from_pretrained(base, os.path.join(art.path, "adapter")), PeftModel)
    assert merged.config.num_hidden_layers == 2


def test_gpu_asked_on_a_cpu_machine_fails_before_launch(tmp_path, inputs):
    with pytest.raises(TrainLaunchError, match="train.launch.device: gpu, but this machine has no CUDA GPU"):
        run(tmp_path, inputs, launch={"device": "gpu"})


def test_sequence_length_mismatch_is_refused(tmp_path, inputs):
    with pytest.raises(TrainLaunchError, match="seq_len: the config says 128, the dataset's sequences have 64"):
        run(tmp_path, inputs, seq_len=128)


KILL_SCRIPT = """
import sys, json
sys.path.insert(0, "tests")
from tasks.artifacts import ArtifactStore, Artifact
from tasks.stage import run_in_store
from tasks.train.config import TrainConfig
from tasks.train.stage import TrainStage
cfg = TrainConfig.model_validate(json.loads(sys.argv[1]))
inputs = [Artifact.open(p) for p in sys.argv[3:]]
run_in_store(TrainStage(), cfg, inputs, ArtifactStore(sys.argv[2]))
"""


def test_rank_killed_then_rerun_resumes_with_identical_losses(tmp_path, inputs):
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from conftest import REPO

    over = dict(max_steps=30, save_every=10, eval_every=30, log_every=1)
    cfg = train_cfg(**over)
    reference = run_in_store(TrainStage(), cfg, list(inputs), ArtifactStore(str(tmp_path / "reference")))
    ref_losses = dict(losses(reference))

    root = str(tmp_path / "killed")
    fp = TrainStage().fingerprint(cfg, [a.fingerprint for a in inputs])
    latest = os.path.join(root, "train", f".staging-{fp}", "checkpoints", "latest")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, cfg.model_dump_json(), root, *(a.path for a in inputs)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim is None:
        if os.path.exists(latest) and open(latest).read().strip() == "step10":
            for p in psutil.Process(proc.pid).children(recursive=True):
                cmd = " ".join(p.cmdline())
                if "tasks.train.worker" in cmd and p.environ().get("RANK") == "1":
                    victim = p
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    assert victim is not None, "never saw the step-10 checkpoint"
    victim.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "rank 1 was killed by SIGKILL" in err

    resumed = run_in_store(TrainStage(), cfg, list(inputs), ArtifactStore(root))
    history = json.load(open(os.path.join(resumed.path, "metrics.json")))["history"]
    steps = [h["step"] for h in history if h["kind"] == "train"]
    assert steps == list(range(1, 31))  # the history before the checkpoint came back with it
    after = {s: loss for s, loss in losses(resumed) if s > 10}
    for step, loss in after.items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), step


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, inputs):
    with pytest.raises(TrainLaunchError, match=r"training stopped on rank \d: loss is (nan|inf)"):
        run(tmp_path, inputs, optim={"lr": 1e30, "warmup_steps": 0, "grad_clip": 0}, max_steps=40, save_every=1)
    ckpts = [p for p in (tmp_path / "store" / "train").glob(".staging-*/checkpoints/step*")]
    assert ckpts, "no checkpoint kept"


def test_the_checkpoint_pointer_names_whole_checkpoints_only(tmp_path):
    from tasks.train import checkpoints

    d = tmp_path / "ckpt"
    for step in (8, 16, 24, 32):
        (d / f"step{step}").mkdir(parents=True)
    assert checkpoints.latest(str(d)) is None  # no pointer yet: a fresh start
    (d / "latest").write_text("")  # a pointer cut off while written (DeepSpeed truncates, then writes)
    assert checkpoints.latest(str(d)) is None
    (d / "latest").write_text("step40")  # names a checkpoint that is not there
    assert checkpoints.latest(str(d)) is None
    (d / "latest").write_text("step16")  # a resumed run whose newer, half-written step24/32 remain
    checkpoints.prune(str(d), "step", 1)
    assert sorted(os.listdir(d)) == ["latest", "step16", "step32"]  # what the pointer names survives pruning
    assert checkpoints.latest(str(d)) == "step16"
