"""Tokenizer checks: models whose vocabularies differ are refused unless the recipe says how to resolve it.

- ``base`` (or a model's path): the output uses that model's tokenizer;
- ``union``: the base's (or first model's) tokenizer plus every token another model adds, appended.

Each model's embedding and lm_head rows are then permuted to the output vocabulary: the row of a token the
model has is its own; a token it lacks takes the row of the first model (base first) that has it, so the
model adds no task vector there. Rows beyond the vocabulary (padding) come from the tokenizer source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmctl.core.errors import ModelError, UsageError


@dataclass
class VocabMap:
    rows: int  # rows of the output embedding
    tokenizer: object  # the output tokenizer (transformers)
    source: str  # "base", "union" or a model path
    own: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # model -> [rows] its row per output row, or -1
    fallback: list[tuple[torch.Tensor, str, torch.Tensor]] = field(
        default_factory=list
    )  # (rows, model, src rows)

    def permute(self, model: str, tensor: torch.Tensor, others: dict[str, torch.Tensor]) -> torch.Tensor:
        """``tensor`` (model's rows first) rearranged to the output vocabulary ([rows, ...])."""
        own = self.own[model].to(tensor.device)
        out = tensor.new_zeros((self.rows, *tensor.shape[1:]))
        have = own >= 0
        out[have] = tensor[own[have]]
        for rows, donor, donor_rows in self.fallback:
            rows = rows.to(tensor.device)
            keep = ~have[rows]
            if keep.any() and donor in others:
                out[rows[keep]] = others[donor][donor_rows.to(tensor.device)[keep]]
        return out


def _load(path: str):
    from llmctl.core.models.hf import load_tokenizer

    return load_tokenizer(path)


def _same_tokenizer_files(model_paths: list[str]) -> bool:
    files = [Path(p) / "tokenizer.json" for p in model_paths]
    if not all(f.is_file() for f in files):
        return False
    first = files[0].read_bytes()
    return all(f.read_bytes() == first for f in files[1:])


def resolve_vocab(
    model_paths: list[str], embed_rows: dict[str, int], base: str | None, tokenizer_source: str | None
) -> VocabMap | None:
    """None when all models share one vocabulary (and embedding size) and no source is asked for."""
    if tokenizer_source is None and len(set(embed_rows.values())) <= 1 and _same_tokenizer_files(model_paths):
        return None  # identical tokenizer.json files: nothing to compare, and no need to load transformers
    tokenizers = {}
    for path in model_paths:
        try:
            tokenizers[path] = _load(path)
        except ModelError:
            tokenizers[path] = None
    vocabs = {p: t.get_vocab() for p, t in tokenizers.items() if t is not None}
    same_vocab = len({tuple(sorted(v.items())) for v in vocabs.values()}) <= 1
    same_rows = len(set(embed_rows.values())) <= 1
    if tokenizer_source is None:
        if same_vocab and same_rows:
            return None
        first = model_paths[0]
        other = next(
            p
            for p in model_paths[1:]
            if vocabs.get(p) != vocabs.get(first) or embed_rows.get(p) != embed_rows.get(first)
        )
        raise UsageError(
            f"the vocabularies differ: {first} has {len(vocabs.get(first, {}))} tokens "
            f"({embed_rows.get(first)} embedding rows), {other} has {len(vocabs.get(other, {}))} "
            f"({embed_rows.get(other)}); merging them would garble the output. Pass --tokenizer-source "
            "base|union|MODEL (tokenizer_source: in a recipe) to choose the output vocabulary"
        )
    missing = [p for p in model_paths if vocabs.get(p) is None]
    if missing:
        raise ModelError(f"--tokenizer-source needs every model's tokenizer; {missing[0]} has none")
    anchor = base or model_paths[0]
    if tokenizer_source == "base":
        source = anchor
    elif tokenizer_source == "union":
        source = anchor
    else:
        source = tokenizer_source
        if source not in vocabs:
            matches = [p for p in model_paths if Path(p).resolve() == Path(source).resolve()]
            if not matches:
                raise UsageError(
                    f"--tokenizer-source {source} is not one of the merged models (or base/union)"
                )
            source = matches[0]
    tokenizer = tokenizers[source]
    if tokenizer_source == "union":
        tokenizer = _load(source)  # a fresh copy to extend
        known = set(tokenizer.get_vocab())
        extra = []
        for path in model_paths:
            for token, _ in sorted(vocabs[path].items(), key=lambda kv: kv[1]):
                if token not in known:
                    known.add(token)
                    extra.append(token)
        if extra:
            from tokenizers import AddedToken

            tokenizer.add_tokens([AddedToken(t, normalized=False) for t in extra])
    target = tokenizer.get_vocab()  # token -> output row
    rows = max(
        len(tokenizer), embed_rows[source] if tokenizer_source != "union" else 0, max(target.values()) + 1
    )
    vmap = VocabMap(rows, tokenizer, tokenizer_source)
    tokens = sorted(target, key=target.get)
    order = [anchor, *[p for p in model_paths if p != anchor]]
    taken = torch.zeros(rows, dtype=torch.bool)
    for path in model_paths:
        own = torch.full((rows,), -1, dtype=torch.long)
        v = vocabs[path]
        for token in tokens:
            row = v.get(token)
            if row is not None and row < embed_rows[path]:
                own[target[token]] = row
        if path == source:  # padding rows past the vocabulary come from the tokenizer source
            n = min(rows, embed_rows[path])
            pad = torch.arange(n)[own[:n] < 0]
            pad = pad[~torch.isin(pad, torch.tensor(list(target.values())))]
            own[pad] = pad
        vmap.own[path] = own
    for path in order:
        own = vmap.own[path]
        rows_here = torch.nonzero((own >= 0) & ~taken).flatten()
        if rows_here.numel():
            vmap.fallback.append((rows_here, path, own[rows_here]))
            taken[rows_here] = True
    return vmap
