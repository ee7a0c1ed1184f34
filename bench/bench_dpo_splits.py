"""DPO's held-out preference accuracy on another split of the same task.

The DPO loop of tests/test_prefs.py (a random character-vocabulary Llama, the share of "a" in a reply as
the reward, 3 rounds) run into DIR: the prompts' ids, and so the held-out pairs, follow the prompts'
source label (by default the prompt file's path, so each DIR is another split; `--source` fixes it).
Prints each round's held-out accuracy and the mean score of fresh samples by round. See BENCHMARKS.md
("DPO's held-out preference accuracy depends on the split").

    .venv/bin/python bench/bench_dpo_splits.py /tmp/split1 [--prompts 48] [--steps 32] [--min-margin 0] \
        [--source LABEL]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
os.environ.pop("PREFECT_API_URL", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--min-margin", type=float, default=0.0)
    ap.add_argument("--source", help="the prompts' source label (default: the prompt file's path)")
    args = ap.parse_args()

    from flows.runtime import prefect_defaults

    prefect_defaults()
    from prefect.testing.utilities import prefect_test_harness
    from test_prefs import _rounds, _validation, loop_config, make_char_policy, write_prompts

    from flows.config import PipelineConfig
    from flows.pipeline import pipeline

    d = os.path.abspath(args.directory)
    os.makedirs(d, exist_ok=True)
    policy = make_char_policy(os.path.join(d, "model"))
    prompts = write_prompts(os.path.join(d, "prompts.txt"), args.prompts)
    cfg = loop_config(os.path.join(d, "store"), policy, prompts, "dpo", rounds=3, steps=args.steps, beta=1.0)
    cfg["loop"]["pairs"]["min_margin"] = args.min_margin
    cfg["prompts"]["source"] = args.source or prompts  # the prompts' ids, and so the split, follow this label
    with prefect_test_harness():
        refs = pipeline(config=PipelineConfig.model_validate(cfg))
    accuracy = [round(_validation(refs, f"loop.{r}.train")["accuracy"], 3) for r in ("r1", "r2", "r3")]
    scores = [round(r["mean_score"], 3) for r in _rounds(refs)]
    print(f"prompts {args.prompts}, steps {args.steps}, min_margin {args.min_margin}")
    print(f"held-out accuracy by round (r1, r2, r3): {accuracy}")
    print(f"mean score of fresh samples by round (r1 .. final): {scores}")


if __name__ == "__main__":
    main()
