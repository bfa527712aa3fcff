"""``llmctl tokenize-train``: train a BPE, WordPiece or Unigram tokenizer on a corpus.

Two engines, one set of options (:class:`TrainOptions`):

- ``hf`` (default): Hugging Face ``tokenizers``' trainers, configured from the options (Rust speed).
- ``reference``: the readable trainers in this package (:mod:`.bpe`, :mod:`.wordpiece`, :mod:`.unigram`),
  fed the word counts of :mod:`.pretokenize`'s Python splitters. BPE and WordPiece learn exactly what HF
  learns; Unigram is a simpler (Viterbi-EM) variant with comparable compression.

Both end in the same ``tokenizers.Tokenizer`` (model, pre-tokenizer, decoder, special tokens), saved as
``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` through transformers, so
``tokenizers.Tokenizer.from_file``, ``AutoTokenizer.from_pretrained`` and ``llmctl init --vocab-from``
load it.

The corpus streams: word counting holds one entry per distinct word, not the corpus. One record in
``HOLDOUT_EVERY`` (up to ``HOLDOUT_MAX``) is held out of training to measure compression; ``sample_lines``
keeps a uniform sample of that many records (reservoir sampling, seeded), like ``spm_train
--input_sentence_size``. When the alphabet must be known before training (``character_coverage`` < 1, or
WordPiece), the training texts are spooled to a temporary file and read twice.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.core.errors import InputDataError, UsageError
from llmctl.core.io import ReadStats, read_records
from llmctl.core.models.tokenizers import CHATML_TEMPLATE
from llmctl.core.tokenize.pretokenize import (
    PRE_TOKENIZERS,
    check_pre_tokenizer,
    hf_pre_tokenizer,
    python_splitter,
)

ALGORITHMS = ("bpe", "wordpiece", "unigram")
ENGINES = ("hf", "reference")
HOLDOUT_EVERY = 100  # record i is held out when i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
HOLDOUT_MAX = 1000
EVAL_FALLBACK = 1000  # corpora too small for a hold-out are measured on their first records
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]  # SentencePiece's byte-fallback pieces
DEFAULT_PRE_TOKENIZER = {"bpe": "gpt2", "wordpiece": "whitespace", "unigram": "metaspace"}
UNK = {"bpe": "<unk>", "wordpiece": "[UNK]", "unigram": "<unk>"}
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]


@dataclass
class TrainOptions:
    algo: str = "bpe"
    vocab_size: int = 8192  # all tokens: special, byte-fallback, alphabet and learned
    pre_tokenizer: str | None = None  # None: gpt2 for bpe, whitespace for wordpiece, metaspace for unigram
    byte_level: bool | None = None  # None: on for bpe (unless byte_fallback), off otherwise
    byte_fallback: bool = False  # unknown characters become <0xXX> byte tokens (not with byte_level)
    special_tokens: list[str] = field(default_factory=lambda: ["<|endoftext|>"])
    min_frequency: int = 0  # pairs seen fewer times are not merged (bpe, wordpiece)
    character_coverage: float = 1.0  # keep the most frequent characters covering this share of the text
    sample_lines: int | None = None
    chat_template: str | None = None  # "chatml", or the path of a Jinja template file
    engine: str = "hf"
    seed: int = 0
    max_piece_length: int = 16  # unigram

    def resolved(self) -> TrainOptions:
        """Defaults filled in and every combination checked (UsageError, exit 2, before any reading)."""
        o = TrainOptions(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        if o.algo not in ALGORITHMS:
            raise UsageError(f"unknown --algo {o.algo!r}; choose one of {', '.join(ALGORITHMS)}")
        if o.engine not in ENGINES:
            raise UsageError(f"unknown --engine {o.engine!r}; choose one of {', '.join(ENGINES)}")
        o.pre_tokenizer = check_pre_tokenizer(o.pre_tokenizer or DEFAULT_PRE_TOKENIZER[o.algo])
        if o.byte_level is None:
            o.byte_level = o.algo == "bpe" and not o.byte_fallback
        if o.byte_level and o.byte_fallback:
            raise UsageError("--byte-fallback is for character-level vocabularies; drop --byte-level")
        if o.algo == "wordpiece" and (o.byte_fallback or o.byte_level):
            raise UsageError(
                "wordpiece is character-level: drop --byte-level/--byte-fallback, or use bpe/unigram"
            )
        if not 0.0 < o.character_coverage <= 1.0:
            raise UsageError("--character-coverage must be in (0, 1]")
        if o.byte_level and o.character_coverage < 1.0:
            raise UsageError("--character-coverage needs a character-level vocabulary; add --no-byte-level")
        if o.vocab_size < 1:
            raise UsageError("--vocab-size must be positive")
        if o.min_frequency < 0:
            raise UsageError("--min-frequency must be 0 or more")
        if o.sample_lines is not None and o.sample_lines < 1:
            raise UsageError("--sample-lines must be positive")
        specials = [t for t in o.special_tokens if t]
        if o.chat_template == "chatml":
            specials += [t for t in CHATML_TOKENS if t not in specials]
        if self.needs_unk(o):
            specials = [UNK[o.algo]] + [t for t in specials if t != UNK[o.algo]]
        o.special_tokens = list(dict.fromkeys(specials))
        floor = len(o.special_tokens) + (256 if o.byte_level or o.byte_fallback else 0)
        if o.vocab_size < floor + 1:
            raise UsageError(
                f"--vocab-size {o.vocab_size} leaves no room to learn: {len(o.special_tokens)} special tokens"
                + (" + 256 bytes" if o.byte_level or o.byte_fallback else "")
                + f" already take {floor}"
            )
        return o

    @staticmethod
    def needs_unk(o: TrainOptions) -> bool:
        return o.algo in ("wordpiece", "unigram") or (
            o.algo == "bpe" and not o.byte_level and not o.byte_fallback
        )

    @property
    def unk_token(self) -> str | None:
        return UNK[self.algo] if self.needs_unk(self) else None

    @property
    def bytes_reserved(self) -> int:
        return 256 if self.byte_fallback else 0


# -- the corpus ------------------------------------------------------------------------------------------


@dataclass
class CorpusStats:
    records: int = 0  # read, held-out included
    training_records: int = 0
    training_bytes: int = 0


class Corpus:
    """The texts of several inputs, split into training texts and a held-out sample."""

    def __init__(
        self,
        inputs: list[str],
        *,
        text_field: str = "text",
        skip_bad_lines: bool = False,
        whole_file: bool = False,
        sample_lines: int | None = None,
        seed: int = 0,
        read_stats: ReadStats | None = None,
    ) -> None:
        self.inputs = inputs
        self.text_field = text_field
        self.skip_bad_lines = skip_bad_lines
        self.whole_file = whole_file
        self.sample_lines = sample_lines
        self.seed = seed
        self.read_stats = read_stats if read_stats is not None else ReadStats()
        self.stats = CorpusStats()
        self.heldout: list[str] = []
        self.head: list[str] = []  # the first training texts: measured when nothing was held out

    def _records(self) -> Iterator[str]:
        for path in self.inputs:
            for record in read_records(
                path,
                text_field=self.text_field,
                skip_bad_lines=self.skip_bad_lines,
                whole_file=self.whole_file,
                stats=self.read_stats,
            ):
                yield record.text

    def _split(self) -> Iterator[str]:
        """Training texts, in order; the held-out ones are set aside as they pass."""
        for i, text in enumerate(self._records()):
            self.stats.records += 1
            if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 and len(self.heldout) < HOLDOUT_MAX:
                self.heldout.append(text)
                continue
            yield text

    def training_texts(self) -> Iterator[str]:
        """Stream the training texts (one pass over the inputs), sampled when ``sample_lines`` is set."""
        source = self._split()
        if self.sample_lines is not None:
            source = iter(_reservoir(source, self.sample_lines, self.seed))
        for text in source:
            self.stats.training_records += 1
            self.stats.training_bytes += len(text.encode("utf-8"))
            if len(self.head) < EVAL_FALLBACK:
                self.head.append(text)
            yield text

    @property
    def eval_texts(self) -> tuple[list[str], str]:
        return (self.heldout, "heldout") if self.heldout else (self.head, "training")


def _reservoir(texts: Iterator[str], k: int, seed: int) -> list[str]:
    """A uniform sample of ``k`` texts (algorithm R), kept in input order; all of them when fewer."""
    rng = random.Random(seed)
    sample: list[tuple[int, str]] = []
    for i, text in enumerate(texts):
        if i < k:
            sample.append((i, text))
        else:
            j = rng.randint(0, i)
            if j < k:
                sample[j] = (i, text)
    return [t for _, t in sorted(sample)]


class Spool:
    """Training texts written once to a temporary file, so that they can be read again (JSON per line)."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(mode="w+", encoding="utf-8", prefix="llmctl-spool-")

    def write_all(self, texts: Iterator[str], each: Callable[[str], None]) -> None:
        for text in texts:
            each(text)
            self._file.write(json.dumps(text, ensure_ascii=False) + "\n")
        self._file.flush()

    def __iter__(self) -> Iterator[str]:
        self._file.seek(0)
        for line in self._file:
            yield json.loads(line)

    def close(self) -> None:
        self._file.close()


def alphabet_for_coverage(char_counts: Counter, coverage: float, always: set[str] = frozenset()) -> list[str]:
    """The most frequent characters (ties: smaller code point first) covering ``coverage`` of all."""
    total = sum(char_counts.values())
    kept: list[str] = []
    covered = 0
    for ch, n in sorted(char_counts.items(), key=lambda kv: (-kv[1], ord(kv[0]))):
        if kept and covered >= coverage * total:
            break
        kept.append(ch)
        covered += n
    return sorted(set(kept) | set(always), key=ord)


# -- training --------------------------------------------------------------------------------------------


def train_tokenizer(corpus: Corpus, options: TrainOptions):
    """Train on ``corpus``; return ``(tokenizers.Tokenizer, summary dict)``. ``options`` must be resolved."""
    o = options
    split = python_splitter(o.pre_tokenizer, byte_level=o.byte_level)
    need_alphabet = not o.byte_level and (o.character_coverage < 1.0 or o.algo == "wordpiece")
    started = time.perf_counter()
    alphabet: list[str] | None = None
    word_counts: Counter | None = None
    spool: Spool | None = None
    try:
        texts: Any = corpus.training_texts()
        if o.engine == "reference" or need_alphabet:
            # One pass: words (and their characters) counted; texts kept for HF when it needs a second pass.
            word_counts = Counter()
            if o.engine == "hf":
                spool = Spool()
                spool.write_all(texts, lambda t: word_counts.update(split(t)))
                texts = spool
            else:
                for text in texts:
                    word_counts.update(split(text))
            if need_alphabet:
                chars: Counter = Counter()
                for word, n in word_counts.items():
                    for ch in word:
                        chars[ch] += n
                alphabet = alphabet_for_coverage(chars, o.character_coverage)
                if o.algo == "unigram":
                    # Unigram has no alphabet limit of its own: characters outside the coverage are left out
                    # of training (SentencePiece treats them as unknown), and become <unk> or bytes later.
                    texts, word_counts = _without_rare(texts, word_counts, set(alphabet))
        if o.engine == "hf":
            tokenizer = _train_hf(texts, o, alphabet, corpus)
        else:
            tokenizer = _train_reference(word_counts or Counter(), o, alphabet)
    finally:
        if spool is not None:
            spool.close()
    seconds = time.perf_counter() - started
    if corpus.stats.training_records == 0:
        raise InputDataError(f"empty corpus: no text to train on in {', '.join(corpus.inputs)}")
    if word_counts is not None and not word_counts:
        raise InputDataError("the corpus has no words for the tokenizer to learn from")
    _check_alphabet_fits(tokenizer, o)
    summary = {
        "algo": o.algo,
        "engine": o.engine,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "requested_vocab_size": o.vocab_size,
        "pre_tokenizer": o.pre_tokenizer,
        "byte_level": o.byte_level,
        "byte_fallback": o.byte_fallback,
        "special_tokens": o.special_tokens,
        "training_records": corpus.stats.training_records,
        "training_bytes": corpus.stats.training_bytes,
        "skipped_lines": corpus.read_stats.skipped,
        "train_seconds": round(seconds, 3),
    }
    if alphabet is not None:
        summary["alphabet_size"] = len(alphabet)
    texts_eval, kind = corpus.eval_texts
    summary.update(evaluate(tokenizer, texts_eval, unk_token=o.unk_token))
    summary["eval_on"] = kind
    return tokenizer, summary


def _without_rare(texts, word_counts: Counter, keep: set[str]):
    def drop(text: str) -> str:
        return "".join(ch for ch in text if ch in keep or ch.isspace())

    filtered: Counter = Counter()
    for word, n in word_counts.items():
        if w := drop(word):
            filtered[w] += n
    return (drop(t) for t in texts), filtered


def _check_alphabet_fits(tokenizer, o: TrainOptions) -> None:
    """HF silently returns a vocabulary larger than asked when the alphabet alone does not fit."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > o.vocab_size:
        raise UsageError(
            f"--vocab-size {o.vocab_size} is smaller than the alphabet plus special tokens ({size} tokens); "
            "raise --vocab-size, or lower --character-coverage"
        )


def _hf_model_and_trainer(o: TrainOptions, alphabet: list[str] | None):
    from tokenizers import models, pre_tokenizers, trainers

    target = o.vocab_size - o.bytes_reserved
    if o.byte_level:
        initial, limit = pre_tokenizers.ByteLevel.alphabet(), None
    elif alphabet is not None:
        initial, limit = alphabet, len(alphabet)
    else:
        initial, limit = [], None
    common: dict[str, Any] = {"vocab_size": target, "show_progress": False, "initial_alphabet": initial}
    if limit is not None and o.algo != "unigram":
        common["limit_alphabet"] = limit
    if o.algo == "bpe":
        model = models.BPE(unk_token=o.unk_token, byte_fallback=o.byte_fallback)
        trainer = trainers.BpeTrainer(
            **common, special_tokens=o.special_tokens, min_frequency=o.min_frequency
        )
    elif o.algo == "wordpiece":
        from llmctl.core.tokenize.wordpiece import seed_tokens

        model = models.WordPiece(unk_token=o.unk_token)
        trainer = trainers.WordPieceTrainer(
            **common,
            special_tokens=o.special_tokens + seed_tokens(alphabet or []),
            min_frequency=o.min_frequency,
        )
    else:
        model = models.Unigram()
        trainer = trainers.UnigramTrainer(
            **common,
            special_tokens=o.special_tokens,
            unk_token=o.unk_token,
            max_piece_length=o.max_piece_length,
        )
    return model, trainer


def _train_hf(texts, o: TrainOptions, alphabet: list[str] | None, corpus: Corpus):
    from tokenizers import Tokenizer

    model, trainer = _hf_model_and_trainer(o, alphabet)
    tok = Tokenizer(model)
    tok.pre_tokenizer = hf_pre_tokenizer(o.pre_tokenizer, byte_level=o.byte_level)
    failure: list[BaseException] = []

    def guarded() -> Iterator[str]:
        # An input error raised inside the Rust trainer's iteration would lose its type: keep it.
        try:
            yield from texts
        except BaseException as e:
            failure.append(e)

    try:
        tok.train_from_iterator(guarded(), trainer)
    except Exception as e:
        if "not large enough" in str(e):
            raise UsageError(f"--vocab-size {o.vocab_size} is smaller than the alphabet: {e}") from e
        raise
    if failure:
        raise failure[0]
    trained = json.loads(tok.to_str())["model"]
    if o.algo == "bpe":
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in trained["merges"]]
        return build_tokenizer(o, vocab=trained["vocab"], merges=merges)
    if o.algo == "wordpiece":
        return build_tokenizer(o, vocab=trained["vocab"])
    k = len(o.special_tokens)
    return build_tokenizer(o, pieces=canonical_unigram_pieces([tuple(p) for p in trained["vocab"]], k))


def canonical_unigram_pieces(pieces: list[tuple[str, float]], k: int) -> list[tuple[str, float]]:
    """HF's UnigramTrainer output made the same from run to run (the special tokens stay first).

    Its scores vary in the last bits (parallel sums): they are rounded to 10 significant digits. The
    pieces it appends at the end with scores ``min - 1e-4 * i`` (required characters, and pieces tied
    with them) come in hash-set order: they get the same scores, in sorted order. Then pieces are sorted
    by score, ties by piece.
    """
    rest = sorted(((p, float(f"{s:.10g}")) for p, s in pieces[k:]), key=lambda p: (-p[1], p[0]))
    start = len(rest) - 1  # the tail is rest[start:]
    while start > 0 and _penalty_step(rest[start - 1][1] - rest[start][1]):
        start -= 1
    if len(rest) - start > 1:
        tail = sorted(p for p, _ in rest[start:])
        rest[start:] = list(zip(tail, [s for _, s in rest[start:]], strict=True))
    return pieces[:k] + rest


def _penalty_step(diff: float) -> bool:
    return abs(diff) < 1e-7 or abs(diff - 1e-4) < 1e-7


def _train_reference(word_counts: Counter, o: TrainOptions, alphabet: list[str] | None):
    from tokenizers import pre_tokenizers

    target = o.vocab_size - o.bytes_reserved
    if o.algo == "bpe":
        from llmctl.core.tokenize.bpe import train_bpe

        initial = pre_tokenizers.ByteLevel.alphabet() if o.byte_level else (alphabet or [])
        result = train_bpe(
            word_counts,
            target,
            special_tokens=o.special_tokens,
            initial_alphabet=initial,
            limit_alphabet=len(alphabet) if alphabet is not None else None,
            min_frequency=o.min_frequency,
        )
        return build_tokenizer(o, vocab=result.vocab, merges=result.merges)
    if o.algo == "wordpiece":
        from llmctl.core.tokenize.wordpiece import train_wordpiece

        vocab = train_wordpiece(
            word_counts, target, special_tokens=o.special_tokens, alphabet=alphabet or [],
            min_frequency=o.min_frequency,
        )  # fmt: skip
        return build_tokenizer(o, vocab=vocab)
    from llmctl.core.tokenize.unigram import train_unigram

    if alphabet is None and o.byte_level:
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    pieces = train_unigram(
        word_counts, target, special_tokens=o.special_tokens, alphabet=alphabet or [],
        max_piece_length=o.max_piece_length,
    )  # fmt: skip
    return build_tokenizer(o, pieces=pieces)


# -- the tokenizer ---------------------------------------------------------------------------------------


def _with_bytes(tokens: list[str], k: int) -> list[str]:
    """Insert the 256 byte tokens after the ``k`` special tokens (SentencePiece's order)."""
    rest = [t for t in tokens[k:] if t not in set(BYTE_TOKENS)]
    return tokens[:k] + BYTE_TOKENS + rest


def build_tokenizer(
    o: TrainOptions,
    *,
    vocab: dict[str, int] | None = None,
    merges: list[tuple[str, str]] | None = None,
    pieces: list[tuple[str, float]] | None = None,
):
    """A ``tokenizers.Tokenizer`` from a trained vocabulary, with the pre-tokenizer, decoder and specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    k = len(o.special_tokens)
    if o.algo == "unigram":
        assert pieces is not None
        if o.byte_fallback:
            scores = dict(pieces)
            order = _with_bytes([p for p, _ in pieces], k)
            pieces = [(p, scores.get(p, 0.0)) for p in order]
        unk_id = [p for p, _ in pieces].index(o.unk_token)
        model = models.Unigram(pieces, unk_id=unk_id, byte_fallback=o.byte_fallback)
    else:
        assert vocab is not None
        tokens = sorted(vocab, key=vocab.__getitem__)
        if o.byte_fallback:
            tokens = _with_bytes(tokens, k)
        vocab = {t: i for i, t in enumerate(tokens)}
        if o.algo == "bpe":
            model = models.BPE(
                vocab,
                list(merges or []),
                unk_token=o.unk_token,
                byte_fallback=o.byte_fallback,
                fuse_unk=False,
            )
        else:
            model = models.WordPiece(vocab, unk_token=o.unk_token, continuing_subword_prefix="##")
    tok = Tokenizer(model)
    tok.pre_tokenizer = hf_pre_tokenizer(o.pre_tokenizer, byte_level=o.byte_level)
    tok.decoder = _decoder(o, decoders)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in o.special_tokens])
    return tok


def _decoder(o: TrainOptions, decoders):
    if o.byte_level and o.pre_tokenizer == "metaspace":
        return decoders.Sequence(
            [decoders.ByteLevel(), decoders.Replace("\u2581", " "), decoders.Strip(" ", 1, 0)]
        )
    if o.byte_level:
        return decoders.ByteLevel()
    if o.algo == "wordpiece":
        return decoders.WordPiece(prefix="##", cleanup=False)
    if o.pre_tokenizer == "metaspace":
        # Llama/SentencePiece's decoder: "▁" back to spaces, bytes joined into characters, and the space
        # the pre-tokenizer put in front removed. (HF's Metaspace decoder after Fuse would drop them all.)
        steps = [decoders.Replace("\u2581", " ")]
        if o.byte_fallback:
            steps.append(decoders.ByteFallback())
        return decoders.Sequence([*steps, decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    if o.byte_fallback:
        return decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    if o.pre_tokenizer == "whitespace":
        return None  # the spaces are gone: pieces are joined with one space
    return decoders.Fuse()  # the words kept their spaces: concatenate the pieces


def evaluate(tokenizer, texts: list[str], *, unk_token: str | None = None) -> dict[str, Any]:
    """Compression on ``texts``: bytes/token, tokens/word (fertility), share of unknown tokens."""
    if not texts:
        return {"eval_records": 0, "bytes_per_token": None, "tokens_per_word": None, "unk_rate": None}
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    tokens = sum(len(e.ids) for e in encodings)
    unk_id = tokenizer.token_to_id(unk_token) if unk_token else None
    unks = sum(e.ids.count(unk_id) for e in encodings) if unk_id is not None else 0
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    words = sum(len(t.split()) for t in texts)
    return {
        "eval_records": len(texts),
        "bytes_per_token": round(nbytes / tokens, 4) if tokens else None,
        "tokens_per_word": round(tokens / words, 4) if words else None,
        "unk_rate": round(unks / tokens, 6) if tokens else 0.0,
    }


def chat_template_text(value: str | None) -> str | None:
    """``chatml`` or a template file's text."""
    if value is None:
        return None
    if value == "chatml":
        return CHATML_TEMPLATE
    path = Path(value).expanduser()
    if not path.is_file():
        raise UsageError(f"--chat-template: no such file {value!r} (or use 'chatml')")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--chat-template: cannot read {value}: {e}") from e


def save_tokenizer(tokenizer, directory: Path, o: TrainOptions, chat_template: str | None = None) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json (transformers' layout)."""
    from transformers import PreTrainedTokenizerFast

    specials = o.special_tokens
    eos = "<|im_end|>" if o.chat_template == "chatml" else _first(specials, "<|endoftext|>", "</s>", "[SEP]")
    bos = _first(specials, "<|endoftext|>", "<s>", "[CLS]") or eos
    kwargs: dict[str, Any] = {"tokenizer_object": tokenizer}
    if eos:
        kwargs["eos_token"] = eos
    if bos:
        kwargs["bos_token"] = bos
    if o.unk_token:
        kwargs["unk_token"] = o.unk_token
    for name, token in (("pad_token", "[PAD]"), ("pad_token", "<pad>"), ("mask_token", "[MASK]")):
        if token in specials:
            kwargs[name] = token
    fast = PreTrainedTokenizerFast(**kwargs)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(directory))
    # transformers 5 no longer writes special_tokens_map.json; older readers and other tools look for it.
    token_map = {k: v for k, v in kwargs.items() if k.endswith("_token")}
    (Path(directory) / "special_tokens_map.json").write_text(
        json.dumps(token_map, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def _first(specials: list[str], *candidates: str) -> str | None:
    for c in candidates:
        if c in specials:
            return c
    others = [t for t in specials if t not in UNK.values()]
    return others[0] if others else None


__all__ = [
    "ALGORITHMS",
    "ENGINES",
    "PRE_TOKENIZERS",
    "Corpus",
    "TrainOptions",
    "build_tokenizer",
    "chat_template_text",
    "evaluate",
    "save_tokenizer",
    "train_tokenizer",
]
