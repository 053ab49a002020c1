"""Tokenization schemes for expression: one interface, vectorised over CSR blocks of cells.

Every scheme takes a block of counts whose columns are token ids (`GeneVocabulary` order, canonical
CSR: each row's columns sorted and unique) and each cell's scale factor `target_sum / library_size`,
and returns flat token-aligned arrays plus one length per cell (`Encoded`). No Python loop runs per
cell: orderings within cells (ranks, sampled truncation) come from one sort of 64-bit keys packing
(cell, value, position); binning needs no sort at all (below).

| scheme   | a cell's tokens                                    | `values` (float32)                  | order      |
|----------|----------------------------------------------------|-------------------------------------|------------|
| `binned` | its expressed genes, at most `max_length`          | log1p(count * scale)                | gene id    |
|          | (beyond: the top-expressed, or a seeded sample)    | + `bins` (uint8): 1..n_bins         |            |
| `rank`   | its expressed genes ranked by count * scale /      | that median-normalised value        | rank       |
|          | corpus median, the top `max_length`                |                                     |            |
| `panel`  | every vocabulary gene, expressed or not            | log1p(count * scale), 0 if absent   | gene id    |

Binning (scGPT-style, per cell): with m expressed genes and F(v) the fraction of them whose value is
<= v, a gene's bin is ceil(n_bins * F(v)): equal-frequency bins, ties share a bin and the highest
value always gets n_bins. Bins are computed over all of the cell's expressed genes, before
truncation. Ties in ranks and in top-expressed truncation go to the lower token id.

Why the binned scheme is fast: its per-cell work is one compiled kernel (numba) that reads each cell's
counts twice -- once for a histogram, once to write the kept tokens -- with no temporary arrays. Within
a cell, values order like counts, and counts are mostly small integers: F comes from a histogram of
counts below `SMALL_COUNT`; only the rare larger counts are sorted. The kernel is compiled on first
use and cached (numba `cache=True`: beside this module in a checkout, under ~/.cache/numba for an
installed copy), so later processes load it in milliseconds.
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

from biomask.errors import InputError
from biomask.vocab import NUM_SPECIAL

if TYPE_CHECKING:  # scipy for annotations only: importing it took most of this module's import time
    import scipy.sparse as sp

    from biomask.cells.genes import GeneVocabulary

log = logging.getLogger(__name__)

_U16 = 1 << 16
# The token-aligned fields a scheme may write besides `tokens` (the collator carries them).
FIELD_DTYPES = {"values": np.dtype(np.float32), "bins": np.dtype(np.uint8)}
SMALL_COUNT = 64  # counts below this are binned through per-cell tables (larger ones are sorted)


@dataclass
class Encoded:
    """Records of one block, flattened: field arrays split by `lengths` (one per cell)."""

    lengths: np.ndarray  # int64
    tokens: np.ndarray  # token ids (any integer dtype; the store writes its own)
    values: np.ndarray  # float32
    bins: np.ndarray | None = None  # uint8 (binned scheme only)

    def fields(self) -> dict[str, np.ndarray]:
        out = {"tokens": self.tokens, "values": self.values}
        if self.bins is not None:
            out["bins"] = self.bins
        return out

    def rows(self, lo: int, hi: int) -> Encoded:
        """The records of cells lo..hi-1: views when they are most of the block, else copies -- a small
        view kept in a writer's buffer would keep the whole block's arrays alive."""
        first = int(self.lengths[:lo].sum())
        last = first + int(self.lengths[lo:hi].sum())
        copy = 2 * (last - first) < self.tokens.size

        def part(array: np.ndarray) -> np.ndarray:
            return array[first:last].copy() if copy else array[first:last]

        return Encoded(
            self.lengths[lo:hi],
            part(self.tokens),
            part(self.values),
            None if self.bins is None else part(self.bins),
        )


# --------------------------------------------------------------------------------------------- helpers


def row_ids(indptr: np.ndarray) -> np.ndarray:
    """The row of every stored element of a CSR matrix."""
    return np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))


def order_within_rows(indptr: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Permutation of a CSR block's elements sorting them by (row, key, position); `keys` is uint32.

    Fast path: one in-place sort of uint64 words packing row (16 bits), key (32) and position in the
    row (16), decoded back into flat indices -- several times faster than lexsort or argsort."""
    rows = row_ids(indptr)
    starts = indptr[:-1].astype(np.int64)
    n_rows = indptr.size - 1
    longest = int(np.diff(indptr).max()) if n_rows else 0
    if n_rows > _U16 or longest > _U16:
        return np.lexsort((np.arange(rows.size), keys, rows))
    position = np.arange(rows.size, dtype=np.int64) - starts[rows]
    packed = rows.astype(np.uint64) << np.uint64(48)
    packed |= keys.astype(np.uint64) << np.uint64(16)
    packed |= position.astype(np.uint64)
    packed.sort()
    sorted_rows = (packed >> np.uint64(48)).astype(np.int64)
    return starts[sorted_rows] + (packed & np.uint64(0xFFFF)).astype(np.int64)


def ascending_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys that sort like the (non-negative float32) values."""
    return np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)


def descending_keys(values: np.ndarray) -> np.ndarray:
    return ~ascending_keys(values)


def rank_in_row(indptr: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Each element's 0-based position within its row, given `order` from `order_within_rows`."""
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size, dtype=np.int64) - np.repeat(indptr[:-1], np.diff(indptr))
    return rank


def mix_hash(seed: int, cells: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """A uint32 pseudo-random key per (seed, cell, token) -- splitmix64's finaliser, vectorised.

    Keys depend on nothing else, so a sample is the same whatever the block boundaries."""
    with np.errstate(over="ignore"):
        x = (
            np.uint64(seed + 1) * np.uint64(0x9E3779B97F4A7C15)
            ^ cells.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
            ^ tokens.astype(np.uint64) * np.uint64(0x94D049BB133111EB)
        )
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(32)).astype(np.uint32)


def _normalised(block: sp.csr_matrix, scale: np.ndarray) -> np.ndarray:
    """count * (target_sum / library size) for every stored element, float32."""
    return block.data.astype(np.float32, copy=False) * np.repeat(
        scale.astype(np.float32), np.diff(block.indptr)
    )


def _bin_cells(indptr, counts, indices, scale, n_bins, max_length, tokens, values, bins, lengths):
    """The binned scheme's per-cell work, compiled: bins over all expressed genes, then the top
    `max_length` by count (ties to the lower token id), written in token order into the output arrays.

    Counts below SMALL_COUNT are binned through a per-cell histogram (no sort); the rare larger ones
    are sorted. Values order like counts within a cell, so "top by count" is "top by value"."""
    hist = np.zeros(SMALL_COUNT, dtype=np.int64)  # then: how many of the cell's small counts are <= c
    bin_of = np.zeros(SMALL_COUNT, dtype=np.uint8)
    value_of = np.zeros(SMALL_COUNT, dtype=np.float32)
    cursor = 0
    for cell in range(indptr.size - 1):
        start, end = indptr[cell], indptr[cell + 1]
        m = end - start
        hist[:] = 0
        n_large = 0
        for j in range(start, end):
            c = np.int64(counts[j])  # integral counts, possibly stored as floats
            if c < SMALL_COUNT:
                hist[c] += 1
            else:
                n_large += 1
        large = np.empty(n_large, dtype=np.int64)
        if n_large:
            k = 0
            for j in range(start, end):
                c = np.int64(counts[j])
                if c >= SMALL_COUNT:
                    large[k] = c
                    k += 1
            large.sort()
        s = scale[cell]
        below = 0
        for c in range(SMALL_COUNT):
            present = hist[c] > 0
            below += hist[c]
            hist[c] = below
            if present:  # F(c) * n_bins, rounded up: equal-frequency bins, ties share one
                bin_of[c] = (n_bins * below + m - 1) // m
                value_of[c] = np.log1p(np.float32(c) * s)
        # truncation: keep counts above a threshold t and the first `ties` genes whose count is t
        threshold, ties = -1, m
        if m > max_length:
            if n_large >= max_length:
                threshold = large[n_large - max_length]
                above = n_large - np.searchsorted(large, threshold, side="right")
            else:
                threshold = 0
                while m - hist[threshold] > max_length:
                    threshold += 1
                above = m - hist[threshold]
            ties = max_length - above
        n_small = hist[SMALL_COUNT - 1]
        length = 0
        for j in range(start, end):
            c = np.int64(counts[j])
            if c <= threshold:
                if c < threshold or ties == 0:
                    continue
                ties -= 1
            if c < SMALL_COUNT:
                bins[cursor] = bin_of[c]
                values[cursor] = value_of[c]
            else:
                at_most = n_small + np.searchsorted(large, c, side="right")
                bins[cursor] = (n_bins * at_most + m - 1) // m
                values[cursor] = np.log1p(np.float32(c) * s)
            tokens[cursor] = indices[j]
            cursor += 1
            length += 1
        lengths[cell] = length


@functools.cache
def _compiled_bin_cells():
    """`_bin_cells` compiled on first use rather than decorated: the configs import this module for
    its scheme names, and numba's import was half a second of every prep or embed rerun that finds
    its output current. The compiled kernel is still cached (`kernels.njit`)."""
    from biomask.cells.kernels import njit

    return njit(_bin_cells)


# --------------------------------------------------------------------------------------------- schemes


class TokenizerSettings(Protocol):
    """What a scheme reads of a prep config's `tokenizer` section (biomask.cells.config.TokenizerConfig,
    which checks `scheme` against `SCHEMES`: this module does not import it)."""

    scheme: str
    n_bins: int
    max_length: int
    truncate: str
    seed: int


class Scheme(ABC):
    """Turns a block of counts in token space into records, and says what its records imply.

    The class attributes are what the rest of biomask asks of a scheme (the store's manifest names it;
    `scheme_class(name)` finds it): training, the model's defaults, evaluation and embedding read them
    instead of comparing names. A new scheme is one subclass here plus its class in `SCHEMES`'s
    `register(...)`."""

    name: ClassVar[str]
    # Gene order carries no meaning: the model adds no positions, and a record cut to fit keeps a
    # subset of its genes (training: a random one; inference: the highest-valued) in stored order.
    order_free: ClassVar[bool]
    # Training crops a long record at random (order-free: a gene subset); False keeps its first tokens.
    random_crop: ClassVar[bool] = True
    # What `masking.target: auto` predicts (tokens | bins | values) and how a gene's value enters the
    # model under `model.value_embedding: auto` (none | bins | mlp).
    default_target: ClassVar[str]
    value_embedding: ClassVar[str]
    # Token-aligned fields written besides `tokens`.
    fields: ClassVar[tuple[str, ...]] = ("values",)
    # Records list every gene the input measures, zeros included: a gene left out is unmeasured, not
    # unexpressed.
    complete_profile: ClassVar[bool] = False
    max_length: int  # the most genes a record holds

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: TokenizerSettings, vocab: GeneVocabulary) -> Scheme:
        """The scheme of a prep config's `tokenizer` section over a gene vocabulary."""

    @classmethod
    def writes_bins(cls) -> bool:
        return "bins" in cls.fields

    @classmethod
    def describe_values(cls, normalised: str) -> str:
        """What `values` hold, in words, given the normalised count's description."""
        return f"log1p({normalised})"

    @abstractmethod
    def encode(self, block: sp.csr_matrix, scale: np.ndarray, cells: np.ndarray) -> Encoded:
        """`block`: counts, columns = token ids, canonical CSR. `scale`: target_sum / library size per row.
        `cells`: each row's global cell index (seeds sampling, so blocks do not change results)."""

    def token_fields(self, token_dtype: np.dtype) -> dict[str, np.dtype]:
        """The store's token fields and their dtypes: `tokens` and the scheme's `fields`."""
        return {"tokens": token_dtype, **{name: FIELD_DTYPES[name] for name in self.fields}}

    def for_input(self, targets: np.ndarray) -> Scheme:
        """The scheme for one input whose columns map to token ids `targets` (-1: not in the
        vocabulary). Only the panel depends on it: see `PanelScheme`."""
        return self


class BinnedScheme(Scheme):
    name = "binned"
    order_free = True
    default_target = "bins"
    value_embedding = "bins"
    fields = ("values", "bins")

    def __init__(
        self,
        n_bins: int,
        max_length: int,
        truncate: str = "top",
        seed: int = 0,
        token_dtype: type | None = None,
    ) -> None:
        self.n_bins, self.max_length, self.truncate, self.seed = n_bins, max_length, truncate, seed
        self.token_dtype = token_dtype  # tokens written in the store's dtype save a conversion (None: int64)

    @classmethod
    def from_config(cls, cfg: TokenizerSettings, vocab: GeneVocabulary) -> BinnedScheme:
        from biomask.store import token_dtype

        return cls(cfg.n_bins, cfg.max_length, cfg.truncate, cfg.seed, token_dtype(vocab.vocab_size))

    def encode(self, block: sp.csr_matrix, scale: np.ndarray, cells: np.ndarray) -> Encoded:
        indptr = block.indptr.astype(np.int64, copy=False)
        lengths = np.diff(indptr)
        sample = self.truncate != "top" and lengths.size > 0 and lengths.max() > self.max_length
        limit = int(lengths.max(initial=0)) if sample else self.max_length  # sampling happens below
        kept = int(np.minimum(lengths, limit).sum())
        tokens = np.empty(kept, dtype=self.token_dtype or np.int64)
        values = np.empty(kept, dtype=np.float32)
        bins = np.empty(kept, dtype=np.uint8)
        out_lengths = np.empty(lengths.size, dtype=np.int64)
        _compiled_bin_cells()(
            indptr, block.data, block.indices, scale.astype(np.float32), self.n_bins, limit,
            tokens, values, bins, out_lengths,
        )  # fmt: skip
        if sample:
            keep = self._truncate(indptr, values, tokens, cells)
            tokens, values, bins = tokens[keep], values[keep], bins[keep]
            out_lengths = np.minimum(lengths, self.max_length)
        return Encoded(out_lengths, tokens, values, bins)

    def _truncate(
        self, indptr: np.ndarray, values: np.ndarray, tokens: np.ndarray, cells: np.ndarray
    ) -> np.ndarray:
        """Keep max_length genes of the cells that have more (the general path: by sorting keys)."""
        lengths = np.diff(indptr)
        long = lengths > self.max_length
        where = np.flatnonzero(np.repeat(long, lengths))  # elements of long cells
        sub_indptr = np.zeros(int(long.sum()) + 1, dtype=np.int64)
        np.cumsum(lengths[long], out=sub_indptr[1:])
        if self.truncate == "top":
            keys = descending_keys(values[where])
        else:
            keys = mix_hash(self.seed, np.repeat(cells[long], lengths[long]), tokens[where])
        rank = rank_in_row(sub_indptr, order_within_rows(sub_indptr, keys))
        keep = np.ones(values.size, dtype=bool)
        keep[where] = rank < self.max_length
        return keep


class RankScheme(Scheme):
    name = "rank"
    order_free = False
    random_crop = False  # the order is the information: a long record keeps its top-ranked genes
    default_target = "tokens"
    value_embedding = "none"

    def __init__(self, token_medians: np.ndarray, max_length: int) -> None:
        self.token_medians = token_medians.astype(np.float32)
        self.max_length = max_length

    @classmethod
    def from_config(cls, cfg: TokenizerSettings, vocab: GeneVocabulary) -> RankScheme:
        medians = vocab.token_medians()
        if not np.isfinite(medians).all() or (medians <= 0).any():
            raise InputError(
                "the vocabulary has genes without a corpus median, which rank encoding needs; "
                "rebuild it from a corpus in which every vocabulary gene is expressed"
            )
        return cls(medians, cfg.max_length)

    @classmethod
    def describe_values(cls, normalised: str) -> str:
        return f"{normalised} / corpus non-zero median of the gene"

    def encode(self, block: sp.csr_matrix, scale: np.ndarray, cells: np.ndarray) -> Encoded:
        indptr = block.indptr.astype(np.int64)
        values = _normalised(block, scale) / self.token_medians[block.indices]
        order = order_within_rows(indptr, descending_keys(values))
        lengths = np.minimum(np.diff(indptr), self.max_length)
        rank = np.arange(order.size, dtype=np.int64) - np.repeat(indptr[:-1], np.diff(indptr))
        chosen = order[rank < self.max_length]
        return Encoded(lengths, block.indices[chosen].astype(np.int64), values[chosen])


class PanelScheme(Scheme):
    """Every panel gene the input measures, zeros included. A panel gene the input lacks is left out
    of its records (not written as 0): a model can tell "not measured" from "not expressed" (the
    profile autoencoder hides such genes like masked ones)."""

    name = "panel"
    order_free = True
    default_target = "values"
    value_embedding = "mlp"
    complete_profile = True

    def __init__(self, vocab_size: int, panel: np.ndarray | None = None) -> None:
        self.vocab_size = vocab_size
        self.max_length = vocab_size - NUM_SPECIAL  # the whole panel
        self.panel = np.arange(NUM_SPECIAL, vocab_size, dtype=np.int64) if panel is None else panel
        self.column = np.full(vocab_size, -1, dtype=np.int64)  # token id -> column of the dense block
        self.column[self.panel] = np.arange(self.panel.size)

    @classmethod
    def from_config(cls, cfg: TokenizerSettings, vocab: GeneVocabulary) -> PanelScheme:
        genes = vocab.vocab_size - NUM_SPECIAL
        if genes > 4096:
            log.warning(
                "panel scheme over %d genes: every record holds all of them; set hvg.n_top_genes for a smaller panel",
                genes,
            )
        return cls(vocab.vocab_size)

    def for_input(self, targets: np.ndarray) -> PanelScheme:
        present = np.unique(np.asarray(targets, dtype=np.int64))
        # type(self): a scheme built on the panel (other values, the same layout) encodes as itself
        return type(self)(self.vocab_size, present[present >= NUM_SPECIAL])

    def encode(self, block: sp.csr_matrix, scale: np.ndarray, cells: np.ndarray) -> Encoded:
        n = block.shape[0]
        dense = np.zeros((n, self.panel.size), dtype=np.float32)
        dense[row_ids(block.indptr), self.column[block.indices]] = np.log1p(_normalised(block, scale))
        lengths = np.full(n, self.panel.size, dtype=np.int64)
        return Encoded(lengths, np.tile(self.panel, n), dense.reshape(-1))


# What a scheme class must say of its records (no default in `Scheme`).
RECORD_ATTRIBUTES = ("name", "order_free", "default_target", "value_embedding")


def register(*classes: type[Scheme]) -> dict[str, type[Scheme]]:
    """The registry of `classes` by name. A class that cannot serve stops the import here, named: left
    abstract (no `encode`), silent about its records, or under a name that is taken — a subclass of
    RankScheme without its own `name` would otherwise replace `rank` in every store's reading."""
    registry: dict[str, type[Scheme]] = {}
    for cls in classes:
        abstract = sorted(getattr(cls, "__abstractmethods__", ()))
        if abstract:
            raise TypeError(f"cells scheme {cls.__name__} does not implement {', '.join(abstract)}")
        unset = [a for a in RECORD_ATTRIBUTES if not hasattr(cls, a)]
        if unset:
            raise TypeError(
                f"cells scheme {cls.__name__} does not set {', '.join(unset)} (class attributes; see Scheme)"
            )
        if cls.name in registry:
            raise TypeError(
                f"cells scheme {cls.__name__}: the name {cls.name!r} is {registry[cls.name].__name__}'s; "
                "give the class its own `name`"
            )
        registry[cls.name] = cls
    return registry


# The registry: a store's `scheme` (and `tokenizer.scheme` in prep configs) names one of these.
SCHEMES: dict[str, type[Scheme]] = register(BinnedScheme, RankScheme, PanelScheme)


def complete_profile(name: object) -> bool:
    """Whether a recorded scheme name is one of the whole-profile schemes (the panel, or one built on
    it); False for a name this biomask does not register."""
    return isinstance(name, str) and name in SCHEMES and SCHEMES[name].complete_profile


def scheme_class(name: str | None, where: str = "the token store") -> type[Scheme]:
    """The scheme class named `name`; an unknown name is an InputError naming `where`."""
    if name not in SCHEMES:
        raise InputError(f"{where}: cells scheme {name!r} is not one of {', '.join(SCHEMES)}")
    return SCHEMES[name]


def make_scheme(cfg: TokenizerSettings, vocab: GeneVocabulary) -> Scheme:
    """The scheme a prep config's `tokenizer` section asks for, over `vocab`."""
    return scheme_class(cfg.scheme, "tokenizer.scheme").from_config(cfg, vocab)
