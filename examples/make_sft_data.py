"""Instruction data for the demo's SFT and preference stages, from the module docstrings in examples/data:
"What is the X module for?" answered with the first sentence of X's docstring (Alpaca records), and the
same questions, reworded, as the prompts the preference loop and RL answer.

    python examples/make_sft_data.py
"""

from __future__ import annotations

import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
QUESTIONS = ["What is the {m} module for?", "What does the {m} module do?", "Describe the {m} module briefly."]


def first_sentence(doc: str) -> str:
    text = " ".join(doc.split())
    text = re.sub(r"^Module \S+ -+ ", "", text)  # "Module difflib -- helpers for ..." -> "helpers for ..."
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    sentence = (m.group(1) if m else text)[:200]
    return sentence[0].upper() + sentence[1:]


def main() -> None:
    with open(os.path.join(HERE, "data", "stdlib_docstrings.jsonl")) as f:
        docs = [json.loads(line) for line in f]
    sft, prompts = [], []
    for d in docs:
        module = d["id"].split("/", 1)[1]
        answer = first_sentence(d["text"])
        for i, q in enumerate(QUESTIONS[:2]):
            sft.append({"id": f"{module}-{i}", "instruction": q.format(m=module), "output": answer})
        prompts.append({"id": module, "prompt": QUESTIONS[2].format(m=module)})
    os.makedirs(os.path.join(HERE, "sft"), exist_ok=True)
    with open(os.path.join(HERE, "sft", "module_questions.jsonl"), "w") as f:
        for r in sft:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(HERE, "sft", "prompts.jsonl"), "w") as f:
        for r in prompts:
            f.write(json.dumps(r) + "\n")
    print(f"{len(sft)} instruction examples, {len(prompts)} prompts")


if __name__ == "__main__":
    main()
