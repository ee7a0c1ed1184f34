"""`kiln serve`: the deployments of deployments/prefect.yaml, served from one process with flow.serve.

The same file drives `prefect deploy` for work pools, so schedules and default parameters have one
source of truth. Parameters are validated against the flows' pydantic schema before anything is served.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from flows.config import ConfigError, parse_config

DEFAULT_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deployments", "prefect.yaml")


def read_deployments(path: str, names: list[str] | None = None) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from None
    deployments = doc.get("deployments") or []
    if not isinstance(deployments, list) or not deployments:
        raise ConfigError(f"{path}: no `deployments:` list")
    known = [d.get("name") for d in deployments]
    for n in names or []:
        if n not in known:
            raise ConfigError(f"{path}: no deployment named {n!r} (deployments: {', '.join(map(str, known))})")
    chosen = [d for d in deployments if not names or d.get("name") in names]
    for i, d in enumerate(chosen):
        where = f"{path}: deployments[{d.get('name', i)}]"
        for key in ("name", "entrypoint"):
            if not d.get(key):
                raise ConfigError(f"{where}.{key}: required")
        config = (d.get("parameters") or {}).get("config")
        if config is not None:
            parse_config(config, f"{where}.parameters.config")
    return chosen


def _schedules(d: dict[str, Any]) -> list[Any]:
    from prefect.schedules import Cron, Interval

    out = []
    for s in d.get("schedules") or []:
        common = {
            "timezone": s.get("timezone"),
            "active": s.get("active", True),
            "parameters": s.get("parameters") or {},
        }
        if "cron" in s:
            out.append(Cron(s["cron"], **common))
        elif "interval" in s:
            out.append(Interval(s["interval"], **common))
        else:
            raise ConfigError(
                f"deployment {d['name']}: a schedule needs `cron` or `interval` (rrule: use prefect deploy)"
            )
    return out


def build(path: str, names: list[str] | None = None) -> list[Any]:
    from prefect.flows import load_flow_from_entrypoint

    deployments = []
    for d in read_deployments(path, names):
        file_part = d["entrypoint"].rsplit(":", 1)[0]
        if ":" in d["entrypoint"] and not os.path.exists(file_part):
            raise ConfigError(
                f"{path}: deployment {d['name']}: entrypoint file {file_part!r} not found from {os.getcwd()} "
                "(entrypoints are relative to the repo root: run kiln serve there)"
            )
        flow = load_flow_from_entrypoint(d["entrypoint"])
        deployments.append(
            flow.to_deployment(
                name=d["name"],
                description=d.get("description"),
                tags=d.get("tags") or [],
                parameters=d.get("parameters") or {},
                schedules=_schedules(d),
            )
        )
    return deployments


def serve(path: str, names: list[str] | None = None, limit: int | None = None) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*build(path, names), limit=limit)
