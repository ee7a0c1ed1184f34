"""A study's outputs: the trials table (trials.parquet), best.yaml (the pipeline config with the best
values, which `kiln run` reproduces from cache), and the plots (PNG files, and data URIs for the report
the flow publishes as a Prefect artifact)."""

from __future__ import annotations

import base64
import io
import logging
import os
import warnings
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from flows.hpo.space import Search

log = logging.getLogger("kiln.hpo")

STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


def trial_rows(study: Any, search: Search) -> list[dict[str, Any]]:
    """One row per trial, in order: its state, value, values, run, and how it went."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        row: dict[str, Any] = {
            "trial": t.number,
            "state": STATE_NAMES.get(t.state.name, t.state.name.lower()),
            "value": t.value if t.state.name == "COMPLETE" else None,
            **{p.path: t.params.get(p.path) for p in search.params},
            "cached": a.get("cached"),
            "seconds": round(t.duration.total_seconds(), 2) if t.duration else None,
            "fingerprint": a.get("fingerprint"),
            "note": a.get("note") or "",
        }
        if t.system_attrs.get("failed_trial") is not None:
            row["note"] = f"retry of trial {t.system_attrs['failed_trial']}. " + row["note"]
        rows.append(row)
    return rows


def write_trials(rows: list[dict[str, Any]], search: Search, path: str) -> None:
    columns: dict[str, pa.Array] = {
        "trial": pa.array([r["trial"] for r in rows], pa.int64()),
        "state": pa.array([r["state"] for r in rows], pa.string()),
        "value": pa.array([r["value"] for r in rows], pa.float64()),
    }
    for p in search.params:  # a categorical may mix types: stored as its YAML text
        values = [r[p.path] for r in rows]
        if p.kind == "categorical":
            columns[p.path] = pa.array([None if v is None else yaml.safe_dump(v).strip() for v in values], pa.string())
        else:
            columns[p.path] = pa.array(values, pa.int64() if p.kind == "int" else pa.float64())
    columns["cached"] = pa.array([r["cached"] for r in rows], pa.bool_())
    columns["seconds"] = pa.array([r["seconds"] for r in rows], pa.float64())
    columns["fingerprint"] = pa.array([r["fingerprint"] for r in rows], pa.string())
    columns["note"] = pa.array([r["note"] for r in rows], pa.string())
    tmp = path + ".tmp"
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, path)


def best_yaml(search: Search, trial: Any) -> str:
    """The pipeline config with the best trial's values, as YAML (no hpo section: `kiln run` runs it, and
    finds the best trial's runs committed)."""
    data = search.data_for(trial.params)
    head = [
        f"# The best trial of study {search.study_name}: trial {trial.number}, "
        f"{search.objective.describe} = {trial.value:.6g}",
        "# values: " + ", ".join(f"{k}={v!r}" for k, v in trial.params.items()),
    ]
    if trial.user_attrs.get("fingerprint"):
        head.append(f"# {search.objective.section} fingerprint: {trial.user_attrs['fingerprint']}")
    head.append("# `kiln run` of this file finds that trial's runs committed (cached).")
    return "\n".join(head) + "\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# plots


PLOTS = (
    ("history", "Optimisation history", "plot_optimization_history"),
    ("intermediate", "Validation values as trials ran (pruned trials stop early)", "plot_intermediate_values"),
    ("importances", "Parameter importances", "plot_param_importances"),
    ("parallel", "Parallel coordinates", "plot_parallel_coordinate"),
    ("contour", "Contour", "plot_contour"),
    ("slice", "Slice", "plot_slice"),
)


def plots(study: Any, search: Search, directory: str) -> list[tuple[str, str, str]]:
    """Optuna's matplotlib plots as PNG files in `directory`: (title, path, data URI) of each that applies
    (importances need two finished trials, a contour two parameters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    os.makedirs(directory, exist_ok=True)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    out = []
    for key, title, fn in PLOTS:
        if key == "contour" and len(search.params) < 2:
            continue
        if key in ("importances", "parallel", "contour", "slice", "history") and len(complete) < (
            2 if key == "importances" else 1
        ):
            continue
        if key == "intermediate" and not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = getattr(vis, fn)(study)
        except Exception as e:  # a plot that does not apply to this study (e.g. one value everywhere)
            log.info("plot %s left out: %s", key, e)
            plt.close("all")
            continue
        fig = ax.flat[0].figure if hasattr(ax, "flat") else ax.figure
        fig.set_size_inches(8, 5) if key != "slice" and key != "contour" else None
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        png = buf.getvalue()
        path = os.path.join(directory, f"{key}.png")
        with open(path, "wb") as f:
            f.write(png)
        out.append((title, path, "data:image/png;base64," + base64.b64encode(png).decode()))
    return out


def markdown(search: Search, rows: list[dict[str, Any]], best: Any, storage: str, figures: list) -> str:
    o = search.objective
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines = [
        f"# Study {search.study_name}: {len(rows)} trials",
        "",
        f"Objective: {o.describe}. Sampler {search.hpo.sampler}, pruner "
        f"{search.hpo.pruner.kind if o.prune_stage else 'none'}; storage `{storage}`.",
        "",
        ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ".",
        "",
    ]
    if best is not None:
        lines += [
            f"**Best: trial {best.number}, {o.metric} = {best.value:.6g}** with "
            + ", ".join(f"`{k}` = {v!r}" for k, v in best.params.items()),
            "",
        ]
    names = [p.path for p in search.params]
    lines += ["| trial | state | value | " + " | ".join(names) + " | cached | seconds | note |"]
    lines += ["|---:|---|---:|" + "---:|" * len(names) + "---|---:|---|"]
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.6g}"
        cells = [("" if r[n] is None else f"{r[n]:.4g}" if isinstance(r[n], float) else str(r[n])) for n in names]
        lines.append(
            f"| {r['trial']} | {r['state']} | {value} | "
            + " | ".join(cells)
            + f" | {'yes' if r['cached'] else ''} | {r['seconds'] or ''} | {r['note']} |"
        )
    for title, _, uri in figures:
        lines += ["", f"## {title}", "", f"![{title}]({uri})"]
    return "\n".join(lines) + "\n"
