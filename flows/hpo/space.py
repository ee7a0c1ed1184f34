"""The search space, checked against the pipeline before any trial runs, and what each trial runs.

`prepare(config)` turns a pipeline config with an `hpo:` section into a `Search`, or refuses it with a
ConfigError naming the field: a path that names no field of this pipeline (with the closest name), an
empty range, a range whose ends the config itself refuses, a field no fingerprint depends on (every trial
would be the same run) or one the objective does not read, an objective the pipeline cannot report.

It also splits the pipeline: the stages the searched values change (fingerprints chain, so everything
downstream of a searched section) run in each trial; the stages the objective needs that no searched
value changes (the data stages, usually) run once before the trials and are shared by all of them.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from flows.config import ConfigError, PipelineConfig, parse_config
from flows.hpo.config import HPOConfig, ParamRange
from flows.plan import PlannedStage, plan_pipeline

LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity")


def _closest(name: str, names: list[str]) -> str:
    near = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f"; did you mean {near[0]}?" if near else ""


def _number_kind(annotation: Any) -> str | None:
    """'float' or 'int' for a numeric field's annotation (optional or not), else None."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    kinds = set(args or (annotation,))
    if float in kinds:
        return "float"
    if int in kinds and bool not in kinds:
        return "int"
    return None


def lower_is_better(metric: str) -> bool:
    name = metric.rsplit("/", 1)[-1]
    return name in LOWER_IS_BETTER or name.endswith(("loss", "perplexity"))


@dataclass
class SearchParam:
    """One searched field: its path as the config writes it, and its range."""

    path: str
    keys: list[str]  # the path's parts as the config's YAML names them (aliases: `model.from`)
    kind: str  # float | int | categorical
    spec: ParamRange

    @property
    def where(self) -> str:
        return f"hpo.params.{self.path}"

    def distribution(self) -> Any:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        s = self.spec
        if self.kind == "categorical":
            return CategoricalDistribution(s.choices)
        if self.kind == "int":
            return IntDistribution(int(s.low), int(s.high), log=s.log, step=int(s.step or 1))
        return FloatDistribution(s.low, s.high, log=s.log, step=s.step)

    def suggest(self, trial: Any) -> Any:
        s = self.spec
        if self.kind == "categorical":
            return trial.suggest_categorical(self.path, s.choices)
        if self.kind == "int":
            return trial.suggest_int(self.path, int(s.low), int(s.high), step=int(s.step or 1), log=s.log)
        return trial.suggest_float(self.path, s.low, s.high, step=s.step, log=s.log)

    def grid_values(self) -> list[Any]:
        """Every value a grid visits: the choices, the ints of the range, or a float range's steps."""
        s = self.spec
        if self.kind == "categorical":
            return list(s.choices)
        if s.log:
            raise ConfigError(f"{self.where}: a grid takes no log range; list the values as choices")
        if self.kind == "int":
            return list(range(int(s.low), int(s.high) + 1, int(s.step or 1)))
        if s.step is None:
            raise ConfigError(f"{self.where}: a grid needs choices, an int range or a float range with a step")
        n = int(math.floor((s.high - s.low) / s.step + 1e-9))
        return [float(f"{s.low + k * s.step:.12g}") for k in range(n + 1)]

    def ends(self) -> list[Any]:
        """The values the checks before any trial apply: the range's ends, or every choice."""
        s = self.spec
        if self.kind == "categorical":
            return list(s.choices)
        if self.kind == "int":
            return [int(s.low), int(s.high)]
        return [s.low, s.high]


@dataclass
class Objective:
    section: str  # the planned stage whose output holds the value
    kind: str  # train | eval
    metric: str
    direction: str  # minimize | maximize
    prune_stage: str | None = None  # the training run whose validation values stream to the pruner
    prune_metric: str | None = None
    prune_sign: float = 1.0  # +1, or -1 when the pruned metric improves the other way than the objective

    @property
    def describe(self) -> str:
        return f"{self.section}: {self.metric} ({self.direction})"


@dataclass
class Search:
    config: PipelineConfig  # the pipeline as configured (the values every trial starts from)
    hpo: HPOConfig
    base: dict[str, Any]  # the config as data, less its hpo section: what best.yaml starts from
    params: list[SearchParam]
    objective: Objective
    trial_stages: list[str]  # run by every trial, in dependency order
    shared_stages: list[str]  # run once before the trials
    planned: list[PlannedStage] = field(repr=False, default_factory=list)

    @property
    def study_name(self) -> str:
        return self.hpo.study or self.config.name

    def data_for(self, values: dict[str, Any]) -> dict[str, Any]:
        """The pipeline config (as data) with the searched fields set to `values`."""
        data = _copy(self.base)
        for p in self.params:
            if p.path in values:
                _set(data, p.keys, values[p.path])
        return data

    def config_for(self, values: dict[str, Any], devices: list[int] | None = None) -> PipelineConfig:
        """A trial's config. `devices`: the share of this machine's devices its runs may use (not
        fingerprinted: the same values on other devices are the same runs)."""
        data = self.data_for(values)
        if devices is not None:
            for name in {p.section for p in self.planned if p.name in self.trial_stages}:
                section = data.get(name)
                if isinstance(section, dict) and "launch" in _fields_of(self.config.section(name)):
                    section.setdefault("launch", {})["devices"] = list(devices)
        where = ", ".join(f"{k}={v!r}" for k, v in values.items())
        return parse_config(data, f"trial ({where})")


def _copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_copy(v) for v in data]
    return data


def _set(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def _fields_of(model: Any) -> dict[str, Any]:
    return type(model).model_fields if isinstance(model, BaseModel) else {}


def config_data(config: PipelineConfig) -> dict[str, Any]:
    """The config as the data a YAML file would hold (what was set, aliases as written), less `hpo`."""
    data = config.model_dump(mode="json", by_alias=True, exclude_unset=True)
    data.pop("hpo", None)
    return data


def resolve(config: PipelineConfig, path: str) -> tuple[list[str], Any, Any]:
    """(the path's keys as the config's data names them, the field's annotation or None, its current
    value) of a dotted path into the pipeline config; a ConfigError naming the path otherwise."""
    where = f"hpo.params.{path}"
    parts = path.split(".")
    sections = [name for name, _ in config.sections()]
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"{where}: a path is SECTION.FIELD[.FIELD...], e.g. train.optim.lr")
    node = config.section(parts[0])
    if node is None:
        raise ConfigError(
            f"{where}: this pipeline has no section {parts[0]!r} "
            f"(sections: {', '.join(sections)}){_closest(parts[0], sections)}"
        )
    keys, annotation, done = [parts[0]], None, parts[0]
    for part in parts[1:]:
        if isinstance(node, BaseModel):
            fields = type(node).model_fields
            by_key = {(f.alias or name): name for name, f in fields.items()} | {name: name for name in fields}
            if part not in by_key:
                names = sorted(f.alias or n for n, f in fields.items())
                raise ConfigError(
                    f"{where}: unknown field {part!r} in {done} (its fields: {', '.join(names)}){_closest(part, names)}"
                )
            name = by_key[part]
            keys.append(fields[name].alias or name)
            annotation = fields[name].annotation
            node = getattr(node, name)
        elif isinstance(node, dict):
            if part not in node:
                names = sorted(node)
                raise ConfigError(
                    f"{where}: {done} has no key {part!r} (it has: {', '.join(names) or 'none'}){_closest(part, names)}"
                )
            keys.append(part)
            annotation = None
            node = node[part]
        else:
            raise ConfigError(f"{where}: {done} is a value, not a section with fields")
        done = f"{done}.{part}"
    if isinstance(node, (BaseModel, dict)):
        inner = list(_fields_of(node)) if isinstance(node, BaseModel) else list(node)
        raise ConfigError(f"{where}: {done} is a section, not a value; search one of its fields ({', '.join(inner)})")
    return keys, annotation, node


def _param(config: PipelineConfig, path: str, spec: ParamRange) -> SearchParam:
    where = f"hpo.params.{path}"
    keys, annotation, value = resolve(config, path)
    if spec.choices is not None:
        bad = [c for c in spec.choices if not isinstance(c, (str, int, float, bool)) and c is not None]
        if bad:
            raise ConfigError(f"{where}: choices are numbers, strings, booleans or null; not {bad[0]!r}")
        return SearchParam(path, keys, "categorical", spec)
    field_kind = _number_kind(annotation) if annotation is not None else None
    if field_kind is None and isinstance(value, (int, float)) and not isinstance(value, bool):
        field_kind = "int" if isinstance(value, int) else "float"
    if field_kind is None:
        raise ConfigError(f"{where}: not a number field (its value: {value!r}); list the values to try as choices")
    kind = spec.type or field_kind
    if kind == "float" and field_kind == "int":
        raise ConfigError(f"{where}: a whole-number field: give an int range (type: int) or choices")
    if kind == "int":
        for name in ("low", "high", "step"):
            v = getattr(spec, name)
            if v is not None and v != int(v):
                raise ConfigError(f"{where}.{name}: {v:g} is not a whole number, and {path} is one")
    return SearchParam(path, keys, kind, spec)


def _upstream(planned: list[PlannedStage], name: str) -> set[str]:
    by_name = {p.name: p for p in planned}
    seen, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += by_name[n].inputs
    return seen


def _objective(config: PipelineConfig, hpo: HPOConfig, planned: list[PlannedStage]) -> Objective:
    from tasks.train.stage import VALIDATION_METRICS, reports_validation_metric

    o = hpo.objective
    trains = [p.name for p in planned if p.kind == "train"]
    if o.section is None:
        if len(trains) != 1:
            raise ConfigError(
                "hpo.objective.section: "
                + (
                    f"this pipeline has several training sections ({', '.join(trains)}): name the one to judge"
                    if trains
                    else "this pipeline has no training section; name an eval section"
                )
            )
        section = trains[0]
    else:
        section = o.section
    by_name = {p.name: p for p in planned}
    judged = [p.name for p in planned if p.kind in ("train", "eval")]
    if section not in by_name or by_name[section].kind not in ("train", "eval"):
        raise ConfigError(
            f"hpo.objective.section: {section!r} is not a training or eval section of this pipeline "
            f"(those: {', '.join(judged) or 'none'}){_closest(section, judged)}"
        )
    target = by_name[section]
    if target.kind == "train":
        cfg = target.cfg
        if not reports_validation_metric(cfg.objective, o.metric):
            known = ", ".join(sorted(VALIDATION_METRICS.get(cfg.objective, VALIDATION_METRICS["causal_lm"])))
            raise ConfigError(
                f"hpo.objective.metric: the {cfg.objective} objective of {section} reports {known}; "
                f"not {o.metric!r}{_closest(o.metric, known.split(', '))}"
            )
        monitored, mode = cfg.monitored()
        natural = mode if o.metric == monitored else ("min" if lower_is_better(o.metric) else "max")
        direction = o.direction if o.direction != "auto" else ("minimize" if natural == "min" else "maximize")
        objective = Objective(section, "train", o.metric, direction, section, o.metric)
        objective.prune_sign = 1.0 if (natural == "min") == (direction == "minimize") else -1.0
        return objective
    direction = o.direction
    if direction == "auto":
        direction = "minimize" if lower_is_better(o.metric) else "maximize"
    objective = Objective(section, "eval", o.metric, direction)
    model = next((i for i, s in zip(target.inputs, target.slots) if s == "model"), None)
    if model is not None and by_name[model].kind == "train":
        monitored, mode = by_name[model].cfg.monitored()
        objective.prune_stage, objective.prune_metric = model, monitored
        objective.prune_sign = 1.0 if (mode == "min") == (direction == "minimize") else -1.0
    return objective


def prepare(config: PipelineConfig, source: str = "config") -> Search:
    """The checked search, or a ConfigError naming the field (after the config's source); nothing runs."""
    try:
        return _prepare(config, source)
    except ConfigError as e:
        message = str(e)
        raise ConfigError(message if message.startswith(f"{source}:") else f"{source}: {message}") from None


def _prepare(config: PipelineConfig, source: str) -> Search:
    hpo = config.hpo
    if hpo is None:
        raise ConfigError("hpo: this config has no hpo section (README: Hyperparameter search)")
    base = config_data(config)
    planned = plan_pipeline(config, source)
    objective = _objective(config, hpo, planned)
    needed = _upstream(planned, objective.section)
    params, varied = [], set()
    for path, spec in hpo.params.items():
        p = _param(config, path, spec)
        if hpo.sampler == "grid":
            p.grid_values()
        changed: set[str] = set()
        prints = []
        for value in p.ends():  # the config must take each end of the range, and they must differ in effect
            data = _copy(base)
            _set(data, p.keys, value)
            try:
                plan = plan_pipeline(parse_config(data, f"{p.where} = {value!r}"), source)
            except ConfigError as e:
                raise ConfigError(f"{p.where}: the config refuses {value!r}: {e}") from None
            prints.append({s.name: s.fingerprint for s in plan})
        for fps in prints[1:]:
            changed |= {n for n, fp in fps.items() if fp != prints[0].get(n)}
        if not changed:
            raise ConfigError(
                f"{p.where}: no stage's fingerprint depends on it (it says how a stage runs, not what it "
                "makes), so every trial would be the same run"
            )
        if not changed & needed:
            raise ConfigError(
                f"{p.where}: it changes {', '.join(sorted(changed))}, none of which {objective.section} "
                f"(the objective) reads"
            )
        varied |= changed
        params.append(p)
    trial_stages = [p.name for p in planned if p.name in needed and p.name in varied]
    shared = [p.name for p in planned if p.name in needed and p.name not in varied]
    if objective.prune_stage not in trial_stages:
        objective.prune_stage = None  # its run is the same in every trial: nothing to stop
    _check_parallel(config, hpo, planned, trial_stages)
    return Search(config, hpo, base, params, objective, trial_stages, shared, planned)


def check_runs(search: Search) -> None:
    """Each end of each range through the training stages' own checks (`plan`: the model's dropout
    settings, the monitored metric, the dataset), once their inputs are committed: a value the stage
    refuses stops the study before any trial, naming the field."""
    from tasks.artifacts import Artifact
    from tasks.stage import StageInputError

    o = search.objective
    judged = o.section if o.kind == "train" else o.prune_stage
    by_name = {s.name: s for s in search.planned}
    if judged is not None:
        run = by_name[judged]
        data = next((by_name[i] for i, slot in zip(run.inputs, run.slots) if slot == "data"), None)
        if data is not None and data.committed:
            splits = (Artifact.open(data.path).manifest.get("hf_dataset") or {}).get("splits") or []
            if "validation" not in splits:
                why = "the objective" if judged == o.section else "the pruner"
                raise ConfigError(
                    f"hpo.objective: {judged} trains on {data.name}'s dataset, which has no validation rows, and "
                    f"{why} reads its validation values: give {data.section} a validation_fraction (or more data)"
                )
    for p in search.params:
        for value in p.ends():
            data = _copy(search.base)
            _set(data, p.keys, value)
            planned = plan_pipeline(parse_config(data, f"{p.where} = {value!r}"))
            by_name = {s.name: s for s in planned}
            for s in planned:
                if s.name not in search.trial_stages or s.kind != "train":
                    continue
                if not all(by_name[i].committed for i in s.inputs):
                    continue  # an input made by the trial itself: its own run checks it
                inputs = [Artifact.open(by_name[i].path, slot) for i, slot in zip(s.inputs, s.slots)]
                try:
                    s.stage.plan(inputs, s.cfg)
                except StageInputError as e:
                    raise ConfigError(f"{p.where}: the config refuses {value!r}: {s.section}.{e}") from None


def _check_parallel(config: PipelineConfig, hpo: HPOConfig, planned: list[PlannedStage], trials: list[str]) -> None:
    if hpo.parallel == 1:
        return
    for p in planned:
        launch = getattr(p.cfg, "launch", None)
        if p.name not in trials or launch is None:
            continue
        if launch.hostfile:
            raise ConfigError(
                f"hpo.parallel: {p.section} trains on a hostfile's nodes; trials side by side split one machine"
            )
        have = len(devices_here(launch.device))
        if hpo.parallel > have:
            raise ConfigError(
                f"hpo.parallel: {hpo.parallel} trials at once, but this machine has {have} "
                + ("GPU(s)" if launch.device == "gpu" else "CPU core(s)")
            )
        share = have // hpo.parallel
        if launch.device == "gpu" and launch.procs_per_node > share:
            raise ConfigError(
                f"hpo.parallel: {hpo.parallel} trials at once leave {share} GPU(s) each; {p.section}.launch."
                f"procs_per_node is {launch.procs_per_node}: lower it, or run fewer trials at once"
            )


def devices_here(device: str) -> list[int]:
    """This machine's GPU ids, or the CPU cores this process may use."""
    import os

    if device == "gpu":
        import torch

        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def device_shares(search: Search) -> list[list[int] | None]:
    """One share of the machine's devices per trial slot (None: all of them, one trial at a time)."""
    n = search.hpo.parallel
    if n == 1:
        return [None]
    device = next(
        (p.cfg.launch.device for p in search.planned if p.name in search.trial_stages and hasattr(p.cfg, "launch")),
        "cpu",
    )
    have = devices_here(device)
    k = len(have) // n
    return [have[i * k : (i + 1) * k] for i in range(n)]
