"""Evaluation: lm-evaluation-harness tasks on tiny real models (Kiln's numbers equal the harness's own CLI),
caching per task, bad input recorded per task, a hub task offline refused before the model loads,
held-out perplexity against a hand computation, classifier metrics against scikit-learn, generation
metrics, contamination (reported, and dropped by the clean stage), and models compared side by side."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from flows.config import PipelineConfig
from flows.plan import plan_pipeline
from tasks.artifacts import Artifact, ArtifactStore
from tasks.clean import CleanStage
from tasks.eval import EvalCompareConfig, EvalCompareStage, EvalConfig, EvalStage, harness
from tasks.eval.contamination import NgramIndex, overlap_report
from tasks.eval.heldout import target_runs, text_metrics
from tasks.ingest import IngestStage, SftIngestStage
from tasks.stage import StageInputError, run_in_store

from conftest import write_jsonl
from train_fixtures import REPO, make_packed, make_tokenizer

FIXTURES = os.path.join(REPO, "examples", "eval")
FIXTURE_TASKS = {
    "hellaswag_fixture": "hellaswag.yaml",
    "winogrande_fixture": "winogrande.yaml",
    "truthfulqa_mc2_fixture": "truthfulqa_mc2.yaml",
    "mmlu_fixture": "mmlu.yaml",
}


def _manifest(path: str, **fields) -> Artifact:
    manifest = {"rows": 0, "shards": [], "tables": {}, **fields}
    with open(os.path.join(path, "_manifest.json"), "w") as f:
        json.dump(manifest, f)
    return Artifact.open(path)


def tiny_llama(directory: str, seed: int = 0, tokenizer: bool = True, head: str = "causal", labels=()) -> str:
    """A random small Llama over the repo-trained BPE (a language model, or a sequence classifier)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    make_tokenizer(directory, vocab_size=384)
    os.remove(os.path.join(directory, "_manifest.json"))
    torch.manual_seed(seed)
    extra = {}
    if head == "classifier":
        extra = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {n: i for i, n in enumerate(labels)},
        }
    config = LlamaConfig(
        vocab_size=384,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )
    cls = LlamaForSequenceClassification if head == "classifier" else LlamaForCausalLM
    cls(config).save_pretrained(directory)
    if not tokenizer:
        for name in os.listdir(directory):
            if name.startswith("tokenizer") or name == "special_tokens_map.json":
                os.remove(os.path.join(directory, name))
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {"a": tiny_llama(str(d / "a"), seed=0), "b": tiny_llama(str(d / "b"), seed=1)}


def _store(tmp_path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "store"))


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, FIXTURE_TASKS[name])


def metrics_of(art: Artifact) -> dict[tuple[str, str], float]:
    return {(r["subtask"], r["metric"]): r["value"] for r in art.read_table().to_pylist()}


# --------------------------------------------------------------------------------------------------
# the harness: the same numbers as its CLI


def cli_task_files(directory: str) -> list[str]:
    """The shipped fixture tasks as plain lm_eval files (an absolute include, absolute data files), which
    lm_eval's CLI reads as they are."""
    os.makedirs(directory, exist_ok=True)
    out = []
    for file in FIXTURE_TASKS.values():
        with open(os.path.join(FIXTURES, file)) as f:
            cfg = yaml.safe_load(f)
        cfg["include"] = os.path.join(harness.installed_tasks_dir(), cfg["include"])
        files = cfg["dataset_kwargs"]["data_files"]
        cfg["dataset_kwargs"]["data_files"] = {k: os.path.join(FIXTURES, v) for k, v in files.items()}
        path = os.path.join(directory, file)
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        assert harness.cli_compatible(path)
        out.append(path)
    return out


@pytest.mark.slow  # lm_eval's CLI in a subprocess (it indexes every installed task first)
def test_numbers_equal_lm_evals_own_cli_on_the_same_model_tasks_and_settings(tmp_path, models):
    tasks = cli_task_files(str(tmp_path / "tasks"))
    art = run_in_store(EvalStage(), EvalConfig(model_path=models["a"], tasks=tasks, batch_size=4), [], _store(tmp_path))
    assert not art.manifest["errors"]
    ours = metrics_of(art)

    out = tmp_path / "cli"
    cli = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [cli, "run", "--model", "hf", "--model_args", f"pretrained={models['a']},dtype=float32", "--tasks",
           ",".join(FIXTURE_TASKS), "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size",
           "4", "--output_path", str(out), "--log_samples"]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    (results_file,) = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.startswith("results_")]
    with open(results_file) as f:
        theirs = json.load(f)

    compared = 0
    for task in FIXTURE_TASKS:
        for key, value in theirs["results"][task].items():
            metric, _, filt = key.partition(",")
            if filt and "_stderr" not in metric and isinstance(value, float):
                assert ours[(task, metric)] == pytest.approx(value, abs=1e-6), (task, metric)
                compared += 1
        row = next(r for r in art.read_table().to_pylist() if r["subtask"] == task and r["headline"])
        assert row["n"] == theirs["n-samples"][task]["effective"]
        assert row["num_fewshot"] == theirs["n-shot"][task]
        # the harness's own files, beside the table: the same results and one sample log line per example
        with open(os.path.join(art.path, "harness", task, "results.json")) as f:
            assert json.load(f)["results"][task][f"{row['metric']},none"] == pytest.approx(row["value"], abs=0)
        with open(os.path.join(art.path, "harness", task, f"samples_{task}.jsonl")) as f:
            assert len(f.readlines()) == row["n"]
    assert compared == 5  # HellaSwag's acc and acc_norm, the others' acc
    headline = {r["task"]: r["metric"] for r in art.manifest["summary"]}
    assert headline == {
        "hellaswag_fixture": "acc_norm",
        "winogrande_fixture": "acc",
        "truthfulqa_mc2_fixture": "acc",
        "mmlu_fixture": "acc",
    }


def test_shipped_fixtures_run_as_kiln_reads_them_and_the_preset_pins_the_leaderboard_settings(tmp_path, models):
    """The fixtures include lm_eval's tasks by a path relative to its installed tasks and name their data
    relative to themselves; the leaderboard's shots are in the files."""
    cfg = EvalConfig(model_path=models["a"], tasks=[fixture(n) for n in FIXTURE_TASKS], limit=4)
    art = run_in_store(EvalStage(), cfg, [], _store(tmp_path))
    shots = {r["task"]: r["num_fewshot"] for r in art.manifest["summary"]}
    assert shots == {"hellaswag_fixture": 10, "winogrande_fixture": 5, "truthfulqa_mc2_fixture": 0, "mmlu_fixture": 5}
    assert "Kiln resolved an include" in open(os.path.join(art.path, "report.md")).read()

    preset = EvalConfig(model_path=models["a"], preset="open_llm_v1", num_fewshot={"mmlu": 0})
    assert preset.task_specs() == ["hellaswag", "winogrande", "truthfulqa_mc2", "mmlu"]
    assert [preset.shots_for(t) for t in preset.task_specs()] == [10, 5, 0, 0]
    assert [preset.metric_for(t) for t in preset.task_specs()] == ["acc_norm", "acc", "acc", "acc"]


# --------------------------------------------------------------------------------------------------
# caching


def test_a_rerun_is_cached_and_an_edited_task_file_reevaluates_only_that_task(tmp_path, models):
    tasks_dir = tmp_path / "tasks"
    shutil.copytree(FIXTURES, tasks_dir)
    store = _store(tmp_path)
    cfg = EvalConfig(
        model_path=models["a"], tasks=[str(tasks_dir / "winogrande.yaml"), str(tasks_dir / "mmlu.yaml")], limit=6
    )
    first = run_in_store(EvalStage(), cfg, [], store)
    again = run_in_store(EvalStage(), cfg, [], store)
    assert again.path == first.path and again.manifest["created_at"] == first.manifest["created_at"]

    data = tasks_dir / "data" / "mmlu_test.jsonl"  # one answer of MMLU changes: only MMLU is evaluated again
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[0]["answer"] = (rows[0]["answer"] + 1) % 4
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    edited = run_in_store(EvalStage(), cfg, [], store)
    assert edited.fingerprint != first.fingerprint
    units = {u["unit"]: u for u in edited.manifest["unit_results"]}
    assert units[0].get("reused_from") == first.fingerprint  # winogrande: copied
    assert "reused_from" not in units[1]  # mmlu: evaluated
    assert metrics_of(edited)[("winogrande_fixture", "acc")] == metrics_of(first)[("winogrande_fixture", "acc")]

    shots = run_in_store(EvalStage(), cfg.model_copy(update={"num_fewshot": {"winogrande_fixture": 1}}), [], store)
    assert {u["unit"]: "reused_from" in u for u in shots.manifest["unit_results"]} == {0: False, 1: True}


# --------------------------------------------------------------------------------------------------
# bad input


def test_bad_task_input_is_recorded_naming_the_file_before_the_model_loads_and_other_tasks_run(tmp_path, models):
    tasks_dir = tmp_path / "tasks"
    shutil.copytree(FIXTURES, tasks_dir)
    (tasks_dir / "broken.yaml").write_text("task: broken\ninclude: [hellaswag/hellaswag.yaml\n")
    rows = [json.loads(line) for line in (tasks_dir / "data" / "hellaswag_validation.jsonl").read_text().splitlines()]
    del rows[3]["endings"]
    (tasks_dir / "data" / "hellaswag_validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(tasks_dir / "data" / "mmlu_test.jsonl", "a") as f:
        f.write('{"question": "cut off\n')
    # a model whose weights cannot load: any task that reached the model would fail the run
    broken_model = tmp_path / "model"
    shutil.copytree(models["a"], broken_model)
    (broken_model / "model.safetensors").write_bytes(b"not weights")
    specs = [str(tasks_dir / n) for n in ("broken.yaml", "hellaswag.yaml", "mmlu.yaml")]
    art = run_in_store(EvalStage(), EvalConfig(model_path=str(broken_model), tasks=specs), [], _store(tmp_path))

    errors = {e["task"]: e for e in art.manifest["errors"]}
    broken = errors[specs[0]]  # its name cannot be read: it is recorded under the path configured
    assert broken["reason"] == "bad_task_file" and broken["file"] == specs[0] and "does not parse" in broken["detail"]
    hs = errors["hellaswag_fixture"]
    assert hs["reason"] == "missing_field" and "row 4 of" in hs["detail"] and "'endings'" in hs["detail"]
    assert errors["mmlu_fixture"]["reason"] == "bad_data_file" and "line 17 of" in errors["mmlu_fixture"]["detail"]
    assert art.stats.rejected == {"bad_task_file": 1, "missing_field": 1, "bad_data_file": 1}
    report = open(os.path.join(art.path, "report.md")).read()
    assert "## Not evaluated" in report and "mmlu_test.jsonl" in report

    # the same bad files beside a good task and a model without a tokenizer: the good task is recorded as
    # such too, the other measurements of the model still run
    no_tok = tiny_llama(str(tmp_path / "no_tok"), tokenizer=False)
    tok = make_tokenizer(str(tmp_path / "tok"))
    packed = make_packed(str(tmp_path / "pack"), tok.path, seq_len=32)
    cfg = EvalConfig(model_path=no_tok, tasks=[str(tasks_dir / "winogrande.yaml")], perplexity=True, limit=2)
    art = run_in_store(EvalStage(), cfg, [Artifact.open(packed.path, "data")], _store(tmp_path))
    (error,) = art.manifest["errors"]
    assert error["reason"] == "no_tokenizer" and no_tok in error["detail"]
    assert [r["metric"] for r in art.manifest["summary"]] == ["perplexity"]  # no tokenizer to count bytes with
    assert "bits per byte left out" in art.stats.extra["perplexity_note"]


def test_an_unknown_task_and_a_hub_task_offline_are_clear_errors_naming_them(tmp_path, models, monkeypatch):
    with pytest.raises(StageInputError, match=r"unknown lm_eval task 'helaswag' \(did you mean hellaswag"):
        run_in_store(EvalStage(), EvalConfig(model_path=models["a"], tasks=["helaswag"]), [], _store(tmp_path))
    with pytest.raises(StageInputError, match="no such task file"):
        EvalStage().fingerprint(EvalConfig(model_path=models["a"], tasks=["nowhere/task.yaml"]), [])

    # offline, with empty caches: the hub task fails its unit before the model loads (its weights are
    # garbage here, so loading them would fail otherwise)
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    broken_model = tmp_path / "model"
    shutil.copytree(models["a"], broken_model)
    (broken_model / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(StageInputError, match="'EleutherAI/pythia-14m' is neither a local directory nor in the hub"):
        run_in_store(
            EvalStage(),
            EvalConfig(model_path="EleutherAI/pythia-14m", tasks=[fixture("mmlu_fixture")]),
            [],
            _store(tmp_path),
        )
    with pytest.raises(StageInputError, match="no such model directory"):
        EvalStage().fingerprint(EvalConfig(model_path="./no/such/model", tasks=[fixture("mmlu_fixture")]), [])
    offline = r"task 'hellaswag' reads the dataset 'Rowan/hellaswag' .*HF_HUB_OFFLINE is set"
    with pytest.raises(StageInputError, match=offline):
        run_in_store(EvalStage(), EvalConfig(model_path=str(broken_model), tasks=["hellaswag"]), [], _store(tmp_path))

    # beside a local task: that one is evaluated and kept in the staging area, so a rerun online redoes
    # only the hub task
    store = ArtifactStore(str(tmp_path / "store2"))
    cfg = EvalConfig(model_path=models["a"], tasks=[fixture("winogrande_fixture"), "hellaswag"], limit=2)
    with pytest.raises(StageInputError, match=offline):
        run_in_store(EvalStage(), cfg, [], store)
    staging = store.staging("eval", EvalStage().fingerprint(cfg, []))
    assert staging.unit_result(0)["stats"]["rows_out"] > 0 and staging.unit_result(1) is None


# --------------------------------------------------------------------------------------------------
# held-out measurements


def test_perplexity_and_bits_per_byte_equal_a_hand_computation_over_the_validation_split(tmp_path, models):
    """By hand: every document of every validation row run through the model on its own; the stage runs
    packed rows, so any attention across a document boundary would show."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    packed = make_packed(str(tmp_path / "pack"), models["a"], seq_len=48)
    cfg = EvalConfig(model_path=models["a"], perplexity=True, batch_size=5)
    art = run_in_store(EvalStage(), cfg, [Artifact.open(packed.path, "data")], _store(tmp_path))

    model = AutoModelForCausalLM.from_pretrained(models["a"]).eval()
    tok = AutoTokenizer.from_pretrained(models["a"])
    split = datasets.load_from_disk(os.path.join(packed.path, "hf"))["validation"]
    nll, tokens, nbytes, documents = 0.0, 0, 0, 0
    with torch.no_grad():
        for ids, pos in zip(split["input_ids"], split["position_ids"]):
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for a, b in zip(starts, starts[1:]):
                doc = ids[a:b]
                documents += 1
                if len(doc) < 2:
                    continue
                logp = torch.log_softmax(model(torch.tensor([doc])).logits[0, :-1].double(), -1)
                nll -= float(logp[torch.arange(len(doc) - 1), torch.tensor(doc[1:])].sum())
                tokens += len(doc) - 1
                nbytes += len(tok.decode(doc[1:], skip_special_tokens=True).encode("utf-8"))
    assert documents > len(split)  # rows hold several documents
    m = metrics_of(art)
    assert m[("perplexity", "loss")] == pytest.approx(nll / tokens, rel=1e-5)
    assert m[("perplexity", "perplexity")] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert m[("perplexity", "bits_per_byte")] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)
    assert art.stats.extra["tokens"] == tokens and art.stats.extra["bytes"] == nbytes
    assert target_runs([-100, 5, 6, -100, 7], -100) == [(1, 3), (4, 5)]


def _classifier_data(
    directory: str, tokenizer_dir: str, names: list[str], n: int = 60, fp: str = "cls-data"
) -> Artifact:
    import datasets
    from transformers import AutoTokenizer

    from train_fixtures import sample_texts

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = sample_texts()[:n]
    rows = {"input_ids": [tok(t)["input_ids"][:24] for t in texts], "label": [(i * 7) % len(names) for i in range(n)]}
    split = datasets.Dataset.from_dict(rows)
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(os.path.join(directory, "hf"))
    return _manifest(directory, stage="classify_tokenize", fingerprint=fp, labels=names)


def test_classifier_metrics_equal_scikit_learns_on_the_same_predictions(tmp_path, models):
    import torch
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score
    from transformers import AutoModelForSequenceClassification

    names = ["negative", "neutral", "positive"]
    clf = tiny_llama(str(tmp_path / "clf"), seed=3, head="classifier", labels=names)
    _manifest(clf, stage="train", fingerprint="clf-model", objective="classification", labels=names)
    data = _classifier_data(str(tmp_path / "data"), clf, names)
    inputs = [Artifact.open(clf, "model"), Artifact.open(data.path, "data")]
    art = run_in_store(
        EvalStage(), EvalConfig(model_from="clf", classification=True, batch_size=7), inputs, _store(tmp_path)
    )

    pred = art.read_table(table="predictions").to_pylist()
    y, p = [r["label"] for r in pred], [r["predicted"] for r in pred]
    assert len(y) == 60
    ks = list(range(len(names)))
    m = metrics_of(art)
    assert m[("classification", "accuracy")] == pytest.approx(accuracy_score(y, p))
    assert m[("classification", "macro_f1")] == pytest.approx(
        f1_score(y, p, labels=ks, average="macro", zero_division=0)
    )
    precision = precision_score(y, p, labels=ks, average=None, zero_division=0)
    recall = recall_score(y, p, labels=ks, average=None, zero_division=0)
    for i, name in enumerate(names):
        assert m[("classification", f"precision/{name}")] == pytest.approx(precision[i])
        assert m[("classification", f"recall/{name}")] == pytest.approx(recall[i])
    confusion = {(r["true"], r["predicted"]): r["count"] for r in art.read_table(table="confusion").to_pylist()}
    expected = confusion_matrix(y, p, labels=ks)
    assert all(confusion[(names[i], names[j])] == expected[i][j] for i in ks for j in ks)
    # the predictions are the model's own, row by row (unpadded here, right-padded in the stage's batches)
    model = AutoModelForSequenceClassification.from_pretrained(clf).eval()
    split = __import__("datasets").load_from_disk(os.path.join(data.path, "hf"))["validation"]
    with torch.no_grad():
        assert [int(model(torch.tensor([split[i]["input_ids"]])).logits.argmax()) for i in range(8)] == p[:8]

    with pytest.raises(StageInputError, match="is a sequence classifier"):
        run_in_store(
            EvalStage(), EvalConfig(model_from="clf", tasks=[fixture("mmlu_fixture")]), inputs[:1], _store(tmp_path)
        )
    with pytest.raises(StageInputError, match="not a sequence classifier"):
        run_in_store(EvalStage(), EvalConfig(model_path=models["a"], classification=True), inputs[1:], _store(tmp_path))
    relabelled = _classifier_data(str(tmp_path / "other"), clf, names[::-1], fp="cls-relabelled")
    with pytest.raises(StageInputError, match="are not the dataset's"):
        run_in_store(
            EvalStage(),
            EvalConfig(model_from="clf", classification=True),
            [inputs[0], Artifact.open(relabelled.path, "data")],
            _store(tmp_path),
        )


def reply_words(prompt, reply):  # a reward function, as a user's module would hold one
    return float(len(reply.split()))


def test_generation_metrics_on_held_out_instructions(tmp_path, models):
    import sacrebleu
    from rouge_score import rouge_scorer

    from tasks.ingest import SftIngestConfig

    store = _store(tmp_path)
    heldout = run_in_store(
        SftIngestStage(), SftIngestConfig(paths=[os.path.join(FIXTURES, "instructions.jsonl")]), [], store
    )
    gen = {"instructions_from": "heldout", "max_new_tokens": 12, "reward": {"function": "test_eval:reply_words"}}
    cfg = EvalConfig(model_path=models["a"], generation=gen, limit=6, batch_size=4)
    art = run_in_store(EvalStage(), cfg, [Artifact.open(heldout.path, "instructions")], store)

    rows = art.read_table(table="generations").to_pylist()
    assert len(rows) == 6 and all(r["reply"] for r in rows)
    replies, refs = [r["reply"] for r in rows], [r["reference"] for r in rows]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    m = metrics_of(art)
    assert m[("generation", "rouge_l")] == pytest.approx(
        sum(scorer.score(t, r)["rougeL"].fmeasure for r, t in zip(replies, refs)) / 6
    )
    assert m[("generation", "bleu")] == pytest.approx(sacrebleu.corpus_bleu(replies, [refs]).score)
    assert m[("generation", "exact_match")] == sum(" ".join(r.split()) == t for r, t in zip(replies, refs)) / 6
    assert m[("generation", "reward")] == pytest.approx(sum(len(r.split()) for r in replies) / 6)
    # greedy: another store, the same replies
    again = run_in_store(
        EvalStage(), cfg, [Artifact.open(heldout.path, "instructions")], ArtifactStore(str(tmp_path / "s2"))
    )
    assert [r["reply"] for r in again.read_table(table="generations").to_pylist()] == replies

    perfect = text_metrics(["Paris", "  keeps the doctor   away. "], ["Paris", "keeps the doctor away."])
    assert perfect["exact_match"] == 1.0 and perfect["rouge_l"] == 1.0 and perfect["bleu"] == pytest.approx(100.0)


# --------------------------------------------------------------------------------------------------
# contamination


def _contaminating_documents(tmp_path) -> str:
    hs = json.loads(open(os.path.join(FIXTURES, "data", "hellaswag_validation.jsonl")).readline())
    wg = json.loads(open(os.path.join(FIXTURES, "data", "winogrande_validation.jsonl")).readline())
    quoted = (
        f"Found online. {hs['activity_label']}: {hs['ctx_a']} {hs['ctx_b'].capitalize()} {hs['endings'][0]} The end."
    )
    return write_jsonl(
        tmp_path / "docs" / "train.jsonl",
        [
            {"id": "quotes-hellaswag", "text": quoted.upper()},  # case and punctuation do not hide it
            {"id": "quotes-winogrande", "text": f"A puzzle: {wg['sentence']} Answer: {wg['option1']}."},
            {"id": "clean-1", "text": "A woman places two cups on a table and pours some coffee for her guests."},
            {"id": "clean-2", "text": "The suitcase was too big for the car, so the trophy stayed at home that day."},
        ],
    )


def test_contamination_is_reported_per_task_and_the_clean_stage_drops_contaminated_documents(tmp_path, models):
    from tasks.clean.stage import CleanConfig
    from tasks.ingest import IngestConfig

    store = _store(tmp_path)
    docs = run_in_store(IngestStage(), IngestConfig(paths=[_contaminating_documents(tmp_path)]), [], store)
    specs = [fixture("hellaswag_fixture"), fixture("winogrande_fixture"), fixture("truthfulqa_mc2_fixture")]
    cfg = EvalConfig(model_path=models["a"], tasks=specs, limit=2, decontamination={})
    art = run_in_store(EvalStage(), cfg, [Artifact.open(docs.path, "docs")], store)
    found = {r["task"]: r for r in art.read_table(table="contamination").to_pylist()}
    assert {t: (r["items"], r["contaminated"]) for t, r in found.items()} == {
        "hellaswag_fixture": (16, 1),
        "winogrande_fixture": (16, 1),
        "truthfulqa_mc2_fixture": (12, 0),
    }
    assert (
        found["hellaswag_fixture"]["example_document"] == "quotes-hellaswag"
        and found["winogrande_fixture"]["documents_read"] == 4
    )
    assert "13-gram overlap of the training documents" in open(os.path.join(art.path, "report.md")).read()

    off = {"enabled": False}
    filters = {k: off for k in ("length", "repetition", "gopher_quality", "c4", "fineweb", "in_doc_dedup", "code")}
    assert "decontaminate" not in CleanConfig(**filters).fingerprint_config()  # unchanged fingerprints without it
    clean_cfg = CleanConfig(**filters, decontaminate={"tasks": specs})
    cleaned = run_in_store(CleanStage(), clean_cfg, [docs], store)
    assert cleaned.stats.rejected == {"decontaminate:hellaswag_fixture": 1, "decontaminate:winogrande_fixture": 1}
    assert sorted(r["id"] for r in cleaned.read_table().to_pylist()) == ["clean-1", "clean-2"]
    rejects = {r["id"]: r for r in cleaned.read_table(table="rejects").to_pylist()}
    assert "item 0 of hellaswag_fixture" in rejects["quotes-hellaswag"]["detail"]
    assert cleaned.stats.rows_in == 4 and cleaned.stats.rows_out == 2
    with pytest.raises(StageInputError, match="no such task file"):
        CleanStage().fingerprint(CleanConfig(decontaminate={"tasks": ["missing.yaml"]}), [])


def test_ngram_index_rules():
    index = NgramIndex(n=5)
    index.add_task("t", ["one two three four five six", "short item here", "x"])
    assert [(m.item, m.ngram) for m in index.matches("ONE, two; three four five!")] == [(0, "one two three four five")]
    assert [m.item for m in index.matches("it was a short item here, then")] == [1]  # shorter than n: all its words
    assert index.first_match("two three four five seven") is None
    report, read = overlap_report(index, iter([("d1", "one two three four five"), ("d2", "nothing")]))
    assert read == 2 and report[0].contaminated == {0} and report[0].documents == 1


# --------------------------------------------------------------------------------------------------
# comparison, the pipeline and Prefect


def test_models_side_by_side_in_a_stage_and_with_kiln_compare(tmp_path, models):
    from typer.testing import CliRunner

    from flows.cli import app

    store = _store(tmp_path)
    tasks = [fixture("hellaswag_fixture"), fixture("mmlu_fixture")]
    base = run_in_store(EvalStage(), EvalConfig(model_path=models["a"], label="base", tasks=tasks, limit=6), [], store)
    sft = run_in_store(EvalStage(), EvalConfig(model_path=models["b"], label="sft", tasks=tasks, limit=6), [], store)
    evals = [Artifact.open(base.path, "evals"), Artifact.open(sft.path, "evals")]
    cmp = run_in_store(EvalCompareStage(), EvalCompareConfig(evals=["base", "sft"]), evals, store)
    rows = {(r["task"], r["metric"], r["model"]): r for r in cmp.read_table().to_pylist()}
    for task, metric in (("hellaswag_fixture", "acc_norm"), ("mmlu_fixture", "acc")):
        b, s = rows[(task, metric, "base")], rows[(task, metric, "sft")]
        assert s["delta"] == pytest.approx(s["value"] - b["value"]) and b["delta"] == 0.0
        assert b["value"] == metrics_of(base)[(task, metric)]
    (wide,) = [r for r in cmp.read_table(table="comparison").to_pylist() if r["task"] == "mmlu_fixture"]
    assert set(wide) == {"task", "metric", "base", "sft", "Δ sft"}
    report = open(os.path.join(cmp.path, "report.md")).read()
    assert "| hellaswag_fixture | acc_norm |" in report and "![models compared](data:image/png;base64," in report

    md = tmp_path / "cmp.md"
    result = CliRunner().invoke(app, ["compare", base.path, sft.path, "--baseline", "sft", "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    assert "deltas against sft" in result.output and "mmlu_fixture" in result.output and md.exists()
    result = CliRunner().invoke(app, ["compare", base.path, str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no artifact at" in result.output


def test_pipeline_wiring_eval_sections_per_model_and_a_comparison(tmp_path, models):
    heldout = os.path.join(FIXTURES, "instructions.jsonl")
    cfg = PipelineConfig.model_validate(
        {
            "name": "wiring",
            "store": {"root": str(tmp_path / "store")},
            "ingest": {"paths": [os.path.join(REPO, "examples", "data")]},
            "clean": {},
            "heldout": {"kind": "sft_ingest", "paths": [heldout]},
            "eval_base": {
                "kind": "eval",
                "model_path": models["a"],
                "tasks": [fixture("mmlu_fixture")],
                "decontamination": {},
            },
            "eval_sft": {"kind": "eval", "model_path": models["b"], "generation": {"instructions_from": "heldout"}},
            "eval_compare": {"evals": ["eval_base", "eval_sft"]},
        }
    )
    planned = {p.name: p for p in plan_pipeline(cfg)}
    assert list(zip(planned["eval_base"].inputs, planned["eval_base"].slots)) == [("clean", "docs")]
    assert list(zip(planned["eval_sft"].inputs, planned["eval_sft"].slots)) == [("heldout", "instructions")]
    assert list(zip(planned["eval_compare"].inputs, planned["eval_compare"].slots)) == [
        ("eval_base", "evals"),
        ("eval_sft", "evals"),
    ]
    order = list(planned)
    assert order.index("eval_compare") > max(order.index("eval_base"), order.index("eval_sft"))
    with pytest.raises(Exception, match="model_from .* or model_path, not both"):
        PipelineConfig.model_validate(
            {"name": "x", "e": {"kind": "eval", "model_from": "t", "model_path": "p", "tasks": ["a.yaml"]}}
        )
    with pytest.raises(Exception, match="nothing to evaluate"):
        EvalConfig(model_path=models["a"])
    with pytest.raises(StageInputError, match="no configured task is named mmlu"):
        run_in_store(
            EvalStage(),
            EvalConfig(model_path=models["a"], tasks=[fixture("mmlu_fixture")], num_fewshot={"mmlu": 5}),
            [],
            _store(tmp_path),
        )


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_eval_and_comparison_publish_prefect_tables_and_reports(tmp_path, models):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.pipeline import pipeline

    task = fixture("winogrande_fixture")
    cfg = PipelineConfig.model_validate(
        {
            "name": "evals",
            "store": {"root": str(tmp_path / "store")},
            "eval_a": {"kind": "eval", "model_path": models["a"], "label": "a", "tasks": [task], "limit": 4},
            "eval_b": {"kind": "eval", "model_path": models["b"], "label": "b", "tasks": [task], "limit": 4},
            "eval_compare": {"evals": ["eval_a", "eval_b"]},
        }
    )
    refs = pipeline(config=cfg)
    assert set(refs) == {"eval_a", "eval_b", "eval_compare"}
    keys = ["eval-a-summary-table", "eval-a-report", "eval-compare-comparison-table", "eval-compare-report"]
    with get_client(sync_client=True) as client:
        arts = {
            a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
        }
    assert set(arts) == set(keys)
    summary = arts["eval-a-summary-table"].data
    summary = summary if isinstance(summary, list) else json.loads(summary)
    assert summary[0]["task"] == "winogrande_fixture" and summary[0]["metric"] == "acc"
    assert "# Models compared: a, b" in arts["eval-compare-report"].data
    assert "# Evaluation of a" in arts["eval-a-report"].data
    again = pipeline(config=cfg)
    assert all(r["cached"] for r in again.values())

    from flows.cli import _print_run_summary, console

    with console.capture() as printed:  # `kiln run` ends with the comparison
        _print_run_summary(again, 1.0)
    assert "2 model(s) compared, deltas against a" in printed.get() and "winogrande_fixture" in printed.get()
