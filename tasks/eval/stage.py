"""The `eval` stage (one model, one unit per task) and the `eval_compare` stage (models side by side).

Inputs of `eval`: the model (slot `model`, wired by `model_from`; or `model_path`), and where asked for
them a dataset (`data`: the pack stage's output for perplexity, classify_tokenize's for a classifier),
held-out instructions (`instructions`: an sft_ingest section), a reward model (`reward_model`) and the
training documents (`docs`, for contamination).

Units: one per lm_eval task (a group such as mmlu is one task), and one each for perplexity,
classification, generation and contamination, spread over the task runner's workers. A unit's key is
the model, what its task reads (the task files' content, the harness version) and the settings its
numbers depend on, so an artifact made after one task file was edited copies every other task's unit
from the previous artifact and evaluates only that task again.

What a unit does with bad input: a task file that does not parse, a data row missing a field the task
needs, a model without a tokenizer are found before the model loads and recorded (a reject with the
reason and the file, the report's "Not evaluated" table); the other tasks run. A task whose data is on an
unreachable hub fails its unit (the machine's state, not the input: a rerun online redoes it, while the
finished units are kept), as does any error while evaluating.

Outputs: the data table holds every metric (one row per task, metric and filter), `summary` the
headline rows (published as a Prefect table), `harness/<task>/results.json` and `samples_<task>.jsonl`
the harness's own files, `report.md` the report with a chart; `generations`, `predictions`,
`confusion` and `contamination` tables where those ran.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from tasks.artifacts import Artifact, ArtifactWriter, pick
from tasks.documents import parse_meta
from tasks.eval.config import EvalCompareConfig, EvalConfig
from tasks.eval.harness import TaskError, is_task_file
from tasks.prefs.score import function_identity
from tasks.stage import Stage, StageInputError
from tasks.tokenize.hf import local_model_directory

log = logging.getLogger("kiln.eval")

METRICS_SCHEMA = pa.schema(
    [
        pa.field("task", pa.string(), nullable=False),  # as configured: a task, a group, "perplexity", ...
        pa.field("subtask", pa.string(), nullable=False),  # a group's member (or the task itself)
        pa.field("metric", pa.string(), nullable=False),
        pa.field("filter", pa.string()),  # the harness's filter ("none" for most tasks)
        pa.field("value", pa.float64()),
        pa.field("stderr", pa.float64()),
        pa.field("n", pa.int64()),  # examples (tokens, for perplexity)
        pa.field("num_fewshot", pa.int64()),
        pa.field("higher_is_better", pa.bool_()),
        pa.field("headline", pa.bool_(), nullable=False),  # the metric the task is judged by
        pa.field("source", pa.string(), nullable=False),  # lm_eval, perplexity, classification, generation
        pa.field("group", pa.string()),
    ]
)
SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("task", pa.string(), nullable=False),
        pa.field("metric", pa.string()),
        pa.field("value", pa.float64()),
        pa.field("stderr", pa.float64()),
        pa.field("n", pa.int64()),
        pa.field("num_fewshot", pa.int64()),
        pa.field("status", pa.string(), nullable=False),  # ok, or error (see the rejects)
        pa.field("note", pa.string()),
    ]
)
HARNESS_RESULTS_SCHEMA = pa.schema([("task", pa.string()), ("results_json", pa.large_string())])
HARNESS_SAMPLES_SCHEMA = pa.schema([("task", pa.string()), ("subtask", pa.string()), ("line", pa.large_string())])
GENERATIONS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("reference", pa.string()),
        ("reply", pa.string()),
        ("finished", pa.string()),
        ("exact_match", pa.bool_()),
        ("rouge_l", pa.float64()),
        ("reward", pa.float64()),
    ]
)
PREDICTIONS_SCHEMA = pa.schema([("row", pa.int64()), ("label", pa.int64()), ("predicted", pa.int64())])
CONFUSION_SCHEMA = pa.schema([("true", pa.string()), ("predicted", pa.string()), ("count", pa.int64())])
CONTAMINATION_SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("items", pa.int64()),
        ("contaminated", pa.int64()),
        ("fraction", pa.float64()),
        ("documents", pa.int64()),
        ("documents_read", pa.int64()),
        ("ngram", pa.int64()),
        ("example_document", pa.string()),
        ("example_item", pa.int64()),
        ("example_ngram", pa.string()),
        ("note", pa.string()),
    ]
)


# --------------------------------------------------------------------------------------------------
# the model under evaluation


@dataclass
class EvaluatedModel:
    directory: str  # a local directory (or a hub name)
    label: str
    identity: Any  # the model artifact's fingerprint, or the directory's files
    objective: str | None
    architecture: str | None

    @property
    def classifier(self) -> bool:
        return bool(self.architecture and self.architecture.endswith("ForSequenceClassification")) or (
            self.objective in ("classification", "reward")
        )

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "path": self.directory, "objective": self.objective, "identity": self.identity}


def _architecture(directory: str) -> str | None:
    try:
        with open(os.path.join(directory, "config.json")) as f:
            return (json.load(f).get("architectures") or [None])[0]
    except (OSError, ValueError):
        return None


def _looks_local(path: str) -> bool:
    """A path, not a hub id (`org/name`, or a bare name)."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1


def evaluated_model(inputs: list[Artifact], cfg: EvalConfig, fetch: bool = True) -> EvaluatedModel:
    """The model under evaluation; `fetch`: a model on an object store is copied to a local directory."""
    from tasks.train.model import model_identity

    art = pick(inputs, "model", ("train", "rl"))
    if art is not None:
        directory = local_model_directory(art.path) if fetch else art.path
        label = cfg.label or cfg.model_from or art.stage
        return EvaluatedModel(
            directory, label, art.fingerprint, art.manifest.get("objective"), _architecture(directory)
        )
    if cfg.model_path is None:
        raise StageInputError("model_from", "no model: wire a training section (model_from) or set model_path")
    directory = os.path.abspath(cfg.model_path) if os.path.isdir(cfg.model_path) else cfg.model_path
    label = cfg.label or os.path.basename(cfg.model_path.rstrip("/"))
    identity = model_identity(directory) or cfg.model_path
    return EvaluatedModel(directory, label, identity, None, _architecture(directory))


def training_documents(inputs: list[Artifact]) -> list[Artifact]:
    """The documents a contamination check reads: the `docs` slot, or (`kiln stage eval` on loose files,
    no slots) the inputs that are documents."""
    from tasks.table import KIND_BY_NAME

    slotted = [a for a in inputs if a.slot == "docs"]
    if slotted or any(a.slot for a in inputs):
        return slotted
    roles = ("source", "filter")
    return [a for a in inputs if a.stage in KIND_BY_NAME and KIND_BY_NAME[a.stage].role in roles]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------------------------------
# the eval stage


class EvalStage(Stage):
    name = "eval"
    version = 1
    Config = EvalConfig
    report_tables = ("summary",)
    report_table_descriptions = {"summary": "each task's headline metric, and the tasks not evaluated"}

    # -- wiring and identity -------------------------------------------------------------------------

    def bindings(self, cfg: EvalConfig) -> dict[str, str | None]:
        data = cfg.data_from or ("pack" if cfg.perplexity else "classify_tokenize" if cfg.classification else None)
        gen = cfg.generation
        wired: dict[str, str | None] = {
            "model": cfg.model_from,
            "data": data if (cfg.perplexity or cfg.classification) else None,
            "instructions": gen.instructions_from if gen else None,
            "reward_model": gen.reward.reward_from if gen and gen.reward else None,
        }
        if cfg.decontamination is None:
            wired["docs"] = None
        elif cfg.decontamination.documents_from:
            wired["docs"] = cfg.decontamination.documents_from
        return wired  # docs left unwired: the pipeline's current documents

    def sources(self, cfg: EvalConfig) -> Any:
        from tasks.eval.harness import harness_version, task_identity
        from tasks.train.model import model_identity

        out: dict[str, Any] = {}
        specs = cfg.task_specs()
        for spec in specs:
            if is_task_file(spec) and not os.path.isfile(spec):
                raise StageInputError("tasks", f"no such task file: {spec} (a path ending in .yaml is a task file)")
        if specs:
            out["lm_eval"] = harness_version()
            out["tasks"] = [task_identity(s) for s in specs]
        if cfg.model_path is not None:
            if not os.path.isdir(cfg.model_path) and _looks_local(cfg.model_path):
                raise StageInputError("model_path", f"no such model directory: {cfg.model_path!r}")
            out["model"] = model_identity(cfg.model_path) or cfg.model_path
        reward = cfg.generation.reward if cfg.generation else None
        if reward is not None and reward.function is not None:
            out["reward"] = function_identity(reward.function)
        elif reward is not None and reward.reward_model_path is not None:
            out["reward"] = model_identity(reward.reward_model_path) or reward.reward_model_path
        return out or None

    # -- planning ----------------------------------------------------------------------------------

    def plan(self, inputs: list[Artifact], cfg: EvalConfig) -> list[dict[str, Any]]:
        from tasks.eval.harness import check_task_names, task_name_of

        model = evaluated_model(inputs, cfg)
        specs = cfg.task_specs()
        if cfg.model_path is not None and not os.path.isdir(model.directory):
            from tasks.eval.harness import check_hub_model

            check_hub_model(cfg.model_path)
        if os.path.isdir(model.directory) and not os.path.isfile(os.path.join(model.directory, "config.json")):
            raise StageInputError(
                "model_from" if cfg.model_from else "model_path",
                f"{model.directory} holds no full model (no config.json): an adapter-only export (prefix / "
                "adapter methods) needs its base model; evaluate a full or LoRA run",
            )
        if model.classifier:
            for field, asked in (
                ("tasks", bool(specs)),
                ("perplexity", cfg.perplexity),
                ("generation", cfg.generation),
            ):
                if asked:
                    raise StageInputError(
                        field,
                        f"{model.label} is a sequence classifier ({model.architecture or model.objective}): it has "
                        f"no language-model head for {field}; evaluate it with classification: true",
                    )
        elif cfg.classification:
            raise StageInputError(
                "classification",
                f"{model.label} is not a sequence classifier ({model.architecture or model.objective}); "
                "classification metrics are for classifiers",
            )
        check_task_names([s for s in specs if not is_task_file(s)])
        names = [task_name_of(s) for s in specs]
        overrides = {"num_fewshot": cfg.num_fewshot if isinstance(cfg.num_fewshot, dict) else {}, "metric": cfg.metric}
        if None not in names:
            for field, given in overrides.items():
                unknown = sorted(set(given) - set(names))
                if unknown:
                    raise StageInputError(
                        field, f"no configured task is named {', '.join(unknown)} (tasks: {', '.join(names)})"
                    )
        if len(set(names)) < len(names) and None not in names:
            raise StageInputError("tasks", f"two specs evaluate under one name: {names}")
        data = pick(inputs, "data", ("pack", "classify_tokenize"))
        if (cfg.perplexity or cfg.classification) and data is None:
            raise StageInputError(
                "data_from", "perplexity / classification read a dataset: wire a pack or classify_tokenize section"
            )
        if cfg.classification and not data.manifest.get("labels"):
            raise StageInputError("data_from", f"{data.path} has no labels: is it classify_tokenize's output?")
        if cfg.generation and pick(inputs, "instructions", ("sft_ingest",)) is None:
            raise StageInputError(
                "generation.instructions_from", "no held-out instructions: wire an sft_ingest section"
            )
        if cfg.decontamination and not training_documents(inputs):
            raise StageInputError("decontamination", "no training documents to compare with: the pipeline has none")
        units: list[dict[str, Any]] = [{"kind": "harness", "spec": s} for s in specs]
        for kind, asked in (("perplexity", cfg.perplexity), ("classification", cfg.classification)):
            if asked:
                units.append({"kind": kind})
        if cfg.generation:
            units.append({"kind": "generation"})
        if cfg.decontamination:
            units.append({"kind": "contamination"})
        return units

    def unit_key(self, unit: dict[str, Any], inputs: list[Artifact], cfg: EvalConfig) -> str | None:
        """What a unit's output depends on, and nothing else (see the module's docstring)."""
        from tasks.eval.harness import harness_version, task_identity, task_name_of

        kind = unit["kind"]
        if kind == "contamination":
            docs = sorted(a.fingerprint for a in training_documents(inputs))
            specs = cfg.task_specs()
            return _key(self.version, kind, docs, [task_identity(s) for s in specs], cfg.decontamination.ngram)
        model = evaluated_model(inputs, cfg, fetch=False).identity
        common = (self.version, kind, model, cfg.dtype)
        if kind == "harness":
            name = task_name_of(unit["spec"]) or unit["spec"]
            settings = (cfg.shots_for(name), cfg.metric_for(name), cfg.limit, cfg.bootstrap_iters, cfg.max_length)
            return _key(*common, task_identity(unit["spec"]), harness_version(), settings)
        if kind in ("perplexity", "classification"):
            return _key(*common, pick(inputs, "data", ("pack", "classify_tokenize")).fingerprint)
        if kind == "generation":
            instructions = pick(inputs, "instructions", ("sft_ingest",)).fingerprint
            rm = pick(inputs, "reward_model", ("train",))
            reward = (self.sources(cfg) or {}).get("reward")
            gen = cfg.generation.model_dump(mode="json")
            return _key(*common, instructions, gen, cfg.limit, rm.fingerprint if rm else None, reward)
        return None

    # -- units -------------------------------------------------------------------------------------

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: EvalConfig, out: ArtifactWriter) -> None:
        getattr(self, f"_{unit['kind']}")(unit, inputs, cfg, out)

    @staticmethod
    def _record_error(out: ArtifactWriter, task: str, source: str | None, e: TaskError) -> None:
        """Bad input for one task: a reject with the reason and the file, a summary row; never a crash."""
        log.warning("eval: %s not evaluated: %s", task, e.detail)
        out.reject(e.reason, e.detail, id=task, source=source)
        out.table("summary").write(
            pa.Table.from_pylist(
                [{"task": task, "status": "error", "note": f"{e.reason}: {e.detail}"}], schema=SUMMARY_SCHEMA
            )
        )

    @staticmethod
    def _write_metrics(out: ArtifactWriter, rows: list[dict[str, Any]], source: str) -> None:
        rows = [{"subtask": r["task"], "filter": None, "group": None, **r, "source": source} for r in rows]
        out.write(pa.Table.from_pylist(rows, schema=METRICS_SCHEMA))
        heads = [r for r in rows if r["headline"]]
        out.table("summary").write(
            pa.Table.from_pylist(
                [
                    {
                        "task": r["task"],
                        "metric": r["metric"],
                        "value": r["value"],
                        "stderr": r.get("stderr"),
                        "n": r.get("n"),
                        "num_fewshot": r.get("num_fewshot"),
                        "status": "ok",
                    }
                    for r in heads
                ],
                schema=SUMMARY_SCHEMA,
            )
        )

    def _harness(self, unit: dict[str, Any], inputs: list[Artifact], cfg: EvalConfig, out: ArtifactWriter) -> None:
        from tasks.eval import harness

        spec = unit["spec"]
        name = harness.task_name_of(spec) or spec
        model = evaluated_model(inputs, cfg)
        shots = cfg.shots_for(name)
        try:  # everything that can be wrong with the input, before the model loads
            harness.check_tokenizer(model.directory)
            built = harness.build_task(spec, shots)
        except TaskError as e:
            return self._record_error(out, name, spec if is_task_file(spec) else None, e)
        device = harness.resolved_device(cfg.device)
        dtype = harness.resolved_dtype(cfg.dtype, device)
        args = harness.model_args(model.directory, dtype, cfg.max_length)
        lm, lock = harness.load_lm(model.directory, dtype, device, cfg.batch_size, cfg.max_length)
        log.info("eval: %s on %s (%s, %s)", built.name, model.label, device, dtype)
        with lock, tempfile.TemporaryDirectory(prefix="kiln-eval-") as work:
            run = harness.evaluate(built, lm, shots, cfg.limit, cfg.bootstrap_iters, args, work)
        rows = harness.metric_rows(run, built.name, cfg.metric_for(built.name))
        self._write_metrics(out, rows, "lm_eval")
        out.table("harness_results").write(
            pa.Table.from_pylist(
                [{"task": built.name, "results_json": run.results_json}], schema=HARNESS_RESULTS_SCHEMA
            )
        )
        for subtask, lines in run.samples_jsonl.items():
            batch = {"task": [built.name] * len(lines), "subtask": [subtask] * len(lines), "line": lines}
            out.table("harness_samples").write(pa.Table.from_pydict(batch, schema=HARNESS_SAMPLES_SCHEMA))
        examples = sum(v.get("effective", 0) for v in (run.results.get("n-samples") or {}).values())
        out.stats.rows_in += examples
        out.count("examples", examples)

    def _perplexity(self, unit: dict[str, Any], inputs: list[Artifact], cfg: EvalConfig, out: ArtifactWriter) -> None:
        from tasks.eval import harness, heldout
        from tasks.tokenize.hf import load_tokenizer

        model = evaluated_model(inputs, cfg)
        data = pick(inputs, "data", ("pack",))
        split = heldout.load_split(data)
        # bytes are counted with the tokenizer that made the ids: the dataset's copy or record, else the model's
        tokenizer, note = None, None
        recorded = (data.manifest.get("tokenizer") or {}).get("path")
        for where in (os.path.join(data.path, "tokenizer"), recorded, model.directory):
            if not where:
                continue
            try:
                tokenizer = load_tokenizer(where, "data_from")
                break
            except Exception:  # no tokenizer there: try the next, or report no bits per byte
                continue
        if tokenizer is None:
            note = "no tokenizer beside the dataset or the model: bits per byte left out"
        device = harness.resolved_device(cfg.device)
        lm = heldout.load_model(
            model.directory, "AutoModelForCausalLM", harness.resolved_dtype(cfg.dtype, device), device
        )
        result = heldout.perplexity(lm, split, cfg.batch_size, tokenizer, out.progress)
        rows = [
            {"task": "perplexity", "metric": "perplexity", "value": result.perplexity, "headline": True},
            {"task": "perplexity", "metric": "bits_per_byte", "value": result.bits_per_byte, "headline": True},
            {"task": "perplexity", "metric": "loss", "value": result.loss, "headline": False},
        ]
        for r in rows:
            r.update(n=result.tokens, higher_is_better=False)
        self._write_metrics(out, [r for r in rows if r["value"] is not None], "perplexity")
        out.stats.rows_in += result.rows
        out.count("tokens", result.tokens)
        if result.bytes is not None:
            out.count("bytes", result.bytes)
        if note:
            log.warning("eval: %s", note)
            out.stats.extra["perplexity_note"] = note

    def _classification(
        self, unit: dict[str, Any], inputs: list[Artifact], cfg: EvalConfig, out: ArtifactWriter
    ) -> None:
        from tasks.eval import harness, heldout

        model = evaluated_model(inputs, cfg)
        data = pick(inputs, "data", ("classify_tokenize",))
        names = list(data.manifest["labels"])
        device = harness.resolved_device(cfg.device)
        dtype = harness.resolved_dtype(cfg.dtype, device)
        clf = heldout.load_model(model.directory, "AutoModelForSequenceClassification", dtype, device)
        heldout.check_labels(clf, names, "model_from" if cfg.model_from else "model_path")
        result = heldout.classify(clf, heldout.load_split(data), names, cfg.batch_size, out.progress)
        m, n = result.metrics, len(result.labels)
        rows = [
            {"task": "classification", "metric": "accuracy", "value": m["accuracy"], "headline": True},
            {"task": "classification", "metric": "macro_f1", "value": m["f1"], "headline": True},
        ]
        for name in names:
            for kind in ("precision", "recall", "f1"):
                rows.append(
                    {
                        "task": "classification",
                        "metric": f"{kind}/{name}",
                        "value": m[f"{kind}/{name}"],
                        "headline": False,
                    }
                )
        for r in rows:
            r.update(n=n, higher_is_better=True)
        self._write_metrics(out, rows, "classification")
        confusion = [
            {"true": names[i], "predicted": names[j], "count": int(m["confusion"][i][j])}
            for i in range(len(names))
            for j in range(len(names))
        ]
        out.table("confusion").write(pa.Table.from_pylist(confusion, schema=CONFUSION_SCHEMA))
        out.table("predictions").write(
            pa.Table.from_pydict(
                {"row": list(range(n)), "label": result.labels, "predicted": result.predicted},
                schema=PREDICTIONS_SCHEMA,
            )
        )
        out.stats.rows_in += n

    def _generation(self, unit: dict[str, Any], inputs: list[Artifact], cfg: EvalConfig, out: ArtifactWriter) -> None:
        from tasks.eval import harness, heldout
        from tasks.prefs.schema import messages_json
        from tasks.tokenize.hf import from_transformers
        from tasks.tokenize.sft import SftRecordError, render_prompt

        gen = cfg.generation
        model = evaluated_model(inputs, cfg)
        try:
            harness.check_tokenizer(model.directory)
        except TaskError as e:
            return self._record_error(out, "generation", model.directory, e)
        source = pick(inputs, "instructions", ("sft_ingest",))
        items: list[heldout.Instruction] = []
        for batch in source.iter_batches(columns=["id", "meta"]):
            for doc_id, raw in zip(batch.column("id").to_pylist(), batch.column("meta").to_pylist()):
                out.stats.rows_in += 1
                item = heldout.instruction_of(doc_id, parse_meta(raw))
                if item is None:
                    out.reject(
                        "not_an_instruction",
                        "the document has no instruction example ending with a reply",
                        id=doc_id,
                        meta=raw,
                    )
                else:
                    items.append(item)
        if cfg.limit:
            items = items[: cfg.limit]
        device = harness.resolved_device(cfg.device)
        lm = heldout.load_model(
            model.directory, "AutoModelForCausalLM", harness.resolved_dtype(cfg.dtype, device), device
        )
        (auto_tokenizer,) = from_transformers("AutoTokenizer")
        tok = auto_tokenizer.from_pretrained(model.directory)
        texts, kept = [], []
        for item in items:
            try:
                texts.append(render_prompt(item.prompt, tok, gen.template))
                kept.append(item)
            except SftRecordError as e:
                out.reject(e.reason, e.detail, id=item.id, meta=messages_json(item.prompt))
        replies = heldout.greedy_replies(lm, tok, texts, gen.max_new_tokens, cfg.batch_size, out.progress)
        text = heldout.text_metrics([r for r, _ in replies], [i.reference for i in kept])
        rewards: list[Any] = [None] * len(kept)
        if gen.reward is not None:
            rewards = heldout.reward_scores(
                gen.reward, inputs, [i.prompt for i in kept], [r for r, _ in replies], device, cfg.batch_size
            )
            for item, value in zip(kept, rewards):
                if isinstance(value, Exception):
                    out.count("reward_errors")
                    log.warning("eval: the reward failed on %s: %s: %s", item.id, type(value).__name__, value)
        scores = [v for v in rewards if isinstance(v, float)]
        n = len(kept)
        rows = [
            {"task": "generation", "metric": "exact_match", "value": text["exact_match"], "higher_is_better": True},
            {"task": "generation", "metric": "rouge_l", "value": text["rouge_l"], "higher_is_better": True},
            {"task": "generation", "metric": "bleu", "value": text["bleu"], "higher_is_better": True},
        ]
        if gen.reward is not None:
            mean = sum(scores) / len(scores) if scores else None
            rows.append(
                {"task": "generation", "metric": "reward", "value": mean, "higher_is_better": True, "n": len(scores)}
            )
        for r in rows:
            r.setdefault("n", n)
            r["headline"] = True
        self._write_metrics(out, rows, "generation")
        out.table("generations").write(
            pa.Table.from_pylist(
                [
                    {
                        "id": item.id,
                        "prompt": item.prompt[-1]["content"],
                        "reference": item.reference,
                        "reply": reply,
                        "finished": finished,
                        "exact_match": exact,
                        "rouge_l": rouge,
                        "reward": value if isinstance(value, float) else None,
                    }
                    for item, (reply, finished), exact, rouge, value in zip(
                        kept, replies, text["exact"], text["rouge_l_each"], rewards
                    )
                ],
                schema=GENERATIONS_SCHEMA,
            )
        )
        out.count("unfinished_replies", sum(f == "length" for _, f in replies))

    def _contamination(
        self, unit: dict[str, Any], inputs: list[Artifact], cfg: EvalConfig, out: ArtifactWriter
    ) -> None:
        from tasks.eval.contamination import index_for, overlap_report

        n = cfg.decontamination.ngram
        index, failed = index_for(cfg.task_specs(), n)

        def documents():
            for art in training_documents(inputs):
                for batch in art.iter_batches(columns=["id", "text"]):
                    yield from zip(batch.column("id").to_pylist(), batch.column("text").to_pylist())

        report, read = overlap_report(index, documents())
        rows = [
            {
                "task": o.task,
                "items": o.items,
                "contaminated": len(o.contaminated),
                "fraction": o.fraction,
                "documents": o.documents,
                "documents_read": read,
                "ngram": n,
                "example_document": (o.example or {}).get("document"),
                "example_item": (o.example or {}).get("item"),
                "example_ngram": (o.example or {}).get("ngram"),
            }
            for o in report
        ]
        rows += [
            {"task": t, "items": 0, "contaminated": 0, "fraction": None, "documents": 0, "documents_read": read,
             "ngram": n, "note": f"not checked: {why}"}
            for t, why in failed.items()
        ]  # fmt: skip
        out.table("contamination").write(pa.Table.from_pylist(rows, schema=CONTAMINATION_SCHEMA))
        out.stats.rows_in += read
        out.count("contaminated_items", sum(r["contaminated"] for r in rows))

    # -- commit ------------------------------------------------------------------------------------

    def finalize(self, inputs: list[Artifact], cfg: EvalConfig, directory: str, fs: Any) -> dict[str, Any]:
        from tasks.eval.harness import cli_compatible, harness_version, model_args, resolved_device, resolved_dtype
        from tasks.eval.report import eval_markdown

        base = directory.rstrip("/")
        metrics = _read_rows(fs, base, "data")
        summary = _read_rows(fs, base, "summary")
        errors = [
            {"task": r["id"], "reason": r["reason"], "detail": r["detail"], "file": r.get("source")}
            for r in _read_rows(fs, base, "rejects")
            if r["reason"] not in ("not_an_instruction",)
        ]
        by_task: dict[str, list[dict[str, Any]]] = {}
        for r in _read_rows(fs, base, "harness_samples"):
            by_task.setdefault(r["task"], []).append(r)
        for r in _read_rows(fs, base, "harness_results"):
            folder = f"{base}/harness/{_safe(r['task'])}"
            fs.makedirs(folder, exist_ok=True)
            with fs.open(f"{folder}/results.json", "w", encoding="utf-8") as f:
                f.write(r["results_json"])
            subtasks: dict[str, list[str]] = {}
            for s in by_task.get(r["task"], []):
                subtasks.setdefault(s["subtask"], []).append(s["line"])
            for subtask, lines in subtasks.items():
                with fs.open(f"{folder}/samples_{_safe(subtask)}.jsonl", "w", encoding="utf-8") as f:
                    f.write("\n".join(lines) + "\n")
        model = evaluated_model(inputs, cfg, fetch=False)
        specs = cfg.task_specs()
        rerun = None
        if specs:
            device = resolved_device(cfg.device)
            args = model_args(model.directory, resolved_dtype(cfg.dtype, device), cfg.max_length)
            names = [s if not is_task_file(s) else (_task_name(s) or s) for s in specs]
            folders = sorted({os.path.dirname(os.path.abspath(s)) for s in specs if is_task_file(s)})
            rerun = (
                "lm_eval run --model hf --model_args "
                + ",".join(f"{k}={v}" for k, v in args.items())
                + f" --tasks {','.join(names)} --device {device} --batch_size {cfg.batch_size}"
                + (f" --limit {cfg.limit}" if cfg.limit else "")
                + (f" --num_fewshot {cfg.num_fewshot}" if isinstance(cfg.num_fewshot, int) else "")
                + "".join(f" --include_path {d}" for d in folders)
                + " --output_path OUT --log_samples"
            )
            portable = [s for s in specs if is_task_file(s) and not cli_compatible(s)]
            if portable:
                rerun += (
                    f"\n# {', '.join(portable)}: Kiln resolved an include among lm_eval's installed tasks or a data "
                    "file relative to the YAML; give lm_eval absolute paths there"
                )
        markdown = eval_markdown(
            model.describe(),
            summary,
            metrics,
            errors,
            _read_rows(fs, base, "contamination"),
            _read_rows(fs, base, "generations"),
            _read_rows(fs, base, "confusion"),
            rerun,
            cfg.generation.shown if cfg.generation else 0,
        )
        with fs.open(f"{base}/report.md", "w", encoding="utf-8") as f:
            f.write(markdown)
        fields: dict[str, Any] = {
            "model": model.describe(),
            "summary": [r for r in summary if r["status"] == "ok"],
            "errors": errors,
        }
        if specs:
            fields["lm_eval"] = harness_version()
        contamination = _read_rows(fs, base, "contamination")
        if contamination:
            fields["contamination"] = contamination
        return fields


def _task_name(spec: str) -> str | None:
    from tasks.eval.harness import task_name_of

    return task_name_of(spec)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _read_rows(fs: Any, base: str, table: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    pattern = f"{base}/part-*.parquet" if table == "data" else f"{base}/{table}/part-*.parquet"
    rows: list[dict[str, Any]] = []
    for shard in sorted(fs.glob(pattern)):
        with fs.open(shard, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return rows


# --------------------------------------------------------------------------------------------------
# models side by side


COMPARISON_SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("metric", pa.string()),
        ("model", pa.string()),
        ("value", pa.float64()),
        ("stderr", pa.float64()),
        ("delta", pa.float64()),  # value - the baseline's
        ("baseline", pa.string()),
        ("higher_is_better", pa.bool_()),
    ]
)


def compare_artifacts(evals: list[Artifact], baseline: str | None = None, all_metrics: bool = False):
    """(labels, baseline label, compared rows) for eval artifacts, in the order given."""
    from tasks.eval.report import compare, unique_labels

    for a in evals:
        if a.stage != "eval":
            raise StageInputError("evals", f"{a.path} is a {a.stage} artifact, not an eval")
    labels = unique_labels(
        [(a.manifest.get("model") or {}).get("label") or a.fingerprint[:8] for a in evals],
        [a.fingerprint for a in evals],
    )
    base = baseline or labels[0]
    if base not in labels:
        raise StageInputError("baseline", f"no compared model is labelled {base!r} (labels: {', '.join(labels)})")
    rows = compare([(label, a.read_table().to_pylist()) for label, a in zip(labels, evals)], all_metrics)
    return labels, base, rows


class EvalCompareStage(Stage):
    """Models of a pipeline side by side: a value per model and task, deltas against the baseline."""

    name = "eval_compare"
    version = 1
    Config = EvalCompareConfig
    report_tables = ("comparison",)
    report_table_descriptions = {"comparison": "one row per task and metric, a column per model"}

    def bindings(self, cfg: EvalCompareConfig) -> dict[str, Any]:
        return {"evals": list(cfg.evals) or None}

    def plan(self, inputs: list[Artifact], cfg: EvalCompareConfig) -> list[dict[str, Any]]:
        if not [a for a in inputs if a.slot == "evals" or a.stage == "eval"]:
            raise StageInputError("evals", "list the eval sections to compare, e.g. evals: [eval_base, eval_sft]")
        return [{"compare": 0}]

    def process(
        self, unit: dict[str, Any], inputs: list[Artifact], cfg: EvalCompareConfig, out: ArtifactWriter
    ) -> None:
        from tasks.eval.report import comparison_rows

        evals = [a for a in inputs if a.slot == "evals" or (a.slot is None and a.stage == "eval")]
        labels, base, rows = compare_artifacts(evals, cfg.baseline, cfg.all_metrics)
        long = [
            {
                "task": c.task,
                "metric": c.metric,
                "model": label,
                "value": c.values.get(label),
                "stderr": c.stderr.get(label),
                "delta": c.delta(label, base),
                "baseline": base,
                "higher_is_better": c.higher_is_better,
            }
            for c in rows
            for label in labels
        ]
        out.stats.rows_in = len(evals)
        out.write(pa.Table.from_pylist(long, schema=COMPARISON_SCHEMA))
        wide = comparison_rows(rows, labels, base)
        if wide:
            out.table("comparison").write(pa.Table.from_pylist(wide))

    def finalize(self, inputs: list[Artifact], cfg: EvalCompareConfig, directory: str, fs: Any) -> dict[str, Any]:
        from tasks.eval.report import comparison_markdown

        evals = [a for a in inputs if a.slot == "evals" or (a.slot is None and a.stage == "eval")]
        labels, base, rows = compare_artifacts(evals, cfg.baseline, cfg.all_metrics)
        with fs.open(f"{directory.rstrip('/')}/report.md", "w", encoding="utf-8") as f:
            f.write(comparison_markdown(rows, labels, base))
        return {"models": labels, "baseline": base, "evals": [a.fingerprint for a in evals]}
