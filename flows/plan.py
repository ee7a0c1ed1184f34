"""What a pipeline config will compute: each enabled stage, what it reads, its fingerprint, whether it is done.

The stage table says what each kind reads; the config says which sections exist and how they are
wired (`inputs:`, and wiring a stage takes from its own config, such as a training run's
`model.from`). Fingerprints chain (a stage's fingerprint includes its inputs' fingerprints), so the
whole plan is known before anything runs: `kiln stages` prints it, `kiln gc` keeps what it
references, and the flow uses it to decide what to recompute.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from flows.config import ConfigError, PipelineConfig
from tasks.artifacts import ArtifactStore
from tasks.stage import Stage, StageConfig, StageInputError
from tasks.table import KIND_BY_NAME, KINDS, MACRO_BY_NAME, kind, steps_of


@dataclass
class PlannedStage:
    name: str  # how the run names it: the section, or `<section>.<phase>` for a phase of an instance section
    kind: str  # the stage kind (the store keeps its artifacts under this name)
    section: str  # the config section that configures it
    stage: Stage
    cfg: StageConfig
    inputs: list[str]  # names of the planned stages whose outputs this one reads, in order
    slots: list[str] = field(default_factory=list)  # the slot each input fills
    fingerprint: str = ""
    path: str = ""
    committed: bool = False
    role: str = ""


def store_for(config: PipelineConfig) -> ArtifactStore:
    return ArtifactStore(config.store.root, config.store.shard_rows, config.store.shard_mb << 20)


def _ordered_sections(config: PipelineConfig, source: str) -> list[tuple[str, str, StageConfig]]:
    """(section, kind, config) of the enabled sections, macros expanded into their sections: by the
    table's order of kinds, then as written."""
    position = {k.name: i for i, k in enumerate(KINDS)}
    found = []
    for order, (name, cfg) in enumerate(config.sections()):
        if cfg is None or not cfg.enabled:
            continue
        kind_name = config.section_kind(name)
        if kind_name in MACRO_BY_NAME:
            for j, (sub, sub_kind, sub_cfg) in enumerate(MACRO_BY_NAME[kind_name].expand(name, cfg)):
                if config.section(sub) is not None:
                    raise ConfigError(f"{source}: {name} expands into a section {sub!r}, which the config has too")
                found.append((position[sub_kind], order + j / 1000, sub, sub_kind, sub_cfg))
            continue
        found.append((position[kind_name], order, name, kind_name, cfg))
    return [(name, k, cfg) for _, _, name, k, cfg in sorted(found)]


def plan_pipeline(config: PipelineConfig, source: str = "config") -> list[PlannedStage]:
    store = store_for(config)
    sections = _ordered_sections(config, source)
    section_names = {name for name, _, _ in sections}
    main_step = {name: name for name in section_names}  # section -> the planned name of its own stage

    # 1. every step of every section, in table order, with its reads resolved to planned names
    planned: list[PlannedStage] = []
    documents: list[str] = []  # planned names whose outputs are the current documents
    for section, kind_name, cfg in sections:
        steps = steps_of(kind_name)
        names = {
            s.name: (s.name if section == kind_name else (section if s.name == kind_name else f"{section}.{s.name}"))
            for s in steps
        }
        main_step[section] = names[kind_name]
        for step in steps:
            stage = step.stage()
            bound = {**stage.bindings(cfg), **cfg.inputs}
            known = {r.rstrip("?*") for s in steps for r in s.reads}
            unknown = sorted(set(cfg.inputs) - known)
            if unknown:
                raise ConfigError(
                    f"{source}: {section}.inputs: {', '.join(unknown)} is not an input of {kind_name} "
                    f"(its inputs: {', '.join(sorted(known))})"
                )
            inputs, slots = [], []
            for want in step.reads:
                optional = want.endswith(("?", "*"))
                slot = want.rstrip("?*")
                where = f"{section}.inputs.{slot}" if slot in cfg.inputs else section
                if slot in names and slot not in cfg.inputs:  # a sibling phase of the same section
                    inputs.append(names[slot])
                    slots.append(slot)
                elif slot in bound:  # wired by the section's `inputs:` or by the stage from its config
                    targets = bound[slot]
                    if targets is None:
                        continue  # not read
                    if isinstance(targets, str):
                        targets = [targets]
                    elif not want.endswith("*"):
                        raise ConfigError(f"{source}: {where}: {slot} is one input, not a list")
                    for target in targets:
                        if target not in section_names:
                            raise ConfigError(
                                f"{source}: {where}: {names[step.name]} reads the output of {target!r}: "
                                f"configure and enable a section named {target}"
                            )
                        inputs.append(target)  # resolved to the section's own stage below
                        slots.append(slot)
                elif slot == "docs":
                    if not documents:
                        if optional:
                            continue
                        raise ConfigError(
                            f"{source}: {names[step.name]} reads documents: configure a source stage "
                            f"({', '.join(k.name for k in KINDS if k.role == 'source')})"
                        )
                    inputs += documents
                    slots += ["docs"] * len(documents)
                elif slot in section_names:
                    inputs.append(slot)
                    slots.append(slot)
                elif not optional:
                    raise ConfigError(
                        f"{source}: {names[step.name]} reads the output of {slot}: configure and enable {slot}"
                    )
            planned.append(
                PlannedStage(
                    name=names[step.name],
                    kind=step.name,
                    section=section,
                    stage=stage,
                    cfg=cfg,
                    inputs=inputs,
                    slots=slots,
                    role=step.role,
                )
            )
        own_role = kind(kind_name).role
        if own_role == "source":
            documents.append(main_step[section])
        elif own_role == "filter":
            documents = [main_step[section]]
    if not planned:
        raise ConfigError(
            f"{source}: no stage is configured and enabled "
            f"(stages: {', '.join(k.name for k in KINDS if k.has_section)})"
        )
    for p in planned:
        p.inputs = [main_step.get(i, i) for i in p.inputs]

    # 2. dependency order (the table's order where the graph leaves a choice), fingerprints
    by_name = {p.name: p for p in planned}
    order = {p.name: i for i, p in enumerate(planned)}
    waiting = {p.name: set(p.inputs) for p in planned}
    for p in planned:
        if p.name in waiting[p.name]:
            raise ConfigError(f"{source}: {p.section} reads its own output")
    ready = [(order[n], n) for n, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    result: list[PlannedStage] = []
    while ready:
        _, name = heapq.heappop(ready)
        p = by_name[name]
        try:
            p.fingerprint = p.stage.fingerprint(p.cfg, [by_name[i].fingerprint for i in p.inputs])
        except StageInputError as e:
            raise ConfigError(f"{source}: {p.section}.{e}") from None
        p.path = store.path(p.kind, p.fingerprint)
        p.committed = store.is_committed(p.kind, p.fingerprint)
        result.append(p)
        for other, deps in waiting.items():
            if name in deps:
                deps.discard(name)
                if not deps and other not in {r.name for r in result}:
                    heapq.heappush(ready, (order[other], other))
    if len(result) < len(planned):
        stuck = sorted(n for n in waiting if n not in {r.name for r in result})
        raise ConfigError(f"{source}: these stages read each other's outputs in a cycle: {', '.join(stuck)}")
    return result


def select(
    planned: list[PlannedStage], only: str | None, from_stage: str | None, refresh: list[str]
) -> tuple[list[PlannedStage], set[str]]:
    """The stages to execute and the ones to recompute even if committed, from the CLI/flow switches."""
    names = [p.name for p in planned]
    for flag, value in (("--only", only), ("--from", from_stage), *(("--refresh", r) for r in refresh)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value}: not an enabled stage of this pipeline (stages: {', '.join(names)})")
    if only and from_stage:
        raise ConfigError("--only and --from cannot be combined")
    forced = set(refresh)
    if only:
        chosen = [p for p in planned if p.name == only]
        for up in chosen[0].inputs:
            if not next(p for p in planned if p.name == up).committed:
                raise ConfigError(
                    f"--only {only}: its input stage {up!r} has no committed artifact yet; run that stage first"
                )
        return chosen, forced
    if from_stage:  # the stage and everything downstream of it (planned is in dependency order)
        downstream = {from_stage}
        for p in planned:
            if downstream & set(p.inputs):
                downstream.add(p.name)
        forced |= downstream
    return planned, forced


def is_model_stage(p: PlannedStage) -> bool:
    return KIND_BY_NAME[p.kind].role == "model"


# the roles whose stages use a model (train one, sample from one, score with one, judge one) or report on them
_MODEL_HALF = frozenset({"model", "candidates", "eval", "report"})


def data_stage_names(planned: list[PlannedStage]) -> set[str]:
    """The stages of the data half: those that neither use a model nor read anything that did (the corpus,
    its tokenization and datasets, ready-made preference pairs); the rest is the model half."""
    model_half: set[str] = set()
    for p in planned:  # dependency order
        if KIND_BY_NAME[p.kind].role in _MODEL_HALF or model_half & set(p.inputs):
            model_half.add(p.name)
    return {p.name for p in planned} - model_half
