"""What a pipeline config will compute: each enabled stage, its fingerprint, and whether it is done.

Fingerprints chain (a stage's fingerprint includes its inputs' fingerprints), so the whole plan is
known before anything runs: `kiln stages` prints it, `kiln gc` keeps what it references, and the flow
uses it to decide what to recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.config import DATA_STAGES, DOCUMENT_STAGES, PIPELINE, SOURCE_STAGES, ConfigError, PipelineConfig
from tasks.artifacts import ArtifactStore
from tasks.stage import Stage, StageConfig, StageInputError, get_stage


@dataclass
class PlannedStage:
    name: str
    stage: Stage
    cfg: StageConfig
    inputs: list[str]  # names of the stages whose outputs this one reads
    fingerprint: str
    path: str
    committed: bool


def store_for(config: PipelineConfig) -> ArtifactStore:
    return ArtifactStore(config.store.root, config.store.shard_rows, config.store.shard_mb << 20)


def plan_pipeline(config: PipelineConfig, source: str = "config") -> list[PlannedStage]:
    store = store_for(config)
    planned: dict[str, PlannedStage] = {}
    documents: list[str] = []  # the stages whose outputs are the current documents
    for name, wants in PIPELINE:
        cfg = config.stage_config(name)
        if cfg is None or not cfg.enabled:
            continue
        inputs: list[str] = []
        for want in wants:
            optional = want.endswith("?")  # read when enabled, skipped otherwise
            want = want.rstrip("?")
            if want == "docs":
                if not documents:
                    if optional:
                        continue
                    raise ConfigError(f"{source}: {name} reads documents: configure a source stage "
                                      f"({', '.join(sorted(SOURCE_STAGES))})")
                inputs += documents
            elif want in planned:
                inputs.append(want)
            elif not optional:
                raise ConfigError(f"{source}: {name} reads the output of {want}: configure and enable {want}")
        stage = get_stage(name)
        try:
            fp = stage.fingerprint(cfg, [planned[i].fingerprint for i in inputs])
        except StageInputError as e:
            raise ConfigError(f"{source}: {name}.{e}") from None
        planned[name] = PlannedStage(
            name=name,
            stage=stage,
            cfg=cfg,
            inputs=inputs,
            fingerprint=fp,
            path=store.path(name, fp),
            committed=store.is_committed(name, fp),
        )
        if name in SOURCE_STAGES:
            documents.append(name)
        elif name in DOCUMENT_STAGES:
            documents = [name]
    if not planned:
        raise ConfigError(f"{source}: no stage is configured and enabled (stages: {', '.join(DATA_STAGES)})")
    return list(planned.values())


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
