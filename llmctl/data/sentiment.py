"""The built-in sentiment data set (`builtin:sentiment`): labelled review sentences whose label depends
on word order, generated here from a seed and shipped as `llmctl/data/sentiment.csv` (columns text,label).

Every sentence is two clauses joined by a contrasting connective (but, yet, though, although, whereas):

    the plot was good but the acting was not great          -> negative
    honestly the music felt not bad, yet the ending was dull  -> negative
    the cast is terrible though the story was really excellent overall -> positive

The rule: the label is the polarity of the LAST clause's adjective, flipped when the word "not" comes
immediately before that adjective. The first clause always says the opposite of the last one (that is
what the connective contrasts), and each clause's adjective polarity and "not" are drawn so that the
sentence's bag of words is independent of the label: the last clause's (adjective polarity, "not")
is uniform over its four combinations, and the first clause's pair is uniform over the two combinations
of the opposite sentiment. Either way a sentence holds the same counts of positive adjectives, negative
adjectives and "not"s with the same probabilities, so a model of unigram counts (bag of words) stays at
chance while a model that reads the words in order can learn the rule exactly. Subjects, verbs,
adverbs, openers and closers are fillers drawn independently of the label.

Regenerate the shipped file (the unit tests check it equals this generator's output):

    python -m llmctl.data.sentiment --rows 6000 --seed 0 -o llmctl/data/sentiment.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import random
from pathlib import Path

LABELS = ("negative", "positive")
POSITIVE = ("good", "great", "excellent", "wonderful", "brilliant", "superb", "lovely", "fantastic", "solid",
            "enjoyable")
NEGATIVE = ("bad", "terrible", "awful", "boring", "dull", "weak", "poor", "clumsy", "forgettable", "messy")
SUBJECTS = ("plot", "acting", "music", "ending", "story", "dialogue", "cast", "pacing", "soundtrack", "script",
            "direction", "camera work", "humour", "lead actor", "villain", "first half", "finale", "set design")
VERBS = ("was", "is", "felt", "seemed", "looked")
ADVERBS = ("", "", "", "really", "quite", "rather", "truly")  # before "not"/the adjective; often none
CONNECTIVES = ("but", "yet", "though", "although", "whereas")
OPENERS = ("", "", "", "honestly", "overall", "i thought", "to be fair", "in my view")
CLOSERS = ("", "", "", "overall", "to me", "in the end", "if you ask me")

PATH = Path(__file__).with_name("sentiment.csv")


def _clause(rng: random.Random, positive: bool, negated: bool) -> str:
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    words = ["the", rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(ADVERBS), "not" if negated else "", adjective]
    return " ".join(w for w in words if w)


def sentence(rng: random.Random) -> tuple[str, str]:
    """One (text, label) pair: see the module docstring for the rule."""
    last_positive, last_negated = rng.random() < 0.5, rng.random() < 0.5
    label = last_positive != last_negated  # True: positive
    first_negated = rng.random() < 0.5
    first_positive = (not label) != first_negated  # the first clause says the opposite
    first = _clause(rng, first_positive, first_negated)
    last = _clause(rng, last_positive, last_negated)
    comma = rng.choice(("", ","))
    words = [rng.choice(OPENERS), first + comma, rng.choice(CONNECTIVES), last, rng.choice(CLOSERS)]
    return " ".join(w for w in words if w), LABELS[label]


def generate(rows: int, seed: int = 0) -> list[tuple[str, str]]:
    """`rows` distinct (text, label) pairs, the same for the same seed on every machine."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < rows:
        text, label = sentence(rng)
        if text not in seen:  # a duplicate could land in both train and val
            seen.add(text)
            out.append((text, label))
    return out


def to_csv(pairs: list[tuple[str, str]]) -> str:
    """The CSV text of `pairs`: a text,label header, one row per pair, "\\n" line ends."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows(pairs)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the built-in word-order sentiment data set as CSV.")
    parser.add_argument("--rows", type=int, default=6000, help="Sentences to generate (default 6000).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed (default 0).")
    parser.add_argument("-o", "--output", type=Path, default=PATH, help=f"CSV file to write (default {PATH}).")
    args = parser.parse_args(argv)
    args.output.write_text(to_csv(generate(args.rows, args.seed)), encoding="utf-8", newline="")
    print(f"{args.output}: {args.rows} rows")


if __name__ == "__main__":
    main()
