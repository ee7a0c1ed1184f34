"""The pipeline config: one pydantic model composing every stage's config, loaded from YAML.

Its sections come from the stage table (tasks/table.py): one optional section per stage kind, named
after it, plus any number of further sections that say which kind they are (`sft: {kind: train}`),
so a pipeline can hold several training runs, evaluations, rounds. The same model is the flows'
parameter, so a Prefect deployment shows it as a validated form and the server refuses bad values
before a run exists.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    create_model,
    model_validator,
)

from flows.hpo.config import HPOConfig
from tasks.table import KIND_BY_NAME, MACROS, SECTION_KINDS

# what a section of another name may be: a stage kind, or a macro (a kind that expands into stages)
INSTANCE_KINDS: dict[str, Any] = {
    **{k.name: k.stage.Config for k in SECTION_KINDS},
    **{m.name: m.Config for m in MACROS},
}

SECTION_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class StoreConfig(BaseModel):
    """Where artifacts live. Shard sizes shape files, not content, so they are not fingerprinted."""

    model_config = ConfigDict(extra="forbid")

    root: str = Field(".kiln/artifacts", description="Local directory or fsspec URL (s3://, gs://, ...).")
    shard_rows: int = Field(100_000, ge=1, description="Roll to a new Parquet shard after this many rows.")
    shard_mb: int = Field(128, ge=1, description="... or after this many MiB of (uncompressed) Arrow data.")


class RuntimeConfig(BaseModel):
    """Which Prefect task runner spreads the stages' units of work."""

    model_config = ConfigDict(extra="forbid")

    task_runner: Literal["threads", "processes", "dask", "ray"] = Field(
        "threads",
        description="'threads': in-process thread pool (the default; the tokenizers and Arrow release the GIL). "
        "'processes': a local process pool, one core per worker, for the pure-Python stages (clean, langid). "
        "'dask': a Dask cluster (prefect-dask). 'ray': a Ray cluster (pip install 'kiln[ray]').",
    )
    workers: int = Field(2, ge=1, le=1024, description="Threads, or worker processes / CPUs of a local cluster.")
    dask_address: str | None = Field(
        None, description="Scheduler address of an existing Dask cluster (tcp://host:8786); none starts a local one."
    )
    ray_address: str | None = Field(
        None, description="Address of an existing Ray cluster (ray://host:10001 or auto); none starts a local one."
    )


def _section_kind(value: Any) -> str | None:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return kind if kind in INSTANCE_KINDS else None


# A section whose name is not a kind's: validated as the kind its `kind:` names.
InstanceSection = Annotated[
    Union[tuple(Annotated[config, Tag(name)] for name, config in INSTANCE_KINDS.items())],  # noqa: UP007
    Discriminator(
        _section_kind,
        custom_error_type="section_kind",
        custom_error_message="unknown field: not a stage kind's section, and no `kind:` naming one "
        f"({', '.join(INSTANCE_KINDS)}); check its spelling and indentation",
    ),
]

_PipelineBase = create_model(
    "_PipelineBase",
    __config__=ConfigDict(extra="allow", title="Kiln pipeline"),
    name=(str, Field("kiln", description="A name for this pipeline, shown in logs and reports.")),
    store=(StoreConfig, Field(default_factory=StoreConfig)),
    runtime=(RuntimeConfig, Field(default_factory=RuntimeConfig)),
    hpo=(
        HPOConfig | None,
        Field(None, description="A hyperparameter search over this config (`kiln hpo`); `kiln run` ignores it."),
    ),
    **{k.name: (k.stage.Config | None, Field(None, description=k.summary)) for k in SECTION_KINDS},
)


def _instances_schema(schema: dict[str, Any]) -> None:
    # The UI form shows the kinds' sections; further sections are plain objects there (checked by
    # pydantic when the run starts), not a oneOf of every config, which a JSON-schema check could not
    # tell apart.
    schema["additionalProperties"] = {
        "type": "object",
        "description": "Another instance of a stage kind: `kind:` names it, the rest is that kind's settings.",
        "required": ["kind"],
        "properties": {"kind": {"enum": list(INSTANCE_KINDS)}},
    }


class PipelineConfig(_PipelineBase):
    """A Kiln pipeline: which stages run, with what settings, storing artifacts where."""

    model_config = ConfigDict(extra="allow", title="Kiln pipeline", json_schema_extra=_instances_schema)
    __pydantic_extra__: dict[str, InstanceSection] = Field(init=False)

    @model_validator(mode="after")
    def _sections_are_consistent(self) -> PipelineConfig:
        for name, cfg in self.sections():
            if name in KIND_BY_NAME:
                if cfg.kind not in (None, name):
                    raise ValueError(
                        f"{name}.kind: the `{name}` section is the {name} stage; name another "
                        f"section for a {cfg.kind} stage"
                    )
            elif not SECTION_NAME.match(name):
                raise ValueError(f"{name}: a section name is lower case letters, digits and _, starting with a letter")
        return self

    def sections(self) -> list[tuple[str, Any]]:
        """(section name, config) of every configured section, kinds' sections first in table order."""
        out = [(k.name, getattr(self, k.name)) for k in SECTION_KINDS if getattr(self, k.name) is not None]
        return out + list((self.__pydantic_extra__ or {}).items())

    def section(self, name: str) -> Any:
        if name in KIND_BY_NAME and KIND_BY_NAME[name].has_section:
            return getattr(self, name)
        return (self.__pydantic_extra__ or {}).get(name)

    def section_kind(self, name: str) -> str | None:
        if name in KIND_BY_NAME and KIND_BY_NAME[name].has_section:
            return name
        cfg = (self.__pydantic_extra__ or {}).get(name)
        return cfg.kind if cfg is not None else None


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the field."""


def _loc(loc: tuple[Any, ...]) -> str:
    # An instance section's errors carry the kind as a tag after the section name: drop it.
    if len(loc) > 1 and isinstance(loc[0], str) and loc[0] not in KIND_BY_NAME and loc[1] in INSTANCE_KINDS:
        loc = (loc[0], *loc[2:])
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid pipeline config"]
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not allowed here; check its spelling and indentation)"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        lines.append(f"  {_loc(e['loc'])}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> PipelineConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a pipeline config is a mapping of sections, got {type(data).__name__}")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key.sub=value` strings (values parsed as YAML scalars/lists) into a nested mapping."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. store.root=/data/kiln")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def load_config(path: str, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML pipeline config, applying `--set key=value` overrides on top."""
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such config file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if overrides:
        if data is not None and not isinstance(data, dict):
            return parse_config(data, path)
        data = deep_merge(data or {}, parse_overrides(overrides))
        path = f"{path} (with --set {' '.join(overrides)})"
    return parse_config(data, path)
