"""The token store: what the prep stages write and the trainer, evaluation and embedding stages read.

Layout of a store directory::

    manifest.json                 counts, shard checksums, tokenizer, sources, resolved config, code version
    config.yaml  run.json         resolved stage config and provenance
    tokenizer/                    tokenizer.json (+ tokenizer_config.json) or the gene vocabulary
    train/ val/ test/             one directory per split
        shard-00000.tokens.npy    every token-aligned field, flattened (e.g. tokens, values)
        shard-00000.offsets.npy   int64, num_records + 1: record i is [offsets[i], offsets[i+1])
        shard-00000.labels.npy    every per-record field (e.g. labels)
        shard-00000.meta.csv.gz   per-record metadata (ids, source coordinates, obs columns)

Records are variable length (ragged, addressed through offsets); when every record of a split has
the same length the manifest says so (`fixed_length`) and `Shard.matrix()` returns a zero-copy
2-D view. Arrays are opened memory-mapped, so random access and streaming never load a whole
store: memory is bounded by what a caller touches, and by one shard per split while writing.
"""

from __future__ import annotations

import collections
import contextlib
import decimal
import hashlib
import io
import json
import logging
import mmap
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from biomask.errors import InputError, IntegrityError
from biomask.provenance import sha256_file

# pandas is imported where it is used: a rerun that finds a store current opens it without pandas'
# import (a third of a second a process)
if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

STORE_FORMAT = "biomask-token-store"
STORE_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 25  # 32 Mi tokens: 64 MiB of uint16 per shard


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id of a vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


# --------------------------------------------------------------------------------------------- writing


def write_npy(path: Path, parts: Sequence[np.ndarray]) -> dict[str, Any]:
    """Write 1-D arrays of one dtype as a single .npy file -- the bytes `np.save` would write for their
    concatenation -- hashing them on the way out; return its sha256 and size. Writing the parts in turn
    skips the concatenated copy and a second read of the file for its checksum."""
    dtype = parts[0].dtype
    header = io.BytesIO()
    total = sum(part.size for part in parts)
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (total,)}
    )
    digest = hashlib.sha256(header.getvalue())
    with open(path, "wb") as handle:
        handle.write(header.getvalue())
        for part in parts:
            part = np.ascontiguousarray(part, dtype=dtype)
            digest.update(part.data)
            part.tofile(handle)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


class SplitWriter:
    """Appends records to one split, writing a shard whenever `shard_tokens` tokens are buffered.

    Use `add_batch` with flat token-aligned arrays and per-record lengths (the fast path), or `add`
    for one record. Memory held is one shard's worth of buffered arrays (per split: a store's writer
    holds one for each of train, val and test).
    """

    def __init__(
        self,
        directory: Path,
        token_fields: Mapping[str, np.dtype],
        record_fields: Mapping[str, np.dtype],
        meta_columns: Sequence[str],
        shard_tokens: int,
    ) -> None:
        if "tokens" not in token_fields:
            raise ValueError("a token store needs a 'tokens' field")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.token_fields = {k: np.dtype(v) for k, v in token_fields.items()}
        self.record_fields = {k: np.dtype(v) for k, v in record_fields.items()}
        self.meta_columns = list(meta_columns)
        self.shard_tokens = int(shard_tokens)
        self._shards: list[dict[str, Any]] = []
        self._lengths: set[int] = set()
        self.labels_seen: collections.Counter[int] = collections.Counter()  # records per class (warnings)
        self._reset_buffer()

    def _reset_buffer(self) -> None:
        self._buf_tokens: dict[str, list[np.ndarray]] = {k: [] for k in self.token_fields}
        self._buf_records: dict[str, list[np.ndarray]] = {k: [] for k in self.record_fields}
        self._buf_lengths: list[np.ndarray] = []
        self._buf_meta: list[pd.DataFrame] = []
        self._buffered = 0

    def add(self, meta: Mapping[str, Any] | None = None, **fields: Any) -> None:
        """Append one record: token-aligned arrays and per-record scalars by field name."""
        import pandas as pd

        tokens = np.asarray(fields["tokens"])
        self.add_batch(
            lengths=np.array([tokens.size], dtype=np.int64),
            meta=pd.DataFrame([dict(meta or {})], columns=self.meta_columns),
            **{
                k: (np.asarray(v).reshape(-1) if k in self.token_fields else np.asarray([v]))
                for k, v in fields.items()
            },
        )

    def add_batch(self, lengths: np.ndarray, meta: pd.DataFrame | None = None, **fields: np.ndarray) -> None:
        """Append many records at once: token fields flattened, record fields one value per record."""
        import pandas as pd

        lengths = np.asarray(lengths, dtype=np.int64)
        total = int(lengths.sum())
        expected = set(self.token_fields) | set(self.record_fields)
        if set(fields) != expected:
            raise ValueError(f"fields {sorted(fields)} do not match the store's {sorted(expected)}")
        for name, dtype in self.token_fields.items():
            arr = np.asarray(fields[name]).reshape(-1)
            if arr.size != total:
                raise ValueError(f"token field {name!r} has {arr.size} values for {total} tokens")
            self._buf_tokens[name].append(arr.astype(dtype, copy=False))
        for name, dtype in self.record_fields.items():
            arr = np.asarray(fields[name]).reshape(-1)
            if arr.size != lengths.size:
                raise ValueError(f"record field {name!r} has {arr.size} values for {lengths.size} records")
            self._buf_records[name].append(arr.astype(dtype, copy=False))
            if name == "labels":
                values, counts = np.unique(arr, return_counts=True)
                self.labels_seen.update(dict(zip(values.tolist(), counts.tolist())))
        if meta is None:
            meta = pd.DataFrame(index=range(lengths.size), columns=self.meta_columns)
        if len(meta) != lengths.size:
            raise ValueError(f"meta has {len(meta)} rows for {lengths.size} records")
        self._buf_meta.append(meta.reset_index(drop=True)[self.meta_columns])
        self._buf_lengths.append(lengths)
        self._lengths.update(np.unique(lengths).tolist())
        self._buffered += total
        if self._buffered >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        import pandas as pd

        if not self._buf_lengths:
            return
        index = len(self._shards)
        stem = f"shard-{index:05d}"
        lengths = np.concatenate(self._buf_lengths)
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        pieces = {"offsets": [offsets], **self._buf_tokens, **self._buf_records}
        files = {}
        for name, parts in pieces.items():
            path = self.directory / f"{stem}.{name}.npy"
            files[name] = {"name": path.name, **write_npy(path, parts)}
        meta_path = self.directory / f"{stem}.meta.csv.gz"
        # mtime=0: the gzip header carries no timestamp, so equal metadata gives byte-equal files (and sha256)
        pd.concat(self._buf_meta, ignore_index=True).to_csv(
            meta_path, index=False, compression={"method": "gzip", "mtime": 0}
        )
        files["meta"] = {
            "name": meta_path.name,
            "sha256": sha256_file(meta_path),
            "bytes": meta_path.stat().st_size,
        }
        self._shards.append(
            {"index": index, "num_records": int(lengths.size), "num_tokens": int(offsets[-1]), "files": files}
        )
        self._reset_buffer()

    def close(self) -> dict[str, Any]:
        """Write the last shard; return this split's manifest entry."""
        self._flush()
        return {
            "num_records": sum(s["num_records"] for s in self._shards),
            "num_tokens": sum(s["num_tokens"] for s in self._shards),
            "fixed_length": next(iter(self._lengths)) if len(self._lengths) == 1 else None,
            "shards": self._shards,
        }


class TokenStoreWriter:
    """Writes a whole store: one `SplitWriter` per split, then `manifest.json`.

    Write into a temporary directory (see `biomask.outputs.atomic_output_dir`) so that a failure
    leaves nothing behind.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        token_fields: Mapping[str, np.dtype],
        record_fields: Mapping[str, np.dtype] | None = None,
        meta_columns: Sequence[str] = ("id",),
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
    ) -> None:
        self.root = Path(root)
        self.token_fields = dict(token_fields)
        self.record_fields = dict(record_fields or {})
        self.meta_columns = list(meta_columns)
        self.shard_tokens = shard_tokens
        self._splits: dict[str, SplitWriter] = {}

    def split(self, name: str) -> SplitWriter:
        if name not in self._splits:
            self._splits[name] = SplitWriter(
                self.root / name, self.token_fields, self.record_fields, self.meta_columns, self.shard_tokens
            )
        return self._splits[name]

    def finish(self, **manifest: Any) -> dict[str, Any]:
        """Close every split and write `manifest.json` with the given extra entries."""
        splits = {name: writer.close() for name, writer in self._splits.items()}
        full = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "token_fields": {k: str(np.dtype(v)) for k, v in self.token_fields.items()},
            "record_fields": {k: str(np.dtype(v)) for k, v in self.record_fields.items()},
            "meta_columns": self.meta_columns,
            **manifest,
            "splits": splits,
        }
        (self.root / "manifest.json").write_text(
            json.dumps(full, indent=2, default=str) + "\n", encoding="utf-8"
        )
        config = manifest.get("config") or {}
        self._warn_thin(splits, manifest.get("label_names"), config.get("split"), split_columns(config))
        return full

    def _warn_thin(
        self,
        splits: dict[str, dict[str, Any]],
        label_names: list[str] | None,
        fractions: dict[str, Any] | None = None,
        columns: list[str] | None = None,
    ) -> None:
        """Warn about a store evaluation cannot use as it stands: empty val/test splits (unless
        configured at 0, as fit_cells' test split is), one class. `columns`: the input columns that
        gave the splits (then nothing was drawn, and only the column can change them)."""
        # the writer's root is the temporary beside the output: name the output itself
        where = self.root.parent / re.sub(r"^\.(.+)\.tmp-[0-9a-f]{8}$", r"\1", self.root.name)
        fractions = fractions or {}
        empty = [
            name
            for name in ("val", "test")
            if name in splits and splits[name]["num_records"] == 0 and fractions.get(name) != 0
        ]
        if empty and columns:
            log.warning(
                "%s: the %s split%s empty: the splits are the input's own (column %s), which marks no "
                "record %s. Mark some %s there, or evaluate with splits.mode=resample (fresh stratified "
                "splits of all records); pretraining cannot hold out an empty data.eval_split",
                where,
                " and ".join(empty),
                " is" if len(empty) == 1 else "s are",
                " / ".join(dict.fromkeys(columns)),
                " or ".join(empty),
                " and ".join(empty),
            )
        elif empty:
            log.warning(
                "%s: the %s split%s empty. Records (or a genome's split.block_size blocks) go to a split "
                "at random with the configured odds, so few of them can leave one empty: a smaller "
                "split.block_size, larger fractions or another split.seed fixes it. Until then pretraining "
                "cannot hold out an empty data.eval_split (val by default), nor `evaluate` with "
                "splits.mode=store use it",
                where,
                " and ".join(empty),
                " is" if len(empty) == 1 else "s are",
            )
        if label_names is not None and "labels" in self.record_fields:
            counts = sum((w.labels_seen for w in self._splits.values()), collections.Counter())
            present = set(counts)
            rare = sorted(
                (n, label_names[i]) for i, n in counts.items() if n < 3 and 0 <= i < len(label_names)
            )
            variants: dict[str, list[str]] = {}
            for name in label_names:
                variants.setdefault(" ".join(str(name).split()).casefold(), []).append(str(name))
            clashes = [names for names in variants.values() if len(names) > 1]
            if clashes:
                log.warning(
                    "%s: labels %s differ only in case or spaces and are separate classes; if they name "
                    "one class, make them one in the label column",
                    where,
                    "; ".join(" and ".join(repr(n) for n in names) for names in clashes[:5]),
                )
            if rare and len(present) >= 2:
                log.warning(
                    "%s: %s ha%s fewer than 3 records: training, validation and test cannot each get "
                    "one, and a seed whose test split holds %s may have trained on none (macro-F1 then "
                    "counts it as 0); merge such classes or drop their records",
                    where,
                    ", ".join(f"class {name!r} ({n})" for n, name in rare[:10])
                    + (f" and {len(rare) - 10} more" if len(rare) > 10 else ""),
                    "s" if len(rare) == 1 else "ve",
                    "it" if len(rare) == 1 else "them",
                )
            single = [
                f"{name} ({label_names[next(iter(seen))]!r} only)"
                for name, writer in self._splits.items()
                if name in ("val", "test")
                and len(seen := set(writer.labels_seen)) == 1
                and 0 <= next(iter(seen)) < len(label_names)
            ]
            if single and len(present) >= 2:
                log.warning(
                    "%s: the %s split%s one class: `evaluate` with splits.mode=store cannot score a "
                    "classifier there (MCC 0); check the split column, or evaluate with splits.mode=resample",
                    where,
                    " and ".join(single),
                    " holds" if len(single) == 1 else "s each hold",
                )
            if len(present) < 2:
                shown = [label_names[i] for i in sorted(present) if 0 <= i < len(label_names)]
                log.warning(
                    "%s: every labelled record has the same class (%s); a classifier cannot be "
                    "evaluated on it -- check the label column",
                    where,
                    ", ".join(map(str, shown)) or "none",
                )


# what files write for a missing label (pandas, R, loom writers): never a class of its own
MISSING_LABELS = frozenset({"", "nan", "none", "null", "na", "<na>"})


def label_strings(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(a column's labels as strings, which records have none). Cluster ids stored as floats (because
    of a NaN) read as the integers they are: 3.0 is "3", not "3.0"; a written NaN is missing."""
    import pandas as pd

    if isinstance(column.dtype, pd.CategoricalDtype) and pd.api.types.is_float_dtype(column.cat.categories):
        column = column.astype(float)
    missing = column.isna().to_numpy()
    values = column.to_numpy(dtype=object)
    if pd.api.types.is_float_dtype(column.dtype):
        present = column.to_numpy(dtype=float)[~missing]
        if np.all(np.isfinite(present)) and np.all(present == np.round(present)):
            values = np.array([None if m else str(int(v)) for v, m in zip(values, missing)], dtype=object)
    strings = np.array(["" if m else str(v) for v, m in zip(values, missing)], dtype=object)
    # not in place: pandas' copy-on-write (the default from pandas 3) hands out read-only arrays
    missing = missing | np.array([v.strip().lower() in MISSING_LABELS for v in strings], dtype=bool)
    return strings, missing


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def label_spellings(names: Iterable[str]) -> list[list[str]]:
    """Groups of class names that are one number written several ways (`1`, `1.0`, `01`, `1e0`): each
    would be a class of its own, and a classifier scored on classes that are one is scored on noise
    (tables joined from files written by different tools). Only plain decimal numbers count, compared
    exactly (`1_0` is a name, not ten; 17-digit ids stay apart); names differing only in case or
    spaces are warned about when the store is written, not refused: those can be meant."""
    groups: dict[decimal.Decimal, list[str]] = {}
    for name in names:
        if _NUMBER.fullmatch(name):
            groups.setdefault(decimal.Decimal(name).normalize(), []).append(name)
    return [sorted(group) for group in groups.values() if len(group) > 1]


def label_order(names: set[str]) -> list[str]:
    """Class names in the order a store numbers them: numerically when every one is an integer
    (cluster ids: 2 before 10; "7" before "007"), else as text."""
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


# --------------------------------------------------------------------------------------------- reading


@dataclass
class Shard:
    """One shard of a split, its arrays memory-mapped."""

    directory: Path
    info: dict[str, Any]
    token_fields: tuple[str, ...]
    record_fields: tuple[str, ...]
    fixed_length: int | None

    def __post_init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self.random = False  # read record by record in no order (TokenSplit.read_randomly)

    def __len__(self) -> int:
        return int(self.info["num_records"])

    def array(self, name: str) -> np.ndarray:
        """A field of this shard, memory-mapped (opened on first use)."""
        if name not in self._arrays:
            entry = self.info["files"][name]
            path = self.directory / entry["name"]
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise IntegrityError(
                    f"token store file {path} is missing or unreadable ({exc}); re-run the prep stage with --overwrite"
                ) from None
            if self.random:
                _random_access(arr)
            self._arrays[name] = arr
        return self._arrays[name]

    @property
    def offsets(self) -> np.ndarray:
        return self.array("offsets")

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Record `i` of this shard: token-aligned fields as arrays, record fields as scalars."""
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        record: dict[str, Any] = {name: self.array(name)[start:stop] for name in self.token_fields}
        record.update({name: self.array(name)[i].item() for name in self.record_fields})
        return record

    def matrix(self, name: str = "tokens") -> np.ndarray:
        """A fixed-length split's token field as a (records, length) view, without copying."""
        if self.fixed_length is None:
            raise ValueError("records have different lengths; use offsets, or pad in the collator")
        return self.array(name).reshape(len(self), self.fixed_length)

    def meta(self) -> pd.DataFrame:
        import pandas as pd

        return pd.read_csv(self.directory / self.info["files"]["meta"]["name"], keep_default_na=False)


class TokenSplit:
    """One split of a store: random access by global index and streaming shard by shard."""

    def __init__(self, directory: Path, entry: dict[str, Any], manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.entry = entry
        self.fixed_length: int | None = entry.get("fixed_length")
        self.token_fields = tuple(manifest["token_fields"])
        self.record_fields = tuple(manifest["record_fields"])
        self.shards = [
            Shard(directory, info, self.token_fields, self.record_fields, self.fixed_length)
            for info in entry["shards"]
        ]
        self._starts = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.entry["num_records"])

    @property
    def num_tokens(self) -> int:
        return int(self.entry["num_tokens"])

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, index within the shard) of a global record index."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for a split of {len(self)} records")
        index %= len(self)
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return shard, index - int(self._starts[shard])

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, local = self.locate(index)
        return self.shards[shard][local]

    def read_randomly(self) -> TokenSplit:
        """Say this split is read record by record in no order (training's batches): the kernel then
        reads the pages a record holds, not its readahead around each (see `_random_access`). A
        sequential pass (evaluation, embedding) is better left with readahead."""
        for shard in self.shards:
            shard.random = True
            for arr in shard._arrays.values():
                _random_access(arr)
        return self

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for shard in self.shards:
            for i in range(len(shard)):
                yield shard[i]

    def lengths(self) -> np.ndarray:
        """Every record's length (int64, one value per record: small next to the tokens)."""
        return np.concatenate([s.lengths() for s in self.shards]) if self.shards else np.zeros(0, np.int64)

    def record_field(self, name: str) -> np.ndarray:
        """A per-record field (e.g. labels) for the whole split, as an in-memory array."""
        if not self.shards:
            return np.zeros(0)
        return np.concatenate([np.asarray(s.array(name)) for s in self.shards])

    def meta(self) -> pd.DataFrame:
        """Per-record metadata of the whole split (ids, coordinates, obs columns)."""
        import pandas as pd

        frames = [s.meta() for s in self.shards]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _check_recorded(manifest_path: Path, text: bytes) -> None:
    """The manifest as the prep stage wrote it (its sha256 in the store's run.json): it names the labels,
    splits and files, and an edit that swapped two label names mislabelled every per-class result while
    each shard still matched it. A store without that record (written before, or by a library call) is
    not checked."""
    from biomask.outputs import OUTPUT_DIGESTS_KEY
    from biomask.provenance import read_run_info

    recorded = ((read_run_info(manifest_path.parent) or {}).get(OUTPUT_DIGESTS_KEY) or {}).get(
        "manifest.json"
    )
    if isinstance(recorded, str) and hashlib.sha256(text).hexdigest() != recorded:
        raise IntegrityError(
            f"{manifest_path} changed since the prep stage wrote it (its sha256 is recorded in run.json); "
            "re-run the prep stage with --overwrite"
        )


class TokenStore:
    """A prepared dataset: manifest, tokenizer and splits. Opening checks the format and file sizes;
    `verify()` checks every shard's sha256 against the manifest."""

    def __init__(self, root: str | os.PathLike, *, check_sizes: bool = True) -> None:
        # check_sizes=False: `verify` (store verify) lists size and digest damage together
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if self.root.is_file():
            raise InputError(
                f"{self.root} is a file; a token store is a folder (the one holding manifest.json): give "
                f"{self.root.parent if self.root.name == 'manifest.json' else 'that folder'}"
            )
        if not self.root.is_dir():
            raise InputError(f"token store {self.root} does not exist; run a prep stage to create it")
        try:
            text = manifest_path.read_bytes()
            self.manifest: dict[str, Any] = json.loads(text.decode("utf-8"))
        except FileNotFoundError:
            raise InputError(
                f"{self.root} is not a token store: it has no manifest.json (a prep stage's output folder has "
                "one; is this the folder above or below it?)"
            ) from None
        except ValueError as exc:
            raise IntegrityError(
                f"{manifest_path} is corrupt ({exc}); re-run the prep stage with --overwrite"
            ) from None
        _check_recorded(manifest_path, text)
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != STORE_FORMAT:
            raise InputError(f"{manifest_path} is not a biomask token store manifest")
        if self.manifest.get("version", 0) > STORE_VERSION:
            raise InputError(
                f"{self.root} was written by a newer biomask (store format {self.manifest['version']}); upgrade biomask"
            )
        try:
            self._check_names(manifest_path)
            list(self._files())  # the manifest's shape, checked here whatever is checked next
            if check_sizes:
                self._check_sizes()
        except (KeyError, TypeError, AttributeError) as exc:  # valid JSON of the wrong shape
            raise IntegrityError(
                f"{manifest_path} is damaged (no {exc} where a store manifest has one); re-run the prep stage "
                "with --overwrite"
            ) from None

    def _check_names(self, manifest_path: Path) -> None:
        """Every folder and file the manifest names is a plain name inside the store: a manifest is
        data, and a path in it (`/home/me/.ssh`, `../x`) must not send a reader, or a checkpoint
        that copies the tokenizer, outside the store."""
        names = [("tokenizer.dir", (self.manifest.get("tokenizer") or {}).get("dir", "tokenizer"))]
        for split, entry in self.manifest["splits"].items():
            names.append(("a split", split))
            names += [
                (f"a file of split {split!r}", info["name"])
                for shard in entry["shards"]
                for info in shard["files"].values()
            ]
        for what, name in names:
            if not _plain_name(name):
                raise IntegrityError(
                    f"{manifest_path} names {what} {name!r}, which is not a plain name inside the store "
                    "(a path elsewhere); the manifest was edited or damaged: re-run the prep stage with --overwrite"
                )

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def modality(self) -> str:
        return self.manifest.get("modality", "unknown")

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / (self.manifest.get("tokenizer") or {}).get("dir", "tokenizer")

    @property
    def label_names(self) -> list[str] | None:
        return self.manifest.get("label_names")

    def split(self, name: str) -> TokenSplit:
        if name not in self.manifest["splits"]:
            raise InputError(
                f"token store {self.root} has no split {name!r} (it has: {', '.join(self.splits)})"
            )
        return TokenSplit(self.root / name, self.manifest["splits"][name], self.manifest)

    def _files(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        for split, entry in self.manifest["splits"].items():
            for shard in entry["shards"]:
                for info in shard["files"].values():
                    yield self.root / split / info["name"], info

    def _damage(self, digests: bool) -> list[str]:
        """Every shard file that is missing, of another size than recorded, or (`digests`) of another
        sha256: all of them, so one repair fixes the store."""
        found = []
        for path, info in self._files():
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                found.append(f"token store file {path} is missing")
                continue
            if size != info["bytes"]:
                found.append(
                    f"token store file {path} has {size} bytes, the manifest records {info['bytes']}: "
                    "it is truncated or was modified"
                )
            elif digests and (digest := sha256_file(path)) != info["sha256"]:
                found.append(
                    f"token store file {path} is corrupted: sha256 {digest[:12]}… does not match the "
                    f"manifest's {info['sha256'][:12]}…"
                )
        return found

    def _raise_damage(self, found: list[str]) -> None:
        if found:
            more = f" (and {len(found) - 1} more: " + "; ".join(found[1:]) + ")" if len(found) > 1 else ""
            raise IntegrityError(f"{found[0]}{more}; re-run the prep stage with --overwrite")

    def _check_sizes(self) -> None:
        """Cheap check on open: every shard file exists with the recorded size."""
        self._raise_damage(self._damage(digests=False))

    def verify(self) -> int:
        """Check every shard file's and the tokenizer's sha256 against the manifest; return the number
        of files checked."""
        count = check_store_tokenizer(self.tokenizer_dir)
        self._raise_damage(self._damage(digests=True))
        self._raise_damage(self._content_damage())
        return count + sum(1 for _ in self._files())

    def _content_damage(self) -> list[str]:
        """What digests cannot vouch for once a manifest is rewritten to match its shards: each file of
        the dtype and length the manifest gives its field (token fields: the shard's tokens; record
        fields: its records), records inside the tokens (offsets from 0, never decreasing, ending at
        the token count), token ids the vocabulary has, labels the manifest names. Such a shard was an
        IndexError deep inside a model, or records silently cut short."""
        vocab = (self.manifest.get("tokenizer") or {}).get("vocab_size")
        n_labels = len(self.label_names or [])
        fields = {**self.manifest["token_fields"], **self.manifest["record_fields"]}
        found = []
        for name in self.splits:
            for shard in self.split(name).shards:
                files = shard.info["files"]

                def where(field: str) -> str:
                    return f"token store file {shard.directory / files[field]['name']}"  # noqa: B023

                n_tokens = int(shard.info.get("num_tokens", shard.array("tokens").size))
                for field, dtype in fields.items():
                    arr = shard.array(field)
                    size = n_tokens if field in self.manifest["token_fields"] else len(shard)
                    if arr.dtype != np.dtype(dtype) or arr.shape[:1] != (size,):
                        found.append(
                            f"{where(field)} holds {arr.shape[0] if arr.ndim else 0:,} {arr.dtype} values, "
                            f"the manifest {size:,} {np.dtype(dtype)} ({field})"
                        )
                if "offsets" in files:
                    offsets = shard.offsets
                    if (
                        offsets.shape != (len(shard) + 1,)
                        or (offsets.size and (offsets[0] != 0 or offsets[-1] != n_tokens))
                        or bool((np.diff(offsets) < 0).any())
                    ):
                        found.append(f"{where('offsets')} does not delimit the shard's records")
                tokens = shard.array("tokens")
                if isinstance(vocab, int) and tokens.size:
                    low, high = _extremes(tokens)
                    if low < 0 or high >= vocab:
                        found.append(
                            f"{where('tokens')} holds token ids outside the vocabulary "
                            f"(0..{vocab - 1}): {low if low < 0 else high}"
                        )
                if "labels" in files and n_labels and len(shard):
                    low, high = _extremes(shard.array("labels"))
                    if low < 0 or high >= n_labels:
                        found.append(
                            f"{where('labels')} holds label {low if low < 0 else high}, not one of the "
                            f"{n_labels} label names"
                        )
        return found


def _extremes(values: np.ndarray, block: int = 1 << 24) -> tuple[int, int]:
    """The least and greatest value of a memory-mapped array, read a block at a time."""
    low, high = None, None
    for start in range(0, values.size, block):
        part = values.reshape(-1)[start : start + block]
        low = int(part.min()) if low is None else min(low, int(part.min()))
        high = int(part.max()) if high is None else max(high, int(part.max()))
    return int(low or 0), int(high or 0)


def _random_access(arr: np.ndarray) -> None:
    """Tell the kernel a shard is read record by record in no order (training batches): its readahead
    otherwise pulls in 128 KiB to 8 MiB around every record touched. Pages are file-backed, so this
    changes no result and little when memory is free; under a memory cap smaller than the store the
    pages are reclaimed and read again, and a cells run under 800 MB re-read ~0.8 GB a step (12x
    slower than with this advice; README, "Data"). Records are read whole either way."""
    handle = getattr(arr, "_mmap", None)
    if handle is not None and hasattr(mmap, "MADV_RANDOM"):
        with contextlib.suppress(OSError, ValueError):
            handle.madvise(mmap.MADV_RANDOM)


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def check_store_tokenizer(directory: str | os.PathLike) -> int:
    """A tokenizer read from a token store's `tokenizer/` is the one its manifest recorded: a changed
    tokenizer.json maps tokens to other ids than the store's records and a model's weights learned.
    Returns how many files were checked (0: not inside a store, or a store that recorded none)."""
    directory = Path(directory)
    manifest_path = directory.parent / "manifest.json"
    if not manifest_path.is_file():
        return 0
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        return 0  # a manifest of something else beside a bare tokenizer folder: not a store of ours
    tokenizer = manifest.get("tokenizer") or {}
    recorded = tokenizer.get("sha256") if isinstance(tokenizer, dict) else None
    if not recorded:
        return 0
    # stores written before "files" was kept record tokenizer.json alone
    expected = {"tokenizer.json": recorded, **(tokenizer.get("files") or {})}
    for name, sha in expected.items():
        path = directory / name
        digest = sha256_file(path) if path.is_file() else "missing"
        if digest != sha:
            raise IntegrityError(
                f"tokenizer file {path} was modified or removed: sha256 {digest[:12]}… does not match the "
                f"manifest's {sha[:12]}…; re-run the prep stage with --overwrite (or restore the file)"
            )
    return len(expected)


def tokenizer_files(directory: Path) -> dict[str, str]:
    """sha256 of every file of a store's tokenizer/ (cells: genes.tsv holds the panel's order and
    medians), recorded in the manifest and checked whenever the tokenizer is read."""
    return {
        str(f.relative_to(directory)): sha256_file(f) for f in sorted(directory.rglob("*")) if f.is_file()
    }


def split_columns(config: dict[str, Any]) -> list[str]:
    """The input columns a prep config took its splits from (cells: split.column; DNA tables: each
    input's split_column)."""
    columns = [(config.get("split") or {}).get("column")]
    columns += [
        (spec or {}).get("split_column") for spec in config.get("inputs") or [] if isinstance(spec, dict)
    ]
    return [str(c) for c in columns if c]
