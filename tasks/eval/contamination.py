"""Contamination: word n-gram overlap between training documents and evaluation items.

The GPT-3 report (Brown et al. 2020, appendix C) and the Llama reports call an evaluation item dirty when
it shares a 13-gram with the training data. Here a text is its lower-cased words (runs of letters and
digits, so punctuation and spacing do not matter); an item shares an n-gram with a document when n
consecutive words of the item appear, in order, in the document. An item shorter than n words is dirty
only when all of its words appear in a document, in order (its whole text is its one n-gram).

The same index serves the eval stage (a report per task: how many items a corpus contaminates) and the
clean stage (drop a training document that contains an item's n-gram: `decontaminate:<task>`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

_WORD = re.compile(r"[^\W_]+")  # letters and digits: a blank (`_`) or punctuation is no word


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass
class Match:
    task: str
    item: int
    ngram: str


@dataclass
class NgramIndex:
    """The n-grams of every item of every task: n-gram -> the (task, item) pairs that contain it."""

    n: int = 13
    tasks: list[str] = field(default_factory=list)
    items: list[int] = field(default_factory=list)  # items per task
    _grams: dict[tuple[str, ...], list[tuple[int, int]]] = field(default_factory=dict)
    _short: set[int] = field(default_factory=set)  # word counts of items shorter than n

    def add_task(self, name: str, texts: list[str]) -> None:
        t = len(self.tasks)
        self.tasks.append(name)
        self.items.append(len(texts))
        for i, text in enumerate(texts):
            w = words(text)
            if not w:
                continue
            if len(w) < self.n:
                self._short.add(len(w))
                grams = [tuple(w)]
            else:
                grams = list(dict.fromkeys(tuple(w[j : j + self.n]) for j in range(len(w) - self.n + 1)))
            for g in grams:
                self._grams.setdefault(g, []).append((t, i))

    def matches(self, text: str) -> Iterator[Match]:
        """Every (task, item) a text shares an n-gram with, each once, in the text's order."""
        w = words(text)
        seen: set[tuple[int, int]] = set()
        for size in (self.n, *sorted(self._short)):
            for j in range(len(w) - size + 1):
                owners = self._grams.get(tuple(w[j : j + size]))
                if not owners:
                    continue
                for owner in owners:
                    if owner not in seen:
                        seen.add(owner)
                        yield Match(self.tasks[owner[0]], owner[1], " ".join(w[j : j + size]))

    def first_match(self, text: str) -> Match | None:
        return next(self.matches(text), None)


@dataclass
class Overlap:
    """What a corpus does to one task: how many of its items share an n-gram with some document."""

    task: str
    items: int
    contaminated: set[int] = field(default_factory=set)
    documents: int = 0  # documents that contain an n-gram of this task
    example: dict[str, Any] | None = None

    @property
    def fraction(self) -> float:
        return len(self.contaminated) / self.items if self.items else 0.0


def overlap_report(index: NgramIndex, texts: Iterator[tuple[str, str]]) -> tuple[list[Overlap], int]:
    """Per task, the items that the documents (id, text) contaminate; and how many documents were read."""
    found = {t: Overlap(t, n) for t, n in zip(index.tasks, index.items)}
    read = 0
    for doc_id, text in texts:
        read += 1
        hit_tasks = set()
        for m in index.matches(text):
            o = found[m.task]
            o.contaminated.add(m.item)
            if m.task not in hit_tasks:
                hit_tasks.add(m.task)
                o.documents += 1
            if o.example is None:
                o.example = {"document": doc_id, "item": m.item, "ngram": m.ngram}
    return [found[t] for t in index.tasks], read


# --------------------------------------------------------------------------------------------------
# indexes of configured tasks, built once per process


_INDEXES: dict[str, NgramIndex] = {}
_LOCK = threading.Lock()


def index_for(specs: list[str], n: int) -> tuple[NgramIndex, dict[str, str]]:
    """The n-gram index of the tasks' evaluation items (read with lm_eval, as the eval stage reads them),
    and the tasks that could not be read, with why. Cached per process by the tasks' identity."""
    import hashlib
    import json

    from tasks.eval.harness import TaskError, build_task, item_texts, task_identity, task_name_of

    key = hashlib.sha256(json.dumps([n, [task_identity(s) for s in specs]], sort_keys=True).encode()).hexdigest()
    with _LOCK:
        if key in _INDEXES:
            return _INDEXES[key], {}
    index = NgramIndex(n)
    failed: dict[str, str] = {}
    for spec in specs:
        try:
            built = build_task(spec, shots=0)
        except TaskError as e:
            failed[task_name_of(spec) or spec] = e.detail
            continue
        except KeyError:
            failed[spec] = "not a registered lm_eval task, group or tag"
            continue
        index.add_task(built.name, [text for leaf in built.leaves for text in item_texts(leaf)])  # a group as one
    with _LOCK:
        if not failed:
            _INDEXES[key] = index
    return index, failed
