"""What people read: an eval's markdown report (headline table, chart, details, errors, contamination) and
the comparison of several evals (models side by side, deltas against a baseline), as markdown with a
chart and as rows for a table."""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from typing import Any


def _cell(value: Any, width: int = 120) -> str:
    text = " ".join(("" if value is None else str(value)).split())
    text = text[:width] + ("…" if len(text) > width else "")
    return text.replace("|", "\\|")


def fmt(value: Any, digits: int = 4, sign: str = "") -> str:
    """A number for a table: 4 decimals for scores, fewer for large numbers such as a perplexity."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        size = abs(value)
        places = digits if size < 100 else 2 if size < 1000 else 1
        return f"{value:{sign}.{places}f}" if size < 1e7 else f"{value:{sign}.4g}"
    return str(value)


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def headline_chart(rows: list[dict[str, Any]]) -> str | None:
    """Horizontal bars of the headline metrics that are fractions (accuracy-like), with their standard
    errors where the harness computed them. Perplexity, BLEU and other unbounded numbers stay in the table."""
    bars = [r for r in rows if r.get("value") is not None and 0.0 <= r["value"] <= 1.0 and r.get("status") != "error"]
    if not bars:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(bars) + 1.0), dpi=100)
    labels = [f"{r['task']} ({r['metric']})" for r in bars]
    ax.barh(
        labels[::-1],
        [r["value"] for r in bars][::-1],
        xerr=[r.get("stderr") or 0.0 for r in bars][::-1],
        color="#4c72b0",
    )
    ax.set_xlim(0, 1)
    ax.set_xlabel("score")
    return _png(fig)


def eval_markdown(
    model: dict[str, Any],
    summary: list[dict[str, Any]],
    metrics: list[dict[str, Any]],
    errors: list[dict[str, Any]],
    contamination: list[dict[str, Any]],
    generations: list[dict[str, Any]],
    confusion: list[dict[str, Any]],
    rerun: str | None,
    shown: int = 5,
) -> str:
    lines = [
        f"# Evaluation of {model['label']}",
        "",
        f"Model: `{model['path']}`" + (f" ({model['objective']})" if model.get("objective") else ""),
        "",
    ]
    ok = [r for r in summary if r.get("status") != "error"]
    if ok:
        lines += ["| task | metric | value | ± stderr | n | shots |", "|---|---|---:|---:|---:|---:|"]
        for r in ok:
            lines.append(
                f"| {_cell(r['task'])} | {r['metric']} | {fmt(r['value'])} | {fmt(r.get('stderr'))} | "
                f"{fmt(r.get('n'))} | {fmt(r.get('num_fewshot'))} |"
            )
        chart = headline_chart(ok)
        if chart:
            lines += ["", f"![headline metrics](data:image/png;base64,{chart})"]
    if errors:
        lines += ["", "## Not evaluated", "", "| task | reason | detail |", "|---|---|---|"]
        lines += [f"| {_cell(e['task'])} | {e['reason']} | {_cell(e['detail'], 400)} |" for e in errors]
    if confusion:
        names = list(dict.fromkeys([c["true"] for c in confusion] + [c["predicted"] for c in confusion]))
        counts = {(c["true"], c["predicted"]): c["count"] for c in confusion}
        lines += ["", "## Classification", "", "Confusion matrix (rows: true label, columns: predicted):", ""]
        lines += ["| true \\ predicted | " + " | ".join(_cell(n) for n in names) + " |", "|---|" + "---:|" * len(names)]
        for t in names:
            lines.append(f"| {_cell(t)} | " + " | ".join(str(counts.get((t, p), 0)) for p in names) + " |")
        per_class = [r for r in metrics if r["task"] == "classification" and "/" in r["metric"]]
        if per_class:
            by_label: dict[str, dict[str, float]] = {}
            for r in per_class:
                kind, _, label = r["metric"].partition("/")
                by_label.setdefault(label, {})[kind] = r["value"]
            lines += ["", "| label | precision | recall | F1 |", "|---|---:|---:|---:|"]
            for label, m in by_label.items():
                lines.append(
                    f"| {_cell(label)} | {fmt(m.get('precision'))} | {fmt(m.get('recall'))} | {fmt(m.get('f1'))} |"
                )
    if generations:
        lines += [
            "",
            "## Replies to held-out instructions",
            "",
            "Exact match and ROUGE-L F1 (rouge_score) are means over replies (0-1); BLEU is sacrebleu's corpus "
            "BLEU (0-100); reward is the mean score of the replies.",
            "",
            "| prompt | reference | reply | ROUGE-L | reward |",
            "|---|---|---|---:|---:|",
        ]
        for g in generations[:shown]:
            lines.append(
                f"| {_cell(g['prompt'], 80)} | {_cell(g['reference'], 80)} | {_cell(g['reply'], 80)} | "
                f"{fmt(g['rouge_l'], 3)} | {fmt(g.get('reward'), 3)} |"
            )
    if contamination:
        n = contamination[0]["ngram"]
        lines += [
            "",
            f"## Contamination: {n}-gram overlap of the training documents with the task items",
            "",
            f"An item is contaminated when {n} of its words appear in order in a training document "
            "(an item shorter than that: all of its words).",
            "",
            "| task | items | contaminated | share | documents | example |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for c in contamination:
            example = (
                f"document {c['example_document']}, item {c['example_item']}: “{c['example_ngram']}”"
                if c.get("example_document")
                else (c.get("note") or "")
            )
            lines.append(
                f"| {_cell(c['task'])} | {c['items']} | {c['contaminated']} | {fmt(c['fraction'], 3)} | "
                f"{c['documents']} | {_cell(example, 160)} |"
            )
        lines.append(f"\n{contamination[0]['documents_read']:,} training documents read.")
    if rerun:
        lines += [
            "",
            "## The harness's own files",
            "",
            "`harness/<task>/results.json` and `harness/<task>/samples_<task>.jsonl` are lm_eval's results and "
            "per-sample logs, written by its EvaluationTracker. The same numbers from lm_eval's CLI:",
            "",
            f"```\n{rerun}\n```",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# comparison


@dataclass
class Compared:
    task: str
    metric: str
    higher_is_better: bool | None
    values: dict[str, float | None] = field(default_factory=dict)
    stderr: dict[str, float | None] = field(default_factory=dict)

    def delta(self, label: str, baseline: str) -> float | None:
        a, b = self.values.get(label), self.values.get(baseline)
        return None if a is None or b is None else a - b


def unique_labels(labels: list[str], fingerprints: list[str]) -> list[str]:
    """Labels made unique where two evals share one (the fingerprint's start tells them apart)."""
    out = []
    for label, fp in zip(labels, fingerprints):
        out.append(f"{label} ({fp[:8]})" if labels.count(label) > 1 else label)
    return out


def compare(evals: list[tuple[str, list[dict[str, Any]]]], all_metrics: bool = False) -> list[Compared]:
    """Rows (task, metric) across the evals (label, metric rows), in the order they first appear."""
    table: dict[tuple[str, str], Compared] = {}
    for label, rows in evals:
        for r in rows:
            if not (all_metrics or r.get("headline")):
                continue
            name = r["task"] if r.get("subtask") in (None, r["task"]) else f"{r['task']}/{r['subtask']}"
            metric = r["metric"] if r.get("filter") in (None, "", "none") else f"{r['metric']},{r['filter']}"
            c = table.setdefault((name, metric), Compared(name, metric, r.get("higher_is_better")))
            c.values[label] = r["value"]
            c.stderr[label] = r.get("stderr")
    return list(table.values())


def comparison_rows(rows: list[Compared], labels: list[str], baseline: str) -> list[dict[str, Any]]:
    """Wide rows: a value per model and its delta against the baseline (for a table artifact)."""
    out = []
    for c in rows:
        row: dict[str, Any] = {"task": c.task, "metric": c.metric}
        for label in labels:
            row[label] = c.values.get(label)
            if label != baseline:
                row[f"Δ {label}"] = c.delta(label, baseline)
        out.append(row)
    return out


def _better(c: Compared, delta: float | None) -> str:
    if delta is None or c.higher_is_better is None or delta == 0:
        return ""
    return " ▲" if (delta > 0) == bool(c.higher_is_better) else " ▼"


def comparison_cells(rows: list[Compared], labels: list[str], baseline: str) -> list[list[str]]:
    """The comparison as text cells (task, metric, then per model "value (delta ▲/▼)") for a terminal table."""
    out = []
    for c in rows:
        cells = [c.task, c.metric]
        for label in labels:
            value, d = c.values.get(label), c.delta(label, baseline)
            extra = "" if label == baseline or d is None else f" ({fmt(d, sign='+')}{_better(c, d)})"
            cells.append(fmt(value) + extra)
        out.append(cells)
    return out


def comparison_markdown(rows: list[Compared], labels: list[str], baseline: str, title: str | None = None) -> str:
    lines = [
        title or f"# Models compared: {', '.join(labels)}",
        "",
        f"Deltas are against **{baseline}**; ▲ better, ▼ worse (by the metric's direction).",
        "",
        "| task | metric | " + " | ".join(_cell(label) for label in labels) + " |",
        "|---|---|" + "---:|" * len(labels),
    ]
    for c in rows:
        cells = []
        for label in labels:
            value = c.values.get(label)
            if label == baseline or value is None:
                cells.append(fmt(value))
            else:
                d = c.delta(label, baseline)
                cells.append(f"{fmt(value)} ({fmt(d, sign='+')}{_better(c, d)})")
        lines.append(f"| {_cell(c.task)} | {c.metric} | " + " | ".join(cells) + " |")
    chart = comparison_chart(rows, labels)
    if chart:
        lines += ["", f"![models compared](data:image/png;base64,{chart})"]
    return "\n".join(lines) + "\n"


def comparison_chart(rows: list[Compared], labels: list[str], most: int = 24) -> str | None:
    """A small bar chart per (task, metric), one bar per model, each on its own scale."""
    rows = [c for c in rows if any(v is not None for v in c.values.values())][:most]
    if not rows:
        return None
    plt = _pyplot()
    cols = min(4, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols, 2.3 * nrows), dpi=100, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, c in zip(axes.flat, rows):
        values = [c.values.get(label) for label in labels]
        ax.bar(
            range(len(labels)), [v or 0.0 for v in values], color=[colors[i % len(colors)] for i in range(len(labels))]
        )
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{c.task}\n{c.metric}", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    return _png(fig)
