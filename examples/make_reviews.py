"""Short product and film reviews with a sentiment label (positive / negative / neutral), generated from
word lists with a fixed seed: a small, learnable labelled set for the classification tests and demo.

    python examples/make_reviews.py [--n 900] [--seed 0] > examples/classify/reviews.jsonl

A review's label follows from its opinion words; the rest (subjects, fillers, order) varies at random,
so a classifier has to find the words that matter.
"""

from __future__ import annotations

import argparse
import json
import random
import sys

SUBJECTS = [
    "the film",
    "this phone",
    "the hotel",
    "our dinner",
    "the concert",
    "this book",
    "the service",
    "the new album",
    "the laptop",
    "this game",
    "the tour",
    "the coffee",
    "the museum",
    "the sequel",
]
POSITIVE = [
    "wonderful",
    "excellent",
    "superb",
    "delightful",
    "brilliant",
    "lovely",
    "fantastic",
    "great",
    "charming",
    "impressive",
]
NEGATIVE = [
    "awful",
    "terrible",
    "dull",
    "disappointing",
    "horrible",
    "boring",
    "broken",
    "mediocre",
    "annoying",
    "dreadful",
]
NEUTRAL = [
    "arrived on tuesday",
    "was described in the brochure",
    "costs twenty euros",
    "is on the second floor",
    "lasted two hours",
    "comes in blue and grey",
    "was reviewed last week",
    "opens at nine",
]
FILLERS = [
    "honestly",
    "we thought",
    "overall",
    "i must say",
    "to be fair",
    "in the end",
    "my friend said",
    "as expected",
    "this time",
    "again",
]
LABELS = ["negative", "neutral", "positive"]


def review(rng: random.Random, label: str) -> str:
    subject = rng.choice(SUBJECTS)
    filler = rng.choice(FILLERS)
    if label == "neutral":
        body = f"{subject} {rng.choice(NEUTRAL)}"
    else:
        words = POSITIVE if label == "positive" else NEGATIVE
        a, b = rng.sample(words, 2)
        body = rng.choice(
            [f"{subject} was {a} and {b}", f"{a} {subject.split(' ', 1)[1]}, really {b}", f"{subject} felt {a}"]
        )
    parts = [filler, body] if rng.random() < 0.5 else [body, filler]
    return (", ".join(parts) + rng.choice([".", "!", "."])).capitalize()


def reviews(n: int = 900, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        out.append({"id": f"review-{i}", "text": review(rng, label), "label": label})
    rng.shuffle(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=900)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for r in reviews(args.n, args.seed):
        sys.stdout.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
