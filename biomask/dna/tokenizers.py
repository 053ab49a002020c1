"""DNA tokenizers behind one interface, each saved as a Hugging Face `tokenizer.json` and reloadable.

| kind               | tokens                                                    | like                     |
|--------------------|-----------------------------------------------------------|--------------------------|
| `char`             | one token per base: A C G T N                             | HyenaDNA, Caduceus       |
| `kmer`             | non-overlapping k-mers; N and leftover bases as singles   | Nucleotide Transformer   |
| `overlapping_kmer` | every k-mer (stride 1); a k-mer with N becomes [UNK]       | DNABERT (v1)             |
| `bpe`              | byte-pair encoding trained on the corpus                  | DNABERT-2                |

Every vocabulary starts with the special tokens [PAD] [CLS] [SEP] [MASK] [UNK] at ids 0-4.
`encode` returns the sequence's tokens without specials (the token store holds these; the collator
adds [CLS] and [SEP]); `tokenizer.hf.encode(text)` gives the same ids framed by [CLS] … [SEP], so a
saved tokenizer.json can be used with `tokenizers` or `transformers` directly. The overlapping k-mer
tokenizer follows DNABERT's convention: its HF input is the k-mers separated by spaces.

The char and k-mer tokenizers encode through vectorised numpy lookup tables (tens of times faster than
running the same tokenizer.json through HF); tests check that both paths give identical ids.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from biomask.dna.formats import tokenizer_dir
from biomask.errors import InputError
from biomask.store import check_store_tokenizer
from biomask.vocab import CLS_ID, NUM_SPECIAL, SEP_ID, SPECIAL_TOKENS, UNK_ID, tokenizer_config

# Base codes used by the vectorised paths: 0-3 = A C G T, 4 = N, 5 = anything else.
_BASE_CODE = np.full(256, 5, dtype=np.uint8)
for _i, _b in enumerate("ACGTN"):
    _BASE_CODE[ord(_b)] = _i


@dataclass
class Ragged:
    """Variable-length token sequences, flattened: `values` split by `lengths`."""

    values: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def to_list(self) -> list[np.ndarray]:
        return np.split(self.values, np.cumsum(self.lengths)[:-1]) if len(self.lengths) else []


def as_bytes(seq: str) -> np.ndarray:
    """A sequence as a uint8 array of ASCII codes (no copy of the characters beyond the encode)."""
    return np.frombuffer(seq.encode("ascii", errors="replace"), dtype=np.uint8)


def _kmer_values(codes: np.ndarray, k: int) -> np.ndarray:
    """Base-4 value of every k-mer starting at each position along the last axis (Horner's rule)."""
    span = codes.shape[-1] - k + 1
    value = np.zeros((*codes.shape[:-1], max(span, 0)), dtype=np.int64)
    for j in range(k):
        value *= 4
        value += codes[..., j : j + span]
    return value


def _with_specials(tok: Tokenizer) -> Tokenizer:
    """Register the specials (already at ids 0-4) and frame encodings with [CLS] … [SEP]."""
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)],
    )
    return tok


class DNATokenizer(ABC):
    """Common interface. Subclasses implement `encode_windows` (the fast path) and `decode`."""

    kind: ClassVar[str]

    def __init__(self, hf: Tokenizer) -> None:
        self.hf = hf
        vocab = hf.get_vocab(with_added_tokens=True)
        self._id_to_token = np.empty(len(vocab), dtype=object)
        for token, index in vocab.items():
            self._id_to_token[index] = token
        for index, token in enumerate(SPECIAL_TOKENS):
            if vocab.get(token) != index:
                raise InputError(
                    f"tokenizer vocabulary puts {token} at id {vocab.get(token)}, biomask needs {index}"
                )

    # ----------------------------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def settings(self) -> dict[str, Any]:
        """What `load_tokenizer` needs besides tokenizer.json."""
        return {"kind": self.kind}

    # ----------------------------------------------------------------------------------- encoding
    @abstractmethod
    def encode_windows(self, windows: np.ndarray) -> Ragged:
        """Encode equal-length sequences given as a (n, length) uint8 array of ASCII codes."""

    def encode(self, seq: str) -> np.ndarray:
        """Token ids of one sequence, without special tokens."""
        return self.encode_windows(as_bytes(seq)[None, :]).values

    def encode_batch(self, seqs: Sequence[str]) -> Ragged:
        """Encode sequences of any lengths, grouping equal lengths into one vectorised call."""
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        pieces: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(seqs)
        for length in np.unique(lengths):
            rows = np.flatnonzero(lengths == length)
            block = np.frombuffer(
                "".join(seqs[i] for i in rows).encode("ascii", errors="replace"), dtype=np.uint8
            )
            encoded = self.encode_windows(block.reshape(len(rows), int(length)))
            for row, piece in zip(rows, encoded.to_list()):
                pieces[row] = piece
        out_lengths = np.fromiter((p.size for p in pieces), dtype=np.int64, count=len(pieces))
        values = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        return Ragged(values, out_lengths)

    def hf_text(self, seq: str) -> str:
        """The text to give the HF tokenizer for `seq` (the sequence itself, except for overlapping k-mers)."""
        return seq

    # ----------------------------------------------------------------------------------- decoding
    def decode(self, ids: Iterable[int]) -> str:
        """The sequence a list of ids stands for; special tokens are skipped."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        return "".join(self._id_to_token[ids[ids >= NUM_SPECIAL]])

    # ----------------------------------------------------------------------------------- saving
    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json and tokenizer_config.json (loadable by `load_tokenizer` and `transformers`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / "tokenizer.json"))
        config = tokenizer_config({"modality": "dna", **self.settings()})
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2) + "\n", encoding="utf-8"
        )
        return directory / "tokenizer.json"


class CharTokenizer(DNATokenizer):
    """One token per base (A C G T N); anything else is [UNK]."""

    kind = "char"
    ALPHABET = "ACGTN"

    def __init__(self, hf: Tokenizer | None = None) -> None:
        super().__init__(hf or self._build())
        self._lut = np.full(256, UNK_ID, dtype=np.int64)
        for base in self.ALPHABET:
            self._lut[ord(base)] = self.hf.token_to_id(base)

    @classmethod
    def _build(cls) -> Tokenizer:
        vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *cls.ALPHABET])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tok.decoder = decoders.Fuse()
        return _with_specials(tok)

    def encode_windows(self, windows: np.ndarray) -> Ragged:
        n, width = windows.shape
        return Ragged(self._lut[windows].reshape(-1), np.full(n, width, dtype=np.int64))


class KmerTokenizer(DNATokenizer):
    """Non-overlapping k-mers read left to right (Nucleotide Transformer): a run of ACGT between Ns gives
    k-mers, its last `len % k` bases are single-base tokens, and each N (or other letter) is one token."""

    kind = "kmer"

    def __init__(self, k: int = 6, hf: Tokenizer | None = None) -> None:
        if not 1 <= k <= 8:
            raise InputError(f"k-mer size must be between 1 and 8, got {k}")
        self.k = k
        super().__init__(hf or self._build(k))
        self._single = np.full(6, UNK_ID, dtype=np.int64)
        for code, base in enumerate("ACGTN"):
            self._single[code] = self.hf.token_to_id(base)
        self._kmer_offset = self.hf.token_to_id("A" * k) if k > 1 else self.hf.token_to_id("A")

    @staticmethod
    def _build(k: int) -> Tokenizer:
        tokens = [*SPECIAL_TOKENS, *"ACGTN"]
        if k > 1:
            tokens += ["".join(p) for p in product("ACGT", repeat=k)]
        tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"[ACGT]{{{k}}}|."), behavior="isolated")
        tok.decoder = decoders.Fuse()
        return _with_specials(tok)

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "k": self.k}

    def encode_windows(self, windows: np.ndarray) -> Ragged:
        n, width = windows.shape
        k = self.k
        codes = _BASE_CODE[windows]
        if k == 1 or width == 0:
            return Ragged(self._single[codes].reshape(-1), np.full(n, width, dtype=np.int64))
        if (codes < 4).all():  # the common case: no N, every window cut the same way
            full = width // k
            kmers = _kmer_values(codes[:, : full * k].reshape(n, full, k), k)[..., 0] + self._kmer_offset
            tail = self._single[codes[:, full * k :]]
            ids = np.concatenate([kmers, tail], axis=1)
            return Ragged(ids.reshape(-1), np.full(n, ids.shape[1], dtype=np.int64))
        return self._encode_with_breaks(codes.reshape(-1), n, width)

    def _encode_with_breaks(self, flat: np.ndarray, n: int, width: int) -> Ragged:
        """General path: runs of ACGT restart at every N and at every window boundary."""
        k, size = self.k, flat.size
        idx = np.arange(size)
        brk = flat >= 4
        row_start = idx % width == 0
        row_end = idx % width == width - 1
        start = np.maximum.accumulate(np.where(brk, idx + 1, np.where(row_start, idx, 0)))
        end = np.minimum.accumulate(np.where(brk, idx, np.where(row_end, idx + 1, size))[::-1])[::-1]
        pos = idx - start
        full = (end - start) // k * k
        kmer_start = ~brk & (pos < full) & (pos % k == 0)
        single = ~brk & (pos >= full)
        ids = np.empty(size, dtype=np.int64)
        starts = np.flatnonzero(kmer_start)
        if starts.size:
            gathered = flat[starts[:, None] + np.arange(k)]
            ids[starts] = _kmer_values(gathered, k)[:, 0] + self._kmer_offset
        ids[single] = self._single[flat[single]]
        ids[brk] = self._single[flat[brk]]
        emit = kmer_start | single | brk
        lengths = (
            np.add.reduceat(emit.astype(np.int64), np.arange(0, size, width))
            if size
            else np.zeros(n, np.int64)
        )
        return Ragged(ids[emit], lengths)


class OverlappingKmerTokenizer(DNATokenizer):
    """Every k-mer at stride 1 (DNABERT). A k-mer holding N or another letter becomes [UNK]; when
    decoding, a base covered only by [UNK] k-mers comes back as N."""

    kind = "overlapping_kmer"

    def __init__(self, k: int = 6, hf: Tokenizer | None = None) -> None:
        if not 2 <= k <= 8:
            raise InputError(f"overlapping k-mer size must be between 2 and 8, got {k}")
        self.k = k
        super().__init__(hf or self._build(k))
        self._kmer_offset = self.hf.token_to_id("A" * k)
        letters = np.frombuffer(b"ACGT", dtype=np.uint8)
        all_kmers = np.array(list(product(range(4), repeat=k)), dtype=np.int64)
        self._kmer_letters = letters[all_kmers]  # (4^k, k) ASCII codes, row = k-mer value

    @staticmethod
    def _build(k: int) -> Tokenizer:
        tokens = [*SPECIAL_TOKENS, *("".join(p) for p in product("ACGT", repeat=k))]
        tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return _with_specials(tok)

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "k": self.k}

    def hf_text(self, seq: str) -> str:
        return " ".join(seq[i : i + self.k] for i in range(len(seq) - self.k + 1))

    def encode_windows(self, windows: np.ndarray) -> Ragged:
        n, width = windows.shape
        k = self.k
        span = max(width - k + 1, 0)
        if span == 0:
            return Ragged(np.zeros(0, dtype=np.int64), np.zeros(n, dtype=np.int64))
        codes = _BASE_CODE[windows]
        bad = np.cumsum(codes >= 4, axis=1, dtype=np.int32)
        bad = np.concatenate([np.zeros((n, 1), np.int32), bad], axis=1)
        has_bad = (bad[:, k:] - bad[:, :span]) > 0
        ids = _kmer_values(np.minimum(codes, 3), k) + self._kmer_offset
        ids[has_bad] = UNK_ID
        return Ragged(ids.reshape(-1), np.full(n, span, dtype=np.int64))

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        ids = ids[(ids >= NUM_SPECIAL) | (ids == UNK_ID)]
        if ids.size == 0:
            return ""
        out = np.full(ids.size + self.k - 1, ord("N"), dtype=np.uint8)
        known = np.flatnonzero(ids != UNK_ID)
        positions = known[:, None] + np.arange(self.k)
        out[positions] = self._kmer_letters[ids[known] - self._kmer_offset]
        return out.tobytes().decode("ascii")


class BPETokenizer(DNATokenizer):
    """Byte-pair encoding learnt with HF `tokenizers` on the corpus (DNABERT-2 style). Encoding runs
    through HF (multi-threaded Rust); decoding concatenates the pieces."""

    kind = "bpe"

    @classmethod
    def train(cls, corpus: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> BPETokenizer:
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.decoder = decoders.Fuse()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=list("ACGTN"),
            show_progress=False,
        )
        tok.train_from_iterator(corpus, trainer=trainer)
        return cls(_with_specials(tok))

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size}

    def encode_windows(self, windows: np.ndarray) -> Ragged:
        texts = [row.tobytes().decode("ascii", errors="replace") for row in windows]
        return self.encode_texts(texts)

    def encode_batch(self, seqs: Sequence[str]) -> Ragged:
        return self.encode_texts(list(seqs))

    def encode_texts(self, texts: list[str]) -> Ragged:
        encodings = self.hf.encode_batch(texts, add_special_tokens=False)
        pieces = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        lengths = np.fromiter((p.size for p in pieces), dtype=np.int64, count=len(pieces))
        return Ragged(np.concatenate(pieces) if pieces else np.zeros(0, np.int64), lengths)


TOKENIZER_KINDS: dict[str, type[DNATokenizer]] = {
    cls.kind: cls for cls in (CharTokenizer, KmerTokenizer, OverlappingKmerTokenizer, BPETokenizer)
}


def load_tokenizer(path: str | os.PathLike) -> DNATokenizer:
    """Reload a tokenizer saved by `DNATokenizer.save` (or the one inside a token store)."""
    directory = tokenizer_dir(path)
    json_path, config_path = directory / "tokenizer.json", directory / "tokenizer_config.json"
    if not json_path.is_file():
        raise InputError(f"no tokenizer.json at {path}; give a tokenizer directory or a token store")
    try:
        settings = json.loads(config_path.read_text(encoding="utf-8"))["biomask"]
        hf = Tokenizer.from_file(str(json_path))
    except FileNotFoundError:
        raise InputError(f"{config_path} is missing: biomask needs it to know the tokenizer's kind") from None
    except (KeyError, ValueError, Exception) as exc:  # tokenizers raises its own Exception type
        raise InputError(f"cannot load the tokenizer in {directory}: {exc}") from None
    check_store_tokenizer(directory)
    if settings.get("modality", "dna") != "dna":
        raise InputError(
            f"{directory} holds a {settings.get('modality')} tokenizer (kind {settings.get('kind')!r}), not a "
            "DNA one; give a DNA token store or tokenizer directory written by `biomask prep dna`"
        )
    kind = settings.get("kind")
    if kind == "char":
        return CharTokenizer(hf)
    if kind == "kmer":
        return KmerTokenizer(int(settings["k"]), hf)
    if kind == "overlapping_kmer":
        return OverlappingKmerTokenizer(int(settings["k"]), hf)
    if kind == "bpe":
        return BPETokenizer(hf)
    raise InputError(
        f"{config_path}: unknown DNA tokenizer kind {kind!r} (known: {', '.join(TOKENIZER_KINDS)})"
    )
