"""Decontamination finds every planted evaluation passage in the training data, and nothing else."""

from __future__ import annotations

import random

from llmctl.core.dedup import DecontamStats, build_eval_grams, decontaminate
from llmctl.core.io import Record


def test_every_planted_eval_passage_is_found_and_nothing_else():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    evals = [" ".join(rng.choices(vocab, k=30)) for _ in range(20)] + ["Short question?"]
    train = [" ".join(rng.choices(vocab, k=200)) for _ in range(300)]
    planted = {}  # training index -> eval item (1-based line)
    for t in rng.sample(range(300), 25):
        e = rng.randrange(len(evals))
        words = evals[e].split()
        start = rng.randrange(0, len(words) - 13 + 1) if len(words) >= 13 else 0
        passage = " ".join(words[start : start + 13])
        if e == len(evals) - 1:
            passage = "SHORT, question!"  # case and punctuation do not hide it
        body = train[t].split()
        cut = rng.randrange(len(body))
        train[t] = " ".join(body[:cut] + [passage] + body[cut:])
        planted[t] = f"eval.jsonl:{e + 1}"
    table = build_eval_grams((Record({}, "eval.jsonl", i + 1, t) for i, t in enumerate(evals)), 13)
    stats = DecontamStats()
    out = list(
        decontaminate(
            (Record({"i": i}, "train.jsonl", i + 1, t) for i, t in enumerate(train)),
            table,
            mark=True,
            stats=stats,
        )
    )
    found = {r["i"]: r["contaminated_by"] for r in out if r["contaminated_by"]}
    assert found == {t: [e] for t, e in planted.items()}
    assert stats.contaminated == 25 and set(stats.eval_items_hit) == set(planted.values())
    kept = list(decontaminate((Record({"i": i}, "t", i, t) for i, t in enumerate(train)), table, mark=False,
                              stats=DecontamStats()))  # fmt: skip
    assert len(kept) == 300 - 25


def test_twelve_shared_words_are_not_a_thirteen_gram():
    table = build_eval_grams([Record({}, "e", 1, " ".join(f"e{i}" for i in range(20)))], 13)
    assert table.hits(" ".join(f"e{i}" for i in range(12))) == []
    assert table.hits("x " + " ".join(f"e{i}" for i in range(3, 16)) + " y") == ["e:1"]
