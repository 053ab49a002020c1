"""Writing embeddings into h5ad files, and what `uns[key]` records about them (`provenance`).

The rest of the file stays as it was, and the output appears whole or not at all.

A file in anndata's current layout (≥ 0.8: the root says `encoding-type: anndata`) is copied byte
for byte to a temporary name beside the output; `obsm/<key>` is then filled one chunk of cells at a
time and `uns/<key>` (the provenance, under the embedding's own key) added, through h5py and anndata's own element writer, and the copy is renamed
into place. Nothing else in the file is rewritten, so X, layers, raw, obs, var and every other
obsm/uns entry are exactly the input's, and memory stays bounded by the chunk.

Files in the legacy layout (anndata < 0.8, no root encoding attributes — e.g. the registry's
pbmc3k and pbmc68k_reduced) cannot take new-layout elements safely; they are read into memory with
anndata, given the new entries and written again in the current layout (a warning says so).
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from biomask.errors import InputError
from biomask.provenance import code_version, environment, sha256_file

log = logging.getLogger(__name__)


def is_current_layout(path: str | os.PathLike) -> bool:
    with h5py.File(path, "r") as handle:
        return handle.attrs.get("encoding-type") == "anndata"


def h5_safe(value: Any) -> Any:
    """A value anndata can store in `uns`: None becomes "none", nested dicts and lists are cleaned, and
    lists of mixed types become strings."""
    if value is None:
        return "none"
    if isinstance(value, dict):
        return {str(k): h5_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [h5_safe(v) for v in value]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items) and items:
            return np.asarray(items)
        return np.asarray([str(v) for v in items], dtype=object) if items else np.zeros(0)
    if isinstance(value, (bool, int, float, str, np.ndarray, np.generic)):
        return value
    return str(value)


def provenance(
    model: Any, *, pooling: str, layer: int, key: str, max_length: int, extra: dict[str, Any]
) -> dict[str, Any]:
    """What `uns[key]` records about an embedding."""
    info = model.checkpoint_info
    directory = Path(model.checkpoint_dir)
    masking = info.get("masking") or {}
    return {
        "checkpoint": str(directory.resolve()),  # absolute: the record outlives the working directory
        "checkpoint_weights_sha256": info.get("weights_sha256"),
        "checkpoint_config_sha256": sha256_file(directory / "config.json"),
        "tokenizer_sha256": (info.get("tokenizer") or {}).get("sha256"),
        "modality": info.get("modality"),
        "layer": layer,
        # what the vector is: a panel transformer returns its cell token whatever pooling was asked
        "pooling": getattr(model, "pooling_used", lambda asked: asked)(pooling),
        # the profile autoencoder's latent at unit length (model.embed_norm), or as the layer gives it
        "normalisation": "l2" if getattr(model, "normalises", lambda _: False)(layer) else "none",
        "key": key,
        "max_length": max_length,
        "masking_scheme": masking.get("scheme"),
        "masking": json.dumps(masking, sort_keys=True),
        "training_steps": (info.get("training") or {}).get("steps"),
        # a continued checkpoint: the one it started from, and the steps behind it as well
        **(
            {"init_from": init["path"], "init_from_steps": init.get("steps") or 0}
            if (init := info.get("init_from"))
            else {}
        ),
        "code": code_version(),
        # the library versions and threads the vectors were computed with (JSON): an AnnData from
        # Python or an .h5ad output has no run.json that would say them
        "environment": json.dumps(
            {
                k: v
                for k, v in environment().items()
                if k in ("python", "packages", "torch_threads", "cuda_device")
            },
            sort_keys=True,
        ),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


DIGEST_KEY = "embedding_sha256"  # in uns[key]: the vectors as biomask embed wrote them


def embedding_digest(vectors: Any, rows: int = 65_536) -> str:
    """sha256 of an embedding (its shape, then its float32 rows), of an array or an HDF5 dataset read
    in blocks of `rows`: a million cells' vectors are hashed without holding them twice."""
    digest = hashlib.sha256(repr(tuple(vectors.shape)).encode())
    for start in range(0, vectors.shape[0], rows):
        # little-endian, whatever the machine: the digest is of the values, not of this CPU's layout
        digest.update(np.ascontiguousarray(vectors[start : start + rows], dtype="<f4").tobytes())
    return digest.hexdigest()


def changed_embedding(h5ad: str | os.PathLike, key: str) -> bool:
    """Whether the .h5ad's obsm[key] differs from the vectors biomask embed recorded the digest of
    (False where none was recorded: written before 2026-12-07, or by another tool)."""
    with h5py.File(h5ad, "r") as handle:
        node = handle.get(f"uns/{key}/{DIGEST_KEY}")
        recorded = node[()] if isinstance(node, h5py.Dataset) else None
        vectors = handle.get(f"obsm/{key}")
        if recorded is None:
            return False
        if not isinstance(vectors, h5py.Dataset):
            return True
        recorded = recorded.decode() if isinstance(recorded, bytes) else str(recorded)
        return embedding_digest(vectors) != recorded


def check_key(key: str, obsm_keys: Any, uns: Any, where: str) -> None:
    """Refuse to put the embedding over an obsm entry biomask did not write (X_pca, X_umap, a
    colleague's scVI latent), or its record over a uns entry of the user's: only an embedding biomask
    recorded in uns[key] is replaced."""
    if "/" in key:
        raise InputError(
            f"key {key!r}: an obsm key cannot hold '/' (an .h5ad keeps it as nested groups that anndata "
            "cannot read back); choose another key, e.g. X_biomask"
        )
    if not key.strip() or key != key.strip():
        raise InputError(
            f"key {key!r}: an obsm key must be a name without leading or trailing spaces (an empty key "
            "writes an .h5ad that anndata cannot read back); choose another key, e.g. X_biomask"
        )
    record = uns.get(key) if hasattr(uns, "get") else None
    ours = record is not None and hasattr(record, "keys") and "checkpoint_weights_sha256" in record
    if key not in obsm_keys:
        if record is not None and not ours:  # the record goes to uns[key]: never over the user's entry
            raise InputError(
                f"{where}: uns[{key!r}] exists and biomask did not write it; the embedding's record would "
                f"replace it. Choose another key, or remove uns[{key!r}] first if it should go"
            )
        return
    if not ours:
        # e.g. vectors of biomask's copied in by hand (per sample) without their record: X_biomask itself
        other = next(
            k for k in ("X_biomask", "X_biomask_2", "X_biomask_3", f"{key}_biomask") if k not in obsm_keys
        )
        raise InputError(
            f"{where}: obsm[{key!r}] exists and biomask did not write it (no embedding record in "
            f"uns[{key!r}]); the embedding would replace it. Choose another key (e.g. {other}), or "
            f"remove obsm[{key!r}] first if it should go"
        )


def room_to_grow(path: Path, size: int) -> None:
    """Raise the file system's own OSError (ENOSPC, EDQUOT, EFBIG: a full disk, a quota, a file-size
    limit) if the file at `path` cannot grow by `size` bytes, by reserving them past its end and giving
    them back. Where the file system cannot reserve (no posix_fallocate: macOS; some network file
    systems), nothing is checked."""
    if not hasattr(os, "posix_fallocate") or size <= 0:
        return
    length = path.stat().st_size
    fd = os.open(path, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, length, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from None
    finally:
        try:
            os.ftruncate(fd, length)
        finally:
            os.close(fd)


class EmbeddingWriter:
    """Fills `obsm[key]` of a copy of `source` chunk by chunk, then adds the provenance as `uns[key]`.

    with EmbeddingWriter(source_h5ad, tmp_path, n_obs, dim, key="X_biomask") as writer:
        writer.write(start, vectors)          # rows start .. start + len(vectors)
        writer.finish(uns={...})
    """

    def __init__(self, source: Path, target: Path, n_obs: int, dim: int, *, key: str) -> None:
        self.source, self.target, self.key = source, target, key
        self.n_obs, self.dim = n_obs, dim
        self.streaming = is_current_layout(source)
        self.handle: h5py.File | None = None
        self.buffer: np.ndarray | None = None
        self.filled = 0

    def __enter__(self) -> EmbeddingWriter:
        if self.streaming:
            shutil.copyfile(self.source, self.target)
            # the vectors, their chunk index and the record: refused here as a plain OSError if the
            # disk cannot hold them, since HDF5 failing part-way crashed the interpreter (exit 139)
            room_to_grow(self.target, self.n_obs * self.dim * 4 * 102 // 100 + (1 << 20))
            self.handle = h5py.File(self.target, "r+")
            obsm = self._group(self.handle, "obsm")
            if self.key in obsm:
                del obsm[self.key]  # embedding again under the same key replaces the old one
            dataset = obsm.create_dataset(
                self.key,
                shape=(self.n_obs, self.dim),
                dtype=np.float32,
                chunks=(max(1, min(self.n_obs, 4096)), self.dim) if self.n_obs else None,
            )
            dataset.attrs["encoding-type"] = "array"
            dataset.attrs["encoding-version"] = "0.2.0"
        else:
            log.warning(
                "%s uses anndata's legacy (< 0.8) layout: it is read into memory and written again in the "
                "current layout (re-save it with a recent anndata to stream large files)",
                self.source,
            )
            self.buffer = np.empty((self.n_obs, self.dim), dtype=np.float32)
        return self

    @staticmethod
    def _group(handle: h5py.File, name: str) -> h5py.Group:
        if name not in handle:
            group = handle.create_group(name)
            group.attrs["encoding-type"] = "dict"
            group.attrs["encoding-version"] = "0.1.0"
        return handle[name]

    def write(self, start: int, vectors: np.ndarray) -> None:
        stop = start + vectors.shape[0]
        if self.handle is not None:
            self.handle["obsm"][self.key][start:stop] = vectors
        else:
            assert self.buffer is not None
            self.buffer[start:stop] = vectors
        self.filled = max(self.filled, stop)

    def finish(self, uns: dict[str, Any]) -> None:
        if self.filled != self.n_obs:
            raise RuntimeError(f"embedded {self.filled} of {self.n_obs} cells")
        if self.handle is not None:
            from anndata.io import write_elem

            uns = {**uns, DIGEST_KEY: embedding_digest(self.handle["obsm"][self.key])}
            group = self._group(self.handle, "uns")
            if self.key in group:
                del group[self.key]  # embedding again under the same key replaces its record
            write_elem(group, self.key, h5_safe(uns))
            self.handle.close()
            self.handle = None
            return
        import anndata

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anndata's notes about converting the legacy layout
            adata = anndata.read_h5ad(self.source)
        adata.obsm[self.key] = self.buffer
        adata.uns[self.key] = h5_safe({**uns, DIGEST_KEY: embedding_digest(self.buffer)})
        # what adata.write_h5ad writes (the same groups, datasets and attributes), built in memory and
        # then written as plain bytes: on a full disk HDF5's own writes failed in every object it
        # freed (hundreds of lines of tracebacks) and its close crashed the interpreter (exit 139)
        adata.strings_to_categoricals()
        if adata.raw is not None:
            adata.strings_to_categoricals(adata.raw.var)
        from anndata.io import write_elem

        image = io.BytesIO()
        with h5py.File(image, "w") as handle:
            write_elem(handle, "/", adata)
        try:
            with open(self.target, "wb") as out:
                out.write(image.getbuffer())
        except OSError as exc:  # a write's error names no file
            raise OSError(exc.errno, exc.strerror, str(self.target)) from None

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
