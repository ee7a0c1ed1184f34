"""pairs: preference pairs from scored candidates, best against worst per prompt.

Candidates of one prompt come from different units of generate (one per sample), so the stage shuffles
by prompt: unit p reads the prompt ids of every shard and keeps those whose hash falls in partition p,
then only their rows. Per prompt: unfinished candidates (cut at max_new_tokens) are left out unless
`keep_unfinished`; the highest score is chosen and the lowest rejected (ties broken by sample number);
a prompt is dropped, as a reject with the reason, when fewer than two candidates are left
(`too_few_candidates`), when every reply is the same text (`all_identical`), or when the best and the
worst score differ by less than `min_margin` (`tie`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from tasks.artifacts import Artifact, ArtifactWriter, pick
from tasks.prefs.schema import PAIRS_SCHEMA
from tasks.stage import Stage, StageConfig, StageInputError


class PairsConfig(StageConfig):
    """How pairs are formed."""

    min_margin: float = Field(
        0.0,
        ge=0,
        description="Drop a prompt whose best and worst scores differ by less (a difference of 0 is always a tie).",
    )
    keep_unfinished: bool = Field(False, description="Pair replies cut at max_new_tokens too.")
    partitions: int = Field(4, ge=1, le=1024, description="Units the prompts are spread over (by hash of their id).")


def partition_of(prompt_id: str, partitions: int) -> int:
    return int.from_bytes(hashlib.blake2b(prompt_id.encode(), digest_size=8).digest(), "little") % partitions


class PairsStage(Stage):
    name = "pairs"
    version = 1
    Config = PairsConfig

    def bindings(self, cfg: PairsConfig) -> dict[str, str | None]:
        return {"scored": "score"}

    def plan(self, inputs: list[Artifact], cfg: PairsConfig) -> list[dict[str, Any]]:
        if pick(inputs, "scored", ("score",)) is None:
            raise StageInputError("inputs", "pairs reads scored candidates: the score stage's output")
        return [{"partition": p} for p in range(cfg.partitions)]

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: PairsConfig, out: ArtifactWriter) -> None:
        scored = pick(inputs, "scored", ("score",))
        groups: dict[str, list[dict[str, Any]]] = {}
        for batch in scored.iter_batches(batch_size=4096):
            mine = pc.equal(
                pa.array([partition_of(p, cfg.partitions) for p in batch.column("prompt_id").to_pylist()]),
                unit["partition"],
            )
            for row in batch.filter(mine).to_pylist():
                groups.setdefault(row["prompt_id"], []).append(row)
        stats = out.stats
        rows = []
        for prompt_id in sorted(groups):
            group = sorted(groups[prompt_id], key=lambda r: r["sample"])
            stats.rows_in += len(group)
            usable = group if cfg.keep_unfinished else [r for r in group if r["finished"] == "eos"]
            out.count("unfinished_left_out", len(group) - len(usable))
            verdict = None
            if len(usable) < 2:
                verdict = ("too_few_candidates", f"{len(usable)} finished candidate(s) of {len(group)}")
            elif len({r["reply"] for r in usable}) == 1:
                verdict = ("all_identical", f"all {len(usable)} replies are the same text")
            else:
                best = max(usable, key=lambda r: (r["score"], -r["sample"]))
                worst = min(usable, key=lambda r: (r["score"], r["sample"]))
                margin = best["score"] - worst["score"]
                if margin <= 0 or margin < cfg.min_margin:
                    verdict = (
                        "tie",
                        f"best {best['score']:.4g} - worst {worst['score']:.4g} = {margin:.4g} "
                        f"< min_margin {cfg.min_margin}",
                    )
            if verdict:
                out.reject(
                    *verdict,
                    id=prompt_id,
                    meta=group[0]["prompt"],
                    text=json.dumps([r["reply"] for r in group], ensure_ascii=False),
                )
                continue
            meta = {
                "candidates": len(group),
                "margin": margin,
                "chosen_sample": best["sample"],
                "rejected_sample": worst["sample"],
                "mean_score": sum(r["score"] for r in usable) / len(usable),
            }
            rows.append(
                {
                    "id": prompt_id,
                    "prompt": best["prompt"],
                    "chosen": best["reply"],
                    "rejected": worst["reply"],
                    "chosen_score": best["score"],
                    "rejected_score": worst["score"],
                    "source": scored.fingerprint,
                    "meta": json.dumps(meta, sort_keys=True),
                }
            )
        if rows:
            out.write(pa.RecordBatch.from_pylist(rows, schema=PAIRS_SCHEMA))
