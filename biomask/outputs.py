"""Output directories that are either complete or absent, and never silently replaced.

Every stage writes into a temporary sibling directory and renames it into place at the end, so a
crash, a bad input or Ctrl-C leaves nothing half-written. Before writing, `check_output` decides:

- the directory does not exist                         -> run;
- it exists and its run.json has the same fingerprint -> reuse it (nothing to do);
- it exists with another fingerprint, or is not ours  -> refuse, unless `overwrite=True`.

`--overwrite` never deletes what biomask did not write: an output that contains (or lies inside) one
of the run's inputs is always refused, and so is a directory without biomask's run.json or one that
holds files its run.json does not list. A mount point cannot be an output (it cannot be renamed).
Stale temporaries of the same output (`.NAME.tmp-XXXXXXXX`, `.NAME.old-XXXXXXXX`, left by a killed
run) are removed when the next write of that output starts (a `.tmp-`) or succeeds (an `.old-`, a
previous output a kill caught mid-swap), and by a reuse — never a `.tmp-` directory a live run holds (its writer keeps a flock on it); nothing else beside the output is touched.

Every stage command holds `hold_output`'s flock on `.NAME.lock` beside its output for the run
(`cli._run_stage`; pretrain and fit_cells take it themselves, so their Python calls do too): a second
run into the same output, from any process, kernel or host sharing the file system, is refused with
the holder's pid and host.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import stat
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

import yaml

from biomask.config import config_diff, flatten, load_recorded_yaml
from biomask.errors import (
    EnvironmentIOError,
    InputError,
    OutputBusyError,
    OutputExistsError,
    StaleOutputError,
    describe_os_error,
    is_environment_error,
    numba_cache_error,
)
from biomask.models.checkpoint_config import CONFIG_SHA256
from biomask.provenance import read_run_info, sha256_file, written_by_biomask

log = logging.getLogger(__name__)

# What run.json lists as the files a stage wrote, so --overwrite can tell them apart from files added
# later: FILES_KEY the top-level names (outputs written before 2026-12-05 have only these),
# FILE_TREE_KEY every file, as paths relative to the output.
FILES_KEY = "files"
FILE_TREE_KEY = "file_tree"
# The sha256 of an output's smaller files (its results: metrics.json, report.md, figures, a store's
# manifest), checked before it is reused or read: an edited result is never passed on as biomask's.
# Bounded, so that checking a large output (a store's shards, which its manifest covers) stays cheap.
OUTPUT_DIGESTS_KEY = "output_sha256"
DIGEST_BUDGET_BYTES = 8 << 20


def file_tree(root: Path) -> list[str]:
    """Every file (or link) under `root`, as sorted relative POSIX paths; directories are not listed."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir() or p.is_symlink())


def output_digests(root: Path) -> dict[str, str]:
    """The sha256 of `root`'s files, smallest first, up to DIGEST_BUDGET_BYTES (run.json, written
    after them, aside)."""
    files = [(root / rel) for rel in file_tree(root) if rel != "run.json"]
    files = sorted((p for p in files if p.is_file() and not p.is_symlink()), key=lambda p: p.stat().st_size)
    digests, spent = {}, 0
    for path in files:
        spent += path.stat().st_size
        if spent > DIGEST_BUDGET_BYTES:
            break
        digests[path.relative_to(root).as_posix()] = sha256_file(path)
    return digests


def changed_outputs(root: Path, info: dict | None, names: Sequence[str] | None = None) -> list[str]:
    """The files of an output (all, or `names`) that no longer match the sha256 its run.json records."""
    recorded = (info or {}).get(OUTPUT_DIGESTS_KEY)
    if not isinstance(recorded, dict):
        return []  # written before the digests were kept
    changed = []
    for rel, digest in recorded.items():
        if names is not None and rel not in names:
            continue
        path = root / str(rel)
        if not path.is_file() or path.is_symlink() or sha256_file(path) != digest:
            changed.append(str(rel))
    return sorted(changed)


def refuse_changed(path: Path, info: dict | None) -> None:
    """An output of this very config whose recorded files changed is stale, not this stage's result."""
    changed = changed_outputs(path, info)
    if changed:
        raise StaleOutputError(
            f"output directory {path}: {', '.join(changed[:3])}{' …' if len(changed) > 3 else ''} changed "
            "or went missing since biomask wrote it (the sha256 run.json records no longer matches), so "
            "it is not reused as this stage's result. Pass --overwrite to compute it again, or choose "
            "another output path"
        )


def foreign_files(root: Path, info: dict, ours: Callable[[str], bool] = lambda name: False) -> list[str]:
    """Files under `root` that its run.json does not list as written (nor `ours` names as the
    stage's own): what --overwrite would delete of someone else's."""
    recorded = {"config.yaml", "run.json"}
    if isinstance(info.get(FILE_TREE_KEY), list):
        recorded |= set(info[FILE_TREE_KEY])
        return [f for f in file_tree(root) if f not in recorded and not ours(f)]
    try:
        written: int | None = (root / "run.json").stat().st_mtime_ns
    except OSError:
        written = None

    def newer(f: str) -> bool:
        # a stage writes run.json last, so a file newer than it was added (or changed) after
        return written is not None and (root / f).lstat().st_mtime_ns > written

    if isinstance(info.get(FILES_KEY), list):  # an older output (2026-12-02 to -05): its top-level names
        recorded |= set(info[FILES_KEY])
        top = [p.name for p in root.iterdir() if p.name not in recorded and not ours(p.name)]
        # inside the folders it lists (a store's train/, tokenizer/) only the time tells: a file
        # added there once went with the folder
        inside = [
            f
            for f in file_tree(root)
            if "/" in f and f.split("/")[0] in recorded and not ours(f) and newer(f)
        ]
        return sorted(top + inside)
    # written before biomask listed its files (2026-12-02)
    return [f for f in file_tree(root) if not ours(f) and newer(f)]


def describe_foreign(root: Path, foreign: list[str], *, listed: bool = True) -> str:
    """The refusal of `--overwrite` over `foreign` files. `listed=False`: an output whose run.json
    does not list every file it wrote (before 2026-12-06: none, or its top-level names), where what
    is not listed is told by being newer than run.json — which a copy that did not keep file times
    (cp -r, rsync without -t, an unpacked archive) makes true of biomask's own files too."""
    shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
    how = (
        ""
        if listed
        else " — not listed in its run.json, or newer than it (biomask writes run.json last): the output "
        "is older than biomask's lists of every file it writes. If it was copied without its file times, "
        "these may be biomask's own: check, then remove the output yourself"
    )
    return (
        f"output directory {root} holds files biomask did not write ({shown}{how}); --overwrite would "
        "delete them. Move them away or choose another output path"
    )


def check_inputs_outside(path: str | os.PathLike, inputs: list[str | os.PathLike]) -> None:
    """Refuse an output that is, contains, or lies inside one of the run's inputs — as spelled, and
    where links lead: an output named by a link is written into the folder it points at
    (`through_link`), so `--overwrite` through a link to the input's own store replaced it."""
    given = Path(os.path.abspath(Path(path).expanduser()))
    for item in inputs:
        spelled = Path(os.path.abspath(Path(item).expanduser()))
        resolved = (Path(os.path.realpath(given)), Path(os.path.realpath(spelled)))
        for out, inp in dict.fromkeys([(given, spelled), resolved]):  # once where no link is involved
            _check_apart(out, inp)


def _check_apart(out: Path, inp: Path) -> None:
    if out == inp or out in inp.parents:
        raise InputError(
            f"output {out} contains the run's input {inp}; writing (or --overwrite) would replace it. "
            "Choose an output path that does not hold the input"
        )
    if inp in out.parents and inp.is_dir():
        raise InputError(
            f"output {out} lies inside the run's input directory {inp}; choose an output path outside it"
        )


def check_output(
    path: str | os.PathLike,
    fingerprint: str,
    *,
    overwrite: bool = False,
    config: dict | None = None,
    inputs: list[str | os.PathLike] = (),  # type: ignore[assignment]
    stage: str | None = None,
    non_semantic: Sequence[str] = (),
    input_records: Sequence[dict] = (),
) -> bool:
    """True if `path` already holds this exact result (same fingerprint) and can be reused.

    Raises `OutputExistsError` if `path` holds something else and `overwrite` is false.
    With `overwrite=True` it returns False, so the caller recomputes and replaces the output --
    unless the output holds files biomask did not write (then it refuses, naming them).
    `config` (the new resolved config) lets a refusal list the keys that changed; `inputs` are the
    paths the run reads (an output that contains one is refused); `stage`: the stage writing it (the
    output of another stage is never replaced, --overwrite or not); `non_semantic`: keys that do not
    change results, left out of the changed keys a refusal lists; `input_records`: the inputs as the
    new run.json would record them (name, path, digest), so a refusal with no changed key names the
    input whose data differ.
    """
    path = Path(path)
    check_inputs_outside(path, list(inputs))
    if os.path.ismount(path):
        raise InputError(
            f"output {path} is a mount point: biomask writes an output beside it and renames it into "
            "place, which a mount point does not allow; choose a folder inside it"
        )
    if not path.exists():
        return False
    if overwrite:  # a link is replaced in the folder it points at (`through_link`), the link kept
        _check_overwritable(path, config)
        check_same_stage(path, read_run_info(path), stage)
        return False
    if not path.is_dir():
        raise OutputExistsError(f"output {path} exists and is not a directory; choose another output path")
    info = read_run_info(path)
    if not written_by_biomask(info):  # no run.json, or someone else's
        if any(path.iterdir()):
            raise OutputExistsError(
                f"output directory {path} is not empty and was not written by biomask (no run.json); "
                "choose another output path, or move its contents away" + record_gone(path, config)
            )
        return False
    check_same_stage(path, info, stage)
    if info.get("fingerprint") == fingerprint:
        refuse_changed(path, info)
        # a run killed between its rename and its clean-up left a temporary that no write will
        # now remove (this output is reused from here on)
        remove_stale_temporaries(path)
        return True
    details = _describe_difference(path, config, non_semantic, input_records)
    raise StaleOutputError(
        f"output directory {path} holds results of a different config or input{details}\n"
        "Pass --overwrite to replace them, or choose another output path."
    )


def check_same_stage(path: Path, info: dict | None, stage: str | None) -> None:
    """Refuse an output another stage wrote: a typo in `output=` must not replace a store or a run."""
    if stage is None or not written_by_biomask(info) or info["stage"] == stage:  # type: ignore[index]
        return
    raise OutputExistsError(
        f"output directory {path} holds the output of another stage ({info['stage']}, by its run.json), "  # type: ignore[index]
        f"not of {stage}; --overwrite only replaces an output of the same stage. Choose another output path"
    )


def _check_overwritable(path: Path, config: dict | None = None) -> None:
    """--overwrite replaces only what biomask wrote: refuse a directory with anything else in it."""
    if not path.is_dir():  # stage outputs are directories: a file here is someone else's
        raise OutputExistsError(
            f"output {path} exists and is a file biomask did not write; --overwrite only replaces "
            "biomask's own outputs. Choose another output path"
        )
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    info = read_run_info(path)
    if not written_by_biomask(info):
        raise OutputExistsError(
            f"output directory {path} is not empty and was not written by biomask (no run.json of "
            "biomask's); --overwrite only replaces biomask's own outputs. Move its contents away or "
            "choose another path" + record_gone(path, config)
        )
    foreign = foreign_files(path, info)
    if foreign:
        raise OutputExistsError(
            describe_foreign(path, foreign, listed=isinstance(info.get(FILE_TREE_KEY), list))
        )


_DIGESTS = ("sha256", "fingerprint")


def input_changes(recorded: object, new: Sequence[dict]) -> list[str]:
    """The inputs whose data differ from those an output recorded, matched by name (and order among
    inputs of one name), each as `name: old path -> new path (old digest -> new digest)`, or
    `name: path, changed since (...)` for data rewritten in place. A path spelled
    otherwise with the same digest is the same input and is not listed; an input the output did not
    record a digest for cannot be compared and is left out."""
    old = [i for i in recorded if isinstance(i, dict)] if isinstance(recorded, list) else []

    def by_name(entries: Sequence[dict]) -> dict[tuple[str, int], dict]:
        seen: dict[str, int] = {}
        keyed = {}
        for entry in entries:
            name = str(entry.get("name", "input"))
            keyed[(name, seen.get(name, 0))] = entry
            seen[name] = seen.get(name, 0) + 1
        return keyed

    def digest(entry: dict) -> str | None:
        return next((str(entry[k]) for k in _DIGESTS if entry.get(k)), None)

    before = by_name(old)
    lines = []
    for key, entry in by_name(list(new)).items():
        was = before.get(key)
        if was is None or digest(was) is None or digest(entry) is None or digest(was) == digest(entry):
            continue
        moved = was.get("path") != entry.get("path")
        where = (
            f"{was.get('path')} -> {entry.get('path')}" if moved else f"{entry.get('path')}, changed since"
        )
        same_data = was.get("content_sha256") and was.get("content_sha256") == entry.get("content_sha256")
        lines.append(
            f"{key[0]}: {where} ({digest(was)[:12]} -> {digest(entry)[:12]})"
            + (
                "; its data are the same (content_sha256 unchanged): only settings its manifest records "
                "changed, such as prep's block_size or num_workers after an --overwrite. The output is "
                "fingerprinted by the manifest, so it counts as another input: --overwrite reruns it"
                if same_data
                else ""
            )
        )
    for key, entry in by_name(list(new)).items():
        # a checkpoint of the same weights whose config.json changed (retrained or exported again by
        # other code: what it embeds may differ, e.g. model.embed_norm)
        was = before.get(key)
        configs = (was or {}).get(CONFIG_SHA256), entry.get(CONFIG_SHA256)
        if was and digest(was) == digest(entry) and all(configs) and configs[0] != configs[1]:
            lines.append(
                f"{key[0]}: {entry.get('path')}, the same weights with another config.json "
                f"({str(configs[0])[:12]} -> {str(configs[1])[:12]}): retrained or exported again (it "
                "records the code version too)"
            )
    return lines


def describe_input_changes(recorded: object, new: Sequence[dict]) -> str:
    """`input_changes` as the tail of a refusal whose config keys are all the same ('' if none found)."""
    lines = input_changes(recorded, new)
    return ";\nthe same config keys, other input data:\n  " + "\n  ".join(lines) if lines else ""


def _describe_difference(
    path: Path, new: dict | None, non_semantic: Sequence[str] = (), new_inputs: Sequence[dict] = ()
) -> str:
    """The config keys that changed, when the old resolved config can be compared with the new one;
    with none changed, the inputs whose data did (`new_inputs`: the records the new run.json would hold)."""
    old_file = path / "config.yaml"
    if new is None or not old_file.exists():
        return ""
    try:
        old = load_recorded_yaml(old_file.read_text(encoding="utf-8"), str(old_file)) or {}
    except yaml.YAMLError:
        return ""
    # a key that does not change results (num_workers, batch_size) is not what stands in the way
    changes = config_diff(old, new, ignore=non_semantic)
    if not changes:
        named = describe_input_changes((read_run_info(path) or {}).get("inputs"), new_inputs)
        if named:
            return named
        # a key older outputs lacked, given on both sides at values that behave as its absence did
        # (evaluate's device auto / cpu): a change of config, named rather than blamed on the data
        a, b = flatten(old), flatten(new)
        changes = [
            line
            for line in config_diff(old, new, non_semantic, as_added=False)
            if (key := line.split(":", 1)[0]) in a and key in b
        ]
    if not changes:
        return " (same config, different input data or format version)"
    shown = "\n  ".join(changes[:20])
    more = f"\n  ... and {len(changes) - 20} more" if len(changes) > 20 else ""
    return f"; changed keys:\n  {shown}{more}"


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporaries of `path` that a killed run left beside it: `.NAME.tmp-XXXXXXXX` and
    `.NAME.old-XXXXXXXX` (biomask's own naming, 8 hex digits) -- never anything else."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|old)-[0-9a-f]{{8}}$")
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return []
    return sorted(p for p in siblings if pattern.match(p.name))


def lock_folder(directory: Path) -> tuple[int | None, bool]:
    """(a descriptor holding an exclusive lock on `directory` while it stays open, or None; whether
    another process holds that lock). The kernel drops the lock when its process ends, killed or
    not, so a locked temporary is one a live run is still writing. On a file system without flock
    no lock is had and none is held: no temporary counts as live."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return None, False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        return None, isinstance(exc, BlockingIOError)
    return fd, False


def _being_written(item: Path) -> bool:
    """A `.tmp-` directory that another live process holds (see `_lock`)."""
    if ".tmp-" not in item.name or not item.is_dir() or item.is_symlink():
        return False
    fd, busy = lock_folder(item)
    if fd is not None:
        os.close(fd)  # closing drops the lock this call took
    return busy


def remove_stale_temporaries(path: Path, keep: Path | None = None) -> None:
    """Remove what killed runs of `path` left beside it; never a temporary a live run is writing."""
    for stale in stale_temporaries(path):
        if stale != keep and not _being_written(stale):
            remove_leftover(stale)


def remove_leftover(item: Path) -> None:
    """Remove a leftover of biomask's own; one the file system will not let go (another user's files
    in it, a read-only part) is said, with its size, rather than kept silently: an --overwrite of
    someone else's output left a hidden copy of all of it beside the new one."""
    if item.is_dir() and not item.is_symlink():
        shutil.rmtree(item, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            item.unlink(missing_ok=True)
    if item.exists() or item.is_symlink():
        size = sum(p.stat().st_size for p in item.rglob("*") if p.is_file()) if item.is_dir() else 0
        log.warning(
            "could not remove %s (%s; files this user cannot delete?): it is biomask's leftover of an "
            "earlier output; remove it yourself, or ask its owner to",
            item,
            f"{size / 2**20:,.1f} MB left" if size else "left",
        )


def through_link(path: str | os.PathLike) -> Path:
    """The folder an output named by a symbolic link is written into: the link's target (which the
    writer makes if it does not exist yet). A workflow engine's task links a stable folder into its work folder so
    that a retry resumes there; the output was set aside and replaced by the link itself — a new
    folder in the work folder, the target left empty — and a link to a folder not made yet failed
    after all the work. The link stays, pointing at the written folder."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path`, on failure it is removed.

    A file-system refusal (disk full, read-only, permission denied) becomes an `EnvironmentIOError`
    naming the path (exit 2); the temporary is removed either way, so nothing half-written remains.
    """
    path = through_link(path)
    token = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{token}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise EnvironmentIOError(f"cannot create the output {path}: " + describe_os_error(exc)) from None
    held, _ = lock_folder(tmp)  # so that another run's clean-up leaves it alone while this one writes
    # a killed run's temporary is as large as the output: left until this write ends, it would hold
    # the space this one needs (a rerun after a SIGKILL on a nearly full disk could never succeed).
    # A `.old-` (a previous output a kill caught mid-swap) goes only once this write has succeeded.
    for stale in stale_temporaries(path):
        if ".tmp-" in stale.name and stale != tmp and not _being_written(stale):
            remove_leftover(stale)
    try:
        yield from _write_and_swap(path, tmp, token)
    finally:
        if held is not None:
            os.close(held)


def _write_and_swap(path: Path, tmp: Path, token: str) -> Iterator[Path]:
    try:
        yield tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_environment_error(exc):
            if numba_cache_error(exc):  # not the output's folder: numba's cache, elsewhere
                raise EnvironmentIOError(f"nothing was written to {path}: {numba_cache_error(exc)}") from exc
            raise EnvironmentIOError(
                f"writing the output {path} failed, nothing was written: " + describe_os_error(exc, str(tmp))
            ) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.parent / f".{path.name}.old-{token}"
    try:
        if path.exists():
            path.rename(old)
        tmp.rename(path)
    except OSError as exc:
        if old.exists() and not path.exists():
            old.rename(path)  # put the previous output back
        shutil.rmtree(tmp, ignore_errors=True)
        raise EnvironmentIOError(
            f"cannot move the new output into {path}: " + describe_os_error(exc)
        ) from None
    remove_stale_temporaries(path, keep=tmp)  # ours (old), and leftovers of killed runs of this output


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside `path` (same folder, so the rename is atomic) that replaces `path` when
    the block succeeds and is removed when it fails. A block that deletes the temporary itself leaves
    `path` as it was (e.g. when the new content turns out identical)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file (FileExistsError), read-only, no permission
        if isinstance(exc, FileExistsError) or not path.parent.is_dir():
            exc = NotADirectoryError(
                errno.ENOTDIR, "a part of the path is a file, not a folder", str(path.parent)
            )
        raise EnvironmentIOError(f"cannot create {path}: " + describe_os_error(exc)) from None
    old_mode = protected_mode(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if tmp.exists():
            if old_mode is not None:  # never wider than the file it replaces (a private 0600 .h5ad)
                new_mode = stat.S_IMODE(tmp.stat().st_mode)
                if new_mode & ~old_mode:
                    os.chmod(tmp, new_mode & old_mode)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def protected_mode(path: Path) -> int | None:
    """The permission bits of the file `path` names (None: none there), refusing one its permissions
    protect: a rename into a writable folder replaces a write-protected file (even another user's) as
    easily as any, so `chmod a-w` would not have kept biomask from replacing the user's data."""
    try:
        info = path.lstat()
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o222:
        raise EnvironmentIOError(
            f"{path} is write-protected (mode {mode:04o}): biomask does not replace a file its permissions "
            "protect; make it writable (chmod u+w) if it should be replaced, or write to another path"
        )
    effective = os.access in os.supports_effective_ids  # the uid that writes (a setuid or seteuid process)
    if not os.access(path, os.W_OK, effective_ids=effective):
        mine = info.st_uid == os.geteuid()
        whose, remedy = (
            ("", "make it writable (chmod u+w)") if mine else (": it is another user's", "ask its owner")
        )
        raise EnvironmentIOError(
            f"{path} (mode {mode:04o}) is not writable by this user{whose}; biomask does not replace a file "
            f"its permissions protect: {remedy} if it should be replaced, or write to another path"
        )
    return mode


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file under a temporary name, then rename it into place."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def open_own(path: str | os.PathLike, flags: int) -> int:
    """A descriptor of a file biomask writes in place beside or inside its outputs (a lock, a log it
    appends to), never opened through a symbolic link someone left at that name: it would truncate or
    append to the file the link points at (the user's, anywhere), or create one outside the run
    folder. InputError naming the path, before anything is written. Hard links are let be: a run
    folder snapshotted with `cp -al` or rsnapshot has them everywhere. Created as open() creates
    (0666 less the umask: a group-shared run folder stays writable by the group)."""
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO at the name is refused below rather than waited on for a reader
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(
                f"{path} is a symbolic link (to {os.readlink(path)}); biomask writes this file itself and "
                "never through a link, which would write to the file it points at: remove the link and run "
                "again"
            ) from None
        if exc.errno != errno.ENXIO:  # ENXIO: a FIFO nobody reads, opened for writing
            raise
        fd = None
    if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd is not None:
            os.close(fd)
        raise InputError(
            f"{path} is not a regular file; biomask writes this file itself and would write to whatever "
            "it is: remove it and run again"
        )
    os.set_blocking(fd, True)
    return fd


def append_own(path: str | os.PathLike) -> TextIO:
    """`open(path, "a")` (text, line-buffered) for a file biomask appends to, through `open_own`."""
    return os.fdopen(
        open_own(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "a", buffering=1, encoding="utf-8"
    )


class OutputLock:
    """An exclusive flock on `.NAME.lock` beside an output, held while its open file stays open. The
    kernel drops it when the process ends, killed or not, so a dead run never blocks the next one."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    def release(self) -> None:
        if self._fd is None:
            return
        # removed while still held: a run waiting on this file then finds it gone and takes a new one
        # (see hold_output), rather than locking a file nobody else can find
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_file(path: str | os.PathLike) -> Path:
    """The lock of output `path`: beside it, not inside, because a fresh run replaces the folder
    itself (a lock inside would go with the old one) and a refused run must write nothing into it.
    Beside the real folder: two runs given it through different links take the same lock."""
    real = Path(os.path.realpath(path))
    return real.parent / f".{real.name}.lock"


def hold_output(path: str | os.PathLike, stage: str) -> OutputLock | None:
    """Lock output `path` for this process's run of `stage`, or raise `OutputBusyError` naming the run
    that holds it (another process, host or notebook kernel, or another call in this process). None
    where the file system has no locks (some NFS mounts): a warning, and only the older pid check of
    the caller (if any) guards the output."""
    lock = lock_file(path)
    for _ in range(20):  # a holder removes the file as it lets go: a lock on that file would be no lock
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = _open_lock(lock)
        except OSError as exc:
            if exc.errno in (
                errno.EACCES,
                errno.EPERM,
                errno.EROFS,
                errno.ENOSPC,
                errno.ENOTDIR,
                errno.EEXIST,
            ):
                # the output's folder refuses a file: the stage would find it only after all its work
                raise EnvironmentIOError(
                    f"cannot write output {Path(path)}: {describe_os_error(exc, str(lock.parent))}; choose "
                    "an output in a folder you can write"
                ) from None
            _unguarded(path, lock, exc)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            current = _same_file(fd, lock)
            os.close(fd)
            if not current:
                continue
            raise OutputBusyError(
                f"output {Path(path)} is being written by another run that is still going ({holder}; it "
                f"holds {lock}): two runs into one output would delete each other's files, so nothing "
                "was written. Wait for that run to finish or stop it (a notebook kernel: interrupt or "
                "restart it), or choose another output path"
            ) from None
        except OSError as exc:
            os.close(fd)
            _unguarded(path, lock, exc)
            return None
        if not _same_file(fd, lock):
            os.close(fd)
            continue
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "stage": stage,
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        with contextlib.suppress(OSError):  # who holds it is for the message only
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return OutputLock(fd, lock)
    _unguarded(path, lock, OSError("the lock file kept being replaced"))
    return None


def _open_lock(lock: Path) -> int:
    """The lock file, created if need be; another user's left there (a killed run in a shared folder)
    is opened read-only: flock needs no write access, only the note of who holds it does."""
    try:
        return open_own(lock, os.O_RDWR | os.O_CREAT)
    except PermissionError:
        if lock.is_file() and os.access(lock.parent, os.W_OK | os.X_OK):
            return open_own(lock, os.O_RDONLY)
        raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _lock_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0))
        return f"{record['stage']}, pid {record['pid']} on {record['host']}, since {record['since']}"
    except (OSError, ValueError, TypeError, KeyError):
        return "a process that has not said which"  # between its lock and its note of who it is


def record_gone(path: Path, config: dict | None) -> str:
    """A note for a folder refused as not biomask's that holds the resolved config this stage writes
    into its outputs — every key of `config` (the new run's, resolved) spelled out, as no hand-written
    config is, and its `output:` naming this folder: its run.json went missing (a workflow engine
    deletes a declared output file before it runs the rule again). Said, never acted on: without the
    record, which files are biomask's cannot be told, and the folder is not deleted."""
    if config is None:
        return ""
    try:
        written = load_recorded_yaml((path / "config.yaml").read_text(encoding="utf-8"), str(path))
    except (OSError, ValueError, yaml.YAMLError):
        return ""
    named = written.get("output") if isinstance(written, dict) else None
    if not isinstance(named, str) or os.path.abspath(named) != os.path.abspath(path):
        return ""
    if set(flatten(written, keep_empty=True)) != set(flatten(config, keep_empty=True)):
        return ""
    return (
        f" (it holds the config.yaml biomask wrote for this output, but its run.json is gone: a workflow "
        f"engine deletes a declared output before running the rule again. Delete or move {path} to compute "
        "it again, and declare a file outside biomask's folders as the rule's output: README, From a "
        "workflow engine)"
    )


def _unguarded(path: str | os.PathLike, lock: Path, exc: OSError) -> None:
    log.warning(
        "cannot lock %s (%s): a second run into output %s would not be refused while this one runs "
        "(only a biomask command on this host is told by its pid). Keep to one run per output",
        lock,
        exc.strerror or exc,
        path,
    )


def file_slugs(names: Sequence[str], limit: int = 60, keep: str = "") -> dict[str, str]:
    """A file-name piece for each name, distinct even on a case-insensitive file system (macOS, Windows):
    letters (any script), digits and the characters of `keep` kept, lower-cased, every other run of
    characters one `-`, cut to `limit`; a piece another name already took gets `-2`, `-3`. Names that differed only in case or
    punctuation (`DNA` / `dna`, `r2mae@0` / `r2mae-0`) wrote one file over the other, and a name holding
    `/` or `..` wrote outside the output."""
    taken: set[str] = set()
    found: dict[str, str] = {}
    for name in names:
        text = str(name).casefold()
        text = text if "_" in keep else text.replace("_", "-")  # \w holds `_`
        base = re.sub(rf"[^\w{re.escape(keep)}]+", "-", text).strip("-")[:limit].strip("-") or "x"
        slug, n = base, 1
        while slug in taken:
            n += 1
            slug = f"{base}-{n}"
        taken.add(slug)
        found[name] = slug
    return found
