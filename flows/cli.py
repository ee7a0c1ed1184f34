"""`kiln`: run a pipeline, see its plan, inspect artifacts, collect garbage, run one stage on loose files."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.runtime import prefect_defaults

prefect_defaults()  # before anything imports prefect

from flows.config import ConfigError, PipelineConfig, deep_merge, load_config, parse_overrides  # noqa: E402
from flows.plan import plan_pipeline, select, store_for  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Kiln: raw text to trained language models, as a Prefect pipeline of content-addressed stages.",
)
# Output to a terminal takes the terminal's width; output to a file or a pipe (a log, a scheduler) is not
# cut at 80 columns, where rich would shorten a table's stage names and numbers with an ellipsis.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
console = Console(width=_WIDTH)
err = Console(stderr=True, width=None if sys.stderr.isatty() or os.environ.get("COLUMNS") else 200)


def _fail(message: str, code: int = 2) -> None:
    # escaped: a message may hold [brackets] (a list of names, a path) that rich would read as markup
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(path: str, overrides: list[str] | None = None) -> PipelineConfig:
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        _fail(str(e))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def run(
    config: str = typer.Argument(..., help="Pipeline config YAML."),
    only: str | None = typer.Option(None, "--only", help="Run just this stage (its inputs must be committed)."),
    from_stage: str | None = typer.Option(None, "--from", help="Recompute this stage and every stage after it."),
    refresh: list[str] = typer.Option([], "--refresh", help="Recompute this stage even if cached (repeatable)."),
    sets: list[str] = typer.Option(
        [], "--set", help="Override a config value: key=value, e.g. store.root=/tmp/k (repeatable)."
    ),
) -> None:
    """Run the pipeline; finished stages come back from cache."""
    cfg = _load(config, sets)
    try:
        planned = plan_pipeline(cfg, config)
        select(planned, only, from_stage, refresh)
    except ConfigError as e:
        _fail(str(e))

    from flows import embedded

    t0 = time.perf_counter()
    server = embedded.start_if_needed()  # boots while the imports below run
    try:
        from flows.pipeline import pipeline
        from flows.runtime import task_runner

        if server:
            server.wait_ready()
        flow = pipeline.with_options(task_runner=task_runner(cfg.runtime))
        try:
            refs = flow(config=cfg, only=only, from_stage=from_stage, refresh=list(refresh))
        except ConfigError as e:
            _fail(str(e))
        except Exception as e:  # the flow run is recorded as Failed in Prefect; say why here too
            _fail(f"pipeline failed: {type(e).__name__}: {e}", code=1)
    finally:
        if server:
            server.stop()
    _print_run_summary(refs, time.perf_counter() - t0)


def _print_run_summary(refs: dict[str, dict[str, Any]], seconds: float) -> None:
    from tasks.artifacts import Artifact

    table = Table(title=f"kiln run: {len(refs)} stage(s) in {seconds:.1f} s", title_justify="left")
    for col in ("stage", "status", "units copied", "rows in", "kept", "rejected", "seconds"):
        # a stage's name and status are never cut short on a narrow terminal: the numbers' columns wrap
        table.add_column(
            col, justify="left" if col in ("stage", "status") else "right", no_wrap=col in ("stage", "status")
        )
    notes = []
    for name, ref in refs.items():
        a = Artifact.open(ref["path"])
        st = a.manifest["stats"]
        reuse = a.reuse()
        table.add_row(
            name,
            "cached" if ref.get("cached") else "ran",
            f"{reuse['copied']}/{reuse['units']}" if reuse["copied"] else "-",
            f"{st['rows_in']:,}",
            f"{st['rows_out']:,}",
            f"{st['rows_rejected']:,}",
            f"{a.manifest.get('wall_seconds', st['seconds']):.2f}",
        )
        notes.append(f"[bold]{escape(name)}[/]: {escape(a.path)}")
        if a.reuse_note() and not ref.get("cached"):  # unchanged units copied, not recomputed
            notes.append("  " + escape(a.reuse_note()))
        if st["rejected"]:
            notes.append("  rejected by reason: " + escape(", ".join(f"{k} {v:,}" for k, v in st["rejected"].items())))
        extra = st.get("extra", {})
        if extra.get("job_id") is not None:  # a hosted fine-tuning job (openai_train)
            loss = extra.get("final_train_loss")
            notes.append(
                f"  job {escape(str(extra['job_id']))}: model {escape(str(extra.get('fine_tuned_model')))}, "
                f"{extra.get('trained_tokens') or 0:,} tokens trained"
                + (f", final training loss {loss:.3f}" if loss is not None else "")
                + f"; report: {escape(os.path.join(a.path, 'report.md'))}"
            )
        elif extra.get("final_validation_loss") is not None:
            scores = ", ".join(
                f"{k} {extra['final_' + k]:.3f}"
                for k in ("perplexity", "accuracy", "f1")
                if extra.get("final_" + k) is not None
            )
            best = (
                f"; exported step {extra['exported_step']} (best {extra['monitor']} {extra['best']:.4f})"
                if extra.get("best") is not None
                else ""
            )
            notes.append(
                f"  {extra['steps']} steps, {extra['tokens_trained']:,} tokens; validation loss "
                f"{extra['first_validation_loss']:.3f} -> {extra['final_validation_loss']:.3f} ({scores}){best}; "
                f"report: {escape(os.path.join(a.path, 'report.md'))}"
            )
        elif extra.get("final_train_loss") is not None:
            notes.append(
                f"  {extra['steps']} steps, {extra['tokens_trained']:,} tokens; training loss "
                f"{extra['final_train_loss']:.3f} (no validation split); "
                f"report: {escape(os.path.join(a.path, 'report.md'))}"
            )
        elif extra.get("final_reward") is not None:
            notes.append(
                f"  {extra['iterations']} iterations; mean reward {extra['first_reward']:.3f} -> "
                f"{extra['final_reward']:.3f}, KL to the reference {extra['final_kl']:.3f}; "
                f"report: {escape(os.path.join(a.path, 'report.md'))}"
            )
        elif extra.get("last_mean_score") is not None:
            notes.append(
                f"  mean score of fresh samples {extra['first_mean_score']:.3f} -> {extra['last_mean_score']:.3f}; "
                f"report: {escape(os.path.join(a.path, 'report.md'))}"
            )
        elif extra.get("score_sum") is not None and st["rows_out"]:
            notes.append(f"  mean score {extra['score_sum'] / st['rows_out']:.3f}")
    console.print(table)
    for line in notes:
        console.print(line, highlight=False, soft_wrap=True)
    console.print(
        "Inspect an artifact with [bold]kiln inspect PATH[/]; see the runs with [bold]prefect server start[/]."
    )
    for ref in refs.values():  # a comparison of models ends the summary: the numbers the run was for
        if ref.get("stage") == "eval_compare":
            from tasks.eval import compare_artifacts

            evals = [Artifact.open(i["path"]) for i in Artifact.open(ref["path"]).manifest["inputs"]]
            _print_comparison(*compare_artifacts(evals, Artifact.open(ref["path"]).manifest.get("baseline")))


@app.command()
def stages(
    config: str = typer.Argument(..., help="Pipeline config YAML."),
    sets: list[str] = typer.Option([], "--set", help="Override a config value: key=value (repeatable)."),
    dot: bool = typer.Option(False, "--dot", help="Print the stage graph in Graphviz dot instead of a table."),
) -> None:
    """The stage graph: each enabled stage in run order, what it reads, its fingerprint, whether it is committed."""
    cfg = _load(config, sets)
    try:
        planned = plan_pipeline(cfg, config)
    except ConfigError as e:
        _fail(str(e))
    if dot:
        print(_dot(planned))
        return
    table = Table(title=f"{cfg.name}: store {store_for(cfg).root}", title_justify="left")
    for col in ("stage", "kind", "reads", "fingerprint", "status", "path"):
        table.add_column(col, overflow="fold")
    for p in planned:
        reads = ", ".join(
            i if s in (i, "docs") or i.endswith("." + s) else f"{s}={i}" for i, s in zip(p.inputs, p.slots)
        )
        table.add_row(
            p.name,
            p.kind if p.kind != p.name else "",
            reads or "-",
            p.fingerprint,
            "[green]cached[/]" if p.committed else "[yellow]to run[/]",
            p.path,
        )
    console.print(table)


def _dot(planned: list[Any]) -> str:
    """The stage graph in Graphviz dot (`kiln stages CONFIG --dot | dot -Tsvg > stages.svg`)."""
    done = ', style="rounded,filled", fillcolor="#d8f0d8"'
    lines = ["digraph kiln {", "  rankdir=LR;", "  node [shape=box, style=rounded];"]
    for p in planned:
        label = p.name if p.kind == p.name else f"{p.name}\\n({p.kind})"
        lines.append(f'  "{p.name}" [label="{label}"{done if p.committed else ""}];')
        for i, s in zip(p.inputs, p.slots):
            edge = f' [label="{s}"]' if s not in ("docs", i) else ""
            lines.append(f'  "{i}" -> "{p.name}"{edge};')
    lines.append("}")
    return "\n".join(lines)


@app.command()
def inspect(
    path: str = typer.Argument(..., help="An artifact directory, or a Parquet file / directory."),
    rows: int = typer.Option(5, "--rows", "-n", help="How many rows to show."),
    rejects: bool = typer.Option(False, "--rejects", help="Show rejected rows instead of kept ones."),
    table: str = typer.Option("data", "--table", help="Which table of the artifact to show rows of."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """A manifest's stage, config, inputs and stats, and the first rows."""
    from tasks.artifacts import Artifact, ArtifactError

    try:
        art = Artifact.open(path)
    except ArtifactError as e:
        if path.endswith(".parquet") or (os.path.isdir(path) and any(f.endswith(".parquet") for f in os.listdir(path))):
            return _inspect_parquet(path, rows)
        _fail(str(e))
    m = art.manifest
    if as_json:
        console.print_json(json.dumps(m))
        return
    st = m["stats"]
    console.print(
        f"[bold]{m['stage']}[/] v{m['stage_version']}  fingerprint [cyan]{m['fingerprint']}[/]  "
        f"created {m['created_at']}"
    )
    console.print(f"path: {art.path}", markup=False)
    console.print(
        f"rows: {m['rows']:,} in {len(m['shards'])} shard(s), {_human(m['bytes'])} (arrow); "
        f"rejects: {m['rejects_rows']:,}"
    )
    others = [f"{n} ({t['rows']:,} rows)" for n, t in m.get("tables", {}).items() if n not in ("data", "rejects")]
    if others:
        console.print("other tables: " + ", ".join(others))
    for i in m.get("inputs", []):
        console.print(f"input: {i['stage']} {i['fingerprint']}  {i['path']}", markup=False)
    if m.get("sources"):
        console.print(f"sources: {len(m['sources'])} file(s)")
    if art.reuse_note():
        console.print(f"taken from earlier artifacts: {art.reuse_note()}", markup=False)
    console.print("config: " + json.dumps(m["config"], sort_keys=True), markup=False)
    stats = Table(title="stats", title_justify="left")
    stats.add_column("metric")
    stats.add_column("value", justify="right")
    for k in ("rows_in", "rows_out", "rows_rejected", "bytes_in", "bytes_out", "seconds"):
        stats.add_row(k, f"{st[k]:,}" if isinstance(st[k], int) else str(st[k]))
    for reason, n in st["rejected"].items():
        stats.add_row(f"rejected: {reason}", f"{n:,}")
    for k, v in st.get("extra", {}).items():
        stats.add_row(k, str(v))
    console.print(stats)
    table = "rejects" if rejects else table
    if table not in art.table_names():
        _fail(f"{path} has no table {table!r} (tables: {', '.join(art.table_names())})")
    _print_rows(art.head(rows, table=table), "rejected rows" if table == "rejects" else f"first rows ({table})")


def _inspect_parquet(path: str, n: int) -> None:
    import pyarrow.dataset as ds

    d = ds.dataset(path, format="parquet")
    console.print(f"[bold]{path}[/] (plain Parquet, no manifest): {d.count_rows():,} rows")
    console.print(str(d.schema))
    _print_rows(d.head(n).to_pylist(), "first rows")


def _print_rows(rows: list[dict[str, Any]], title: str) -> None:
    if not rows:
        console.print(f"({title}: none)")
        return
    console.print(f"[bold]{title}[/]")
    for i, r in enumerate(rows):
        console.rule(f"row {i}", align="left")
        for c, v in r.items():
            s = "null" if v is None else str(v).replace("\n", "⏎ ")
            console.print(
                f"[cyan]{c}[/]: " + (s[:300] + f"… ({len(s):,} chars)" if len(s) > 300 else s), highlight=False
            )


@app.command()
def gc(
    configs: list[str] = typer.Argument(..., help="Every pipeline config whose artifacts must be kept."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
    staging_age_hours: float = typer.Option(
        1.0, help="Remove unfinished staging directories older than this (a running stage writes to one)."
    ),
) -> None:
    """Remove artifacts that none of the given pipelines references, and stale unfinished writes."""
    keep: dict[str, set[str]] = {}
    stores = {}
    for path in configs:
        cfg = _load(path)
        try:
            planned = plan_pipeline(cfg, path)
        except ConfigError as e:
            _fail(str(e))
        store = store_for(cfg)
        stores[store.base] = store
        keep.setdefault(store.base, set()).update(p.path for p in planned)
    removed, kept, freed = 0, 0, 0
    for base, store in stores.items():
        for _stage, _fp, path in store.committed():
            if path in keep[base]:
                kept += 1
                continue
            freed += _du(store, path)
            removed += 1
            console.print(f"{'would remove' if dry_run else 'removed'} {path}", markup=False)
            if not dry_run:
                store.remove(path)
        for path in store.leftovers():
            if store.is_local and time.time() - os.path.getmtime(path) < staging_age_hours * 3600:
                continue
            freed += _du(store, path)
            removed += 1
            console.print(f"{'would remove' if dry_run else 'removed'} unfinished {path}", markup=False)
            if not dry_run:
                store.remove(path)
    verb = "would free" if dry_run else "freed"
    console.print(f"kept {kept} referenced artifact(s); {removed} removed; {verb} {_human(freed)}")


def _du(store, path: str) -> int:
    try:
        return int(store.fs.du(path))
    except Exception:
        return 0


@app.command("stage")
def stage_cmd(
    name: str = typer.Argument(..., help="Stage name (see `kiln stage --help`)."),
    inputs: list[str] = typer.Option(
        [],
        "--input",
        "-i",
        help="Input JSONL / CSV / Parquet / text files, dirs or globs, or committed artifacts "
        "(repeatable; a crawl needs none).",
    ),
    output: str = typer.Option(
        ..., "--output", "-o", help="Directory to write Parquet shards, _manifest.json and rejects/ into."
    ),
    config: str | None = typer.Option(
        None, "--config", "-c", help="YAML with the stage's settings (the stage section, or a pipeline config)."
    ),
    sets: list[str] = typer.Option([], "--set", help="Override a setting: key=value (dotted keys, YAML values)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it already holds an artifact."),
    workers: int = typer.Option(
        0,
        "--workers",
        "-w",
        min=0,
        help="Worker processes for the units (0: one per CPU core). A single input shard is cut into row "
        "ranges so that every worker has work; the output's rows are the same.",
    ),
) -> None:
    """Run one stage on files outside any pipeline, with the pipeline's code."""
    import yaml
    from pydantic import ValidationError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flows.config import format_validation_error
    from tasks.artifacts import Artifact, StageStats, staging_for_directory
    from tasks.ingest import IngestStage
    from tasks.stage import StageInputError, run_stage
    from tasks.table import get_stage

    try:
        stage = get_stage(name)
    except KeyError as e:
        _fail(str(e.args[0]))
    settings: dict[str, Any] = {}
    if config:
        try:
            with open(config, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            _fail(f"{config}: {e}")
        settings = data.get(name, data) if isinstance(data, dict) else {}
    try:
        settings = deep_merge(settings, parse_overrides(sets))
    except ConfigError as e:
        _fail(str(e))
    # An --input holding a committed artifact (a tokenizer, a tokenize output) is passed as it is;
    # loose files are ingested into documents first, unless the stage reads files itself.
    artifact_inputs = [p for p in inputs if os.path.isfile(os.path.join(p, "_manifest.json"))]
    file_inputs = [p for p in inputs if p not in artifact_inputs]
    reads_files = "paths" in stage.Config.model_fields
    loose_ingest = not reads_files and bool(file_inputs)
    if reads_files:
        settings["paths"] = list(inputs)
    try:
        cfg = stage.Config.model_validate(settings)
        ingest_cfg = IngestStage.Config.model_validate({"paths": file_inputs}) if loose_ingest else None
    except ValidationError as e:
        _fail(format_validation_error(e, config or "--set").replace("pipeline config", f"{name} config"))

    if os.path.exists(os.path.join(output, "_manifest.json")) and not overwrite:
        _fail(f"{output} already holds an artifact; pass --overwrite to replace it")
    if os.path.exists(output) and not os.path.exists(os.path.join(output, "_manifest.json")) and os.listdir(output):
        _fail(f"{output} exists and is not an artifact; choose an empty or new directory")

    t0 = time.perf_counter()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rows]:,} rows"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as bar:

        def runner(stg, c, ins, out_dir):
            task_id = bar.add_task(stg.name, total=None, rows=0)
            state = {"rows": 0}

            def progress(event: str, n: int) -> None:
                if event == "rows":
                    state["rows"] += n
                    bar.update(task_id, rows=state["rows"])
                else:
                    bar.advance(task_id, n)

            staging = staging_for_directory(out_dir)
            staging.discard()  # `kiln stage` does not resume: it is the quick, explicit path
            fp = stg.fingerprint(c, [a.fingerprint for a in ins])
            return run_stage(
                stg, c, ins, staging, fp, progress, on_plan=lambda n: bar.update(task_id, total=n), workers=n_workers
            )

        import tempfile

        n_workers = workers or os.cpu_count() or 1
        try:
            with tempfile.TemporaryDirectory(prefix="kiln-stage-") as tmp:
                inputs_art: list[Artifact] = []
                if loose_ingest:  # documents from loose files first, with ids kept, then the stage itself
                    inputs_art = [runner(IngestStage(), ingest_cfg, [], os.path.join(tmp, "ingest"))]
                inputs_art += [Artifact.open(p) for p in artifact_inputs]  # after the documents: a tokenizer goes last
                art = runner(stage, cfg, inputs_art, output)
        except StageInputError as e:
            _fail(f"{name}.{e}")
    st: StageStats = art.stats
    console.print(
        f"{name}: {st.rows_in:,} rows in, {st.rows_out:,} kept, {st.rows_rejected:,} rejected "
        f"{dict(st.rejected) or ''} in {time.perf_counter() - t0:.1f} s -> {art.path}"
    )


def _print_comparison(labels: list[str], base: str, rows: list[Any]) -> None:
    from tasks.eval.report import comparison_cells

    table = Table(title=f"{len(labels)} model(s) compared, deltas against {base}", title_justify="left")
    for col in ("task", "metric", *labels):
        table.add_column(escape(col), justify="left" if col in ("task", "metric") else "right")
    for cells in comparison_cells(rows, labels, base):
        table.add_row(*(escape(c) for c in cells))
    console.print(table)


@app.command()
def compare(
    artifacts: list[str] = typer.Argument(..., help="Eval artifacts (their directories); the first is the baseline."),
    baseline: str | None = typer.Option(None, "--baseline", help="The model label deltas are taken against."),
    all_metrics: bool = typer.Option(False, "--all", help="Every metric, not only each task's headline metric."),
    markdown: str | None = typer.Option(None, "--markdown", help="Also write the comparison with a chart here."),
) -> None:
    """Compare eval artifacts side by side: a value per model and task, deltas against the baseline."""
    from tasks.artifacts import Artifact, ArtifactError
    from tasks.eval import compare_artifacts
    from tasks.eval.report import comparison_markdown
    from tasks.stage import StageInputError

    try:
        labels, base, rows = compare_artifacts([Artifact.open(p) for p in artifacts], baseline, all_metrics)
    except (ArtifactError, StageInputError) as e:
        _fail(str(e))
    _print_comparison(labels, base, rows)
    if markdown:
        with open(markdown, "w", encoding="utf-8") as f:
            f.write(comparison_markdown(rows, labels, base))
        console.print(f"written: {markdown}", markup=False)


@app.command()
def hpo(
    config: str = typer.Argument(..., help="Pipeline config YAML with an `hpo:` section."),
    sets: list[str] = typer.Option([], "--set", help="Override a config value: key=value (repeatable)."),
    fresh: bool = typer.Option(False, "--fresh", help="Start the study over (its trained runs stay cached)."),
) -> None:
    """Hyperparameter search: an Optuna study whose trials are cached training runs; resumes a stopped study."""
    cfg = _load(config, sets)
    from flows.hpo.space import prepare

    try:
        prepare(cfg, config)  # the paths, ranges and objective, before anything starts
    except ConfigError as e:
        _fail(str(e))

    from flows import embedded

    t0 = time.perf_counter()
    server = embedded.start_if_needed()
    try:
        from flows.hpo.flow import hpo_flow
        from flows.runtime import task_runner

        if server:
            server.wait_ready()
        try:
            result = hpo_flow.with_options(task_runner=task_runner(cfg.runtime))(config=cfg, fresh=fresh)
        except ConfigError as e:
            _fail(str(e))
        except Exception as e:
            _fail(f"study failed: {type(e).__name__}: {e}", code=1)
    finally:
        if server:
            server.stop()
    _print_study(result, time.perf_counter() - t0)


def _print_study(result: dict[str, Any], seconds: float) -> None:
    counts = ", ".join(f"{n} {s}" for s, n in sorted(result["counts"].items()))
    table = Table(
        title=f"study {result['study']}: {counts} ({seconds:.1f} s); {result['objective']}", title_justify="left"
    )
    for col in ("trial", "state", "value", *result["params"], "cached", "seconds"):
        table.add_column(col, justify="left" if col == "state" else "right")
    for r in result["trials"]:
        cells = [r["trial"], r["state"], r["value"], *(r[p] for p in result["params"]), r["cached"], r["seconds"]]
        table.add_row(*("" if c is None else f"{c:.5g}" if isinstance(c, float) else escape(str(c)) for c in cells))
    console.print(table)
    best = result["best"]
    if best:
        values = ", ".join(f"{k}={v!r}" for k, v in best["params"].items())
        console.print(f"[bold]best[/]: trial {best['trial']}, {best['value']:.6g} with {escape(values)}")
        console.print(f"best config: {escape(result['best_yaml'])} (`kiln run` finds its runs cached)", highlight=False)
    console.print(
        f"trials: {escape(os.path.join(result['directory'], 'trials.parquet'))}; plots: "
        f"{escape(os.path.join(result['directory'], 'plots'))}; storage {escape(result['storage'])}",
        highlight=False,
        soft_wrap=True,
    )
    if result["storage"].startswith("sqlite"):
        console.print(
            f"browse it: .venv/bin/optuna-dashboard {escape(result['storage'])} --host 127.0.0.1", highlight=False
        )


@app.command()
def serve(
    file: str = typer.Option(None, "--file", "-f", help="Deployments file (default: deployments/prefect.yaml)."),
    names: list[str] = typer.Option([], "--name", help="Serve only this deployment (repeatable)."),
    limit: int | None = typer.Option(None, "--limit", help="Most flow runs to execute at once."),
) -> None:
    """Serve the deployments (schedules, UI-triggered runs) from this process, against a Prefect server."""
    from flows import serve as serving
    from flows.embedded import configured_api_url

    if not configured_api_url():
        _fail(
            "kiln serve needs a Prefect server to register with. Start one and point Kiln at it:\n"
            "  .venv/bin/kiln server start &      (PostgreSQL; or: prefect server start --host 127.0.0.1)\n"
            "  export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    path = file or serving.DEFAULT_FILE
    try:
        deployments = serving.build(path, list(names) or None)
    except ConfigError as e:
        _fail(str(e))
    console.print(f"serving {len(deployments)} deployment(s) from {path}: " + ", ".join(d.name for d in deployments))
    from prefect import serve as prefect_serve

    prefect_serve(*deployments, limit=limit)


from flows.server import app as server_app  # noqa: E402  (`kiln server start|stop|status|backup|restore|url`)

app.add_typer(server_app, name="server")


@app.command()
def label(
    config: str = typer.Argument(..., help="Pipeline config YAML."),
    section: str = typer.Argument("feedback", help="The feedback section whose pairs to label."),
    sets: list[str] = typer.Option([], "--set", help="Override a config value: key=value (repeatable)."),
) -> None:
    """Ask for preferences in the Prefect UI: the flow run pauses on each unanswered pair with a form."""
    from flows.embedded import configured_api_url

    cfg = _load(config, sets)
    if not configured_api_url():
        _fail(
            "kiln label waits for answers given in the Prefect UI: start a server and point Kiln at it:\n"
            "  .venv/bin/kiln server start &      (or: prefect server start --host 127.0.0.1)\n"
            "  export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    from flows.label import feedback_section, label_flow

    try:
        feedback_section(cfg, section, generated=False)
    except ConfigError as e:
        _fail(str(e))
    console.print(
        f"labelling {escape(section)}: answer in the Prefect UI (Runs > kiln-label > Resume)", highlight=False
    )
    ref = label_flow(config=cfg, section=section)
    console.print(f"{escape(section)}: committed {escape(ref['path'])}", highlight=False)


@app.command("feedback-export")
def feedback_export(
    config: str = typer.Argument(..., help="Pipeline config YAML."),
    section: str = typer.Argument("feedback", help="The feedback section whose pairs to export."),
    out: str = typer.Option(..., "--out", "-o", help="Where: a .jsonl or .csv file for an annotation tool."),
    sets: list[str] = typer.Option([], "--set", help="Override a config value: key=value (repeatable)."),
) -> None:
    """Write a feedback section's pairs (pair_id, prompt, reply_a, reply_b) for an external annotation tool;
    its answers (pair_id, choice = A | B | tie | skip, annotator, note) come back through `answers:`."""
    import csv

    from flows.label import feedback_section
    from tasks.artifacts import Artifact
    from tasks.prefs.feedback import offered_pairs
    from tasks.prefs.schema import load_messages

    cfg = _load(config, sets)
    try:
        planned, candidates = feedback_section(cfg, section)
    except ConfigError as e:
        _fail(str(e))
    pairs = offered_pairs(Artifact.open(candidates.path), planned.cfg)
    rows = [
        {
            "pair_id": p["pair_id"],
            "prompt": "\n\n".join(f"{m['role']}: {m['content']}" for m in load_messages(p["prompt"])),
            "reply_a": p["reply_a"],
            "reply_b": p["reply_b"],
        }
        for p in pairs
    ]
    with open(out, "w", encoding="utf-8", newline="") as f:
        if out.lower().endswith(".csv"):
            writer = csv.DictWriter(f, fieldnames=["pair_id", "prompt", "reply_a", "reply_b"])
            writer.writeheader()
            writer.writerows(rows)
        else:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    console.print(f"{len(rows)} pair(s) written to {escape(out)}", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
