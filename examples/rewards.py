"""Rule-based rewards for the demo's preference and RL stages (a `module:function` the score stage imports).

`describes_the_module`: the demo's prompts ask about one standard-library module ("Describe the dbm module
briefly."). A reply earns, out of 1.0:

- 0.4 when it names that module;
- 0.4 times the share of its words that are English words of the docstring corpus (examples/data), so
  gibberish earns little and a longer reply earns no more than a shorter one; under 4 words the share is
  scaled down (an empty reply earns nothing);
- 0.2 when it reads as a sentence: a capital letter first, a full stop last.

The demo's model is tiny and briefly trained, so its first replies are near gibberish; the partial credit
gives a prompt's samples different scores, so there are pairs to learn from, and a person can watch the
mean rise round by round in the preference report. `names_the_module` is the strict part alone.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter

_MODULE = re.compile(r"the (\S+) module")
_WORD = re.compile(r"[A-Za-z]+")
_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "stdlib_docstrings.jsonl")


@functools.cache
def _vocabulary() -> frozenset[str]:
    """Words seen at least twice in the docstrings (a typo or a fragment seen once does not count)."""
    counts: Counter[str] = Counter()
    with open(_CORPUS, encoding="utf-8") as f:
        for line in f:
            counts.update(w.lower() for w in _WORD.findall(json.loads(line)["text"]))
    return frozenset(w for w, n in counts.items() if n >= 2 and (len(w) > 1 or w in ("a", "i")))


def names_the_module(prompt: list[dict[str, str]], reply: str) -> float:
    asked = _MODULE.search(prompt[-1]["content"])
    if not asked:
        return 0.0
    return float(re.search(rf"\b{re.escape(asked.group(1))}\b", reply, re.IGNORECASE) is not None)


def describes_the_module(prompt: list[dict[str, str]], reply: str) -> float:
    text = reply.strip()
    tokens = text.split()
    if not tokens:
        return 0.0
    vocabulary = _vocabulary()
    words = sum(1 for t in tokens if (w := "".join(_WORD.findall(t)).lower()) and w in vocabulary)
    english = words / len(tokens) * min(len(tokens), 4) / 4
    sentence = text[0].isupper() and text.endswith(".")
    return round(0.4 * names_the_module(prompt, text) + 0.4 * english + 0.2 * sentence, 4)
