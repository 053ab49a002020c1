"""The output directory of a pretraining run, and how a new invocation treats what it finds there.

A training run is long and is interrupted (preemption, time limits, crashes), so unlike the other
stages it works inside its output directory and marks it as unfinished with `in_progress.json`
(fingerprint, world size). `run.json` is written last, when the portable checkpoint is in place:
only then is the directory a finished output.

| found at `output`                              | what happens                                        |
|------------------------------------------------|-----------------------------------------------------|
| nothing, or an empty directory                 | fresh run                                           |
| run.json, same fingerprint                     | reuse: nothing to do                                |
| run.json, other fingerprint                    | refused (exit 2, changed keys listed) unless --overwrite |
| in_progress.json, same fingerprint and world size | resume from the latest valid checkpoint          |
| in_progress.json, other fingerprint            | refused (exit 2): an incompatible config on resume  |
| in_progress.json, other world size             | refused (exit 2): DeepSpeed cannot re-partition optimizer state |
| another stage's output (its run.json)          | refused (exit 2), --overwrite or not                |
| anything else                                  | refused (exit 2), --overwrite or not                |
| any of these while another run writes it       | refused (exit 2), --overwrite or not (below)        |

Rank 0 holds a flock on `.NAME.lock` beside the output while it runs (outputs.hold_output): a second
run into it, from a script, a notebook kernel or another host, is refused, and a killed run's lock
goes with its process. Where the file system has no locks, the pid that rank 0 records in
in_progress.json is the guard: a biomask command still running under it on this host.

--overwrite replaces a run of biomask pretrain only, and only when the directory holds nothing else:
a file added to a run (notes, an analysis) is refused by name, never deleted. A finished run's
run.json lists every file it wrote; an unfinished one is checked by the names pretrain writes.

Keys in `NON_SEMANTIC` (logging and checkpoint cadence, the output path) may change between an
interrupted run and its resumption.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from biomask.config import config_diff, load_recorded_yaml
from biomask.errors import (
    EnvironmentIOError,
    InputError,
    OutputExistsError,
    StaleOutputError,
    describe_os_error,
)
from biomask.outputs import (
    FILE_TREE_KEY,
    atomic_write_text,
    check_same_stage,
    describe_foreign,
    describe_input_changes,
    file_tree,
    foreign_files,
    output_digests,
    record_gone,
    refuse_changed,
    remove_leftover,
    through_link,
)
from biomask.provenance import (
    code_differs,
    code_version,
    input_entry,
    read_run_info,
    sha256_file,
    written_by_biomask,
)
from biomask.stage import StageOutput, warn_other_code
from biomask.training.config import NON_SEMANTIC, PretrainConfig

log = logging.getLogger(__name__)

IN_PROGRESS = "in_progress.json"
# The run --overwrite replaces, kept inside the new run's folder until the new run finishes: a
# replacement that diverges or fails before its first checkpoint puts it back.
REPLACED = ".replaced-run"
# What pretrain writes at the top of its output directory (what --overwrite may replace there).
OWN_NAMES = frozenset(
    {
        REPLACED,
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "model",
        "references.json",
        "run.json",
        "tensorboard",
        "wandb",
        IN_PROGRESS,
    }
)
_TEMPORARY = (".model.tmp-", ".run.tmp-", ".tmp-step", ".old-step")  # left by a killed run or save


def _temporary(relative: str) -> bool:
    return any(part.startswith(_TEMPORARY) for part in relative.split("/"))


def _ours_unlisted(relative: str) -> bool:
    """Pretrain's own files that its run.json may not list: temporaries of a killed save, and what
    the trackers write after the list is made (W&B finishes its run folder on close)."""
    return _temporary(relative) or relative.split("/", 1)[0] in ("tensorboard", "wandb")


def foreign(path: Path, info: dict[str, Any] | None) -> list[str]:
    """What in `path` pretrain did not write: by the finished run's list of files; for an unfinished
    run (no list yet) by name at the top and, inside checkpoints/ and model/, by what each
    checkpoint's meta.json and the model's config.json list."""
    if info is not None and isinstance(info.get(FILE_TREE_KEY), list):
        return foreign_files(path, info, _ours_unlisted)
    found = [p.name for p in path.iterdir() if p.name not in OWN_NAMES and not _temporary(p.name)]
    kept = path / REPLACED
    if kept.is_dir() and not kept.is_symlink():  # the run being replaced: what it holds of the user's too
        theirs = read_run_info(kept)
        found += [
            f"{REPLACED}/{name}" for name in foreign(kept, theirs if written_by_biomask(theirs) else None)
        ]
    if (path / "checkpoints").is_dir() and not (path / "checkpoints").is_symlink():
        found += [f"checkpoints/{name}" for name in _foreign_in_checkpoints(path / "checkpoints")]
    if (path / "model").is_dir() and not (path / "model").is_symlink():
        found += [f"model/{name}" for name in _foreign_in_model(path / "model")]
    return sorted(found)


# DeepSpeed's files in a checkpoint step (model, optimizer shards) and biomask's RNG state per rank
_STEP_FILE = re.compile(
    r"^(meta\.json|mp_rank_\d+_model_states\.pt|(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_(optim|model)_states\.pt"
    r"|rng-rank\d+\.(json|safetensors))$"
)
_CHECKPOINT_ENTRY = re.compile(r"^((corrupt-)?step\d{8}|zero_to_fp32\.py|zero_to_torch\.py|latest)$")


def _foreign_in_checkpoints(root: Path) -> list[str]:
    out = []
    for entry in root.iterdir():
        if _temporary(entry.name):
            continue
        if not _CHECKPOINT_ENTRY.match(entry.name) or entry.is_symlink():
            out.append(entry.name)
        elif entry.is_dir():
            try:
                listed = set(json.loads((entry / "meta.json").read_text(encoding="utf-8")).get("files") or {})
            except (OSError, ValueError, AttributeError):
                listed = set()
            out += [
                f"{entry.name}/{p.name}"
                for p in entry.iterdir()
                if p.is_symlink() or p.is_dir() or not (p.name in listed or _STEP_FILE.match(p.name))
            ]
    return out


def _foreign_in_model(model: Path) -> list[str]:
    try:
        listed = set(
            (json.loads((model / "config.json").read_text(encoding="utf-8")).get("tokenizer") or {}).get(
                "files"
            )
            or {}
        )
    except (OSError, ValueError, AttributeError):
        listed = set()
    listed |= {"tokenizer.json", "tokenizer_config.json", "genes.tsv"}
    out = [p.name for p in model.iterdir() if p.name not in ("config.json", "model.safetensors", "tokenizer")]
    tokenizer = model / "tokenizer"
    if tokenizer.is_dir() and not tokenizer.is_symlink():
        out += [f"tokenizer/{p.name}" for p in tokenizer.iterdir() if p.name not in listed or not p.is_file()]
    return out


def _changed_keys(path: Path, new_config: dict[str, Any], inputs: Sequence[dict] = ()) -> str:
    try:
        old = (
            load_recorded_yaml((path / "config.yaml").read_text(encoding="utf-8"), str(path / "config.yaml"))
            or {}
        )
    except (OSError, yaml.YAMLError):
        return ""
    # keys a resume may change are not what stands in the way
    changes = config_diff(old, new_config, ignore=NON_SEMANTIC)
    if not changes:
        # which input: run.json's records, or those an unfinished run's marker kept (since 2026-12-06)
        named = describe_input_changes((recorded(path) or {}).get("inputs"), inputs)
        return named or (
            " (same config keys; the input data, the deepspeed.config file's contents or the format version differ)"
        )
    return ";\nchanged keys:\n  " + "\n  ".join(changes[:20])


def recorded(path: Path) -> dict[str, Any] | None:
    """What `path` records of the run it holds: a finished run's run.json, else an unfinished one's
    in_progress.json (None: neither is there, or readable)."""
    info = read_run_info(path) if path.is_dir() else None
    if written_by_biomask(info):
        return info
    try:
        state = json.loads((path / IN_PROGRESS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def store_input(root: Path) -> dict[str, Any]:
    """A run's token store as an input of its fingerprint: the store's manifest, which holds every
    shard's sha256."""
    return input_entry("token-store", root)


def run_inputs(cfg: PretrainConfig, store_root: Path) -> list[dict[str, Any]]:
    """What a run's result depends on besides its config: the token store (its manifest) and, when
    given, the user's own DeepSpeed JSON — by its contents, not its path: an edited file (ZeRO stage,
    clipping, buckets) is another run, and a resume under it would meet checkpoints it cannot read.
    A file that is not there is left to the DeepSpeed config's own error."""
    inputs = [store_input(store_root)]
    own = Path(cfg.deepspeed.config) if cfg.deepspeed.config else None
    if own is not None and own.is_file():
        inputs.append({"name": "deepspeed-config", "path": str(own), "sha256": sha256_file(own)})
    return inputs


def finished_run(cfg: PretrainConfig, world_size: int, rank: int = 0) -> Path | None:
    """The output when it already holds a finished run of this config and store (the trainer's own
    test, made without torch): a pipeline rerun starts dozens of pretrain processes that have
    nothing to do, and importing torch is most of each one's time. None: the trainer decides
    (a run that continues a checkpoint: its identity is the checkpoint's, read by the trainer)."""
    out = Path(cfg.output)
    manifest = Path(cfg.data.store) / "manifest.json"
    if cfg.model.init_from or not manifest.is_file() or not (out / "run.json").is_file():
        return None
    stage = StageOutput(
        "pretrain", cfg, out, inputs=run_inputs(cfg, Path(cfg.data.store)), non_semantic=NON_SEMANTIC
    )
    if not is_done(out, stage.held_fingerprint(recorded(out)), world_size):
        return None
    if rank == 0:  # said once, not by every process of a launch
        log.info("pretrain: %s is up to date (same config and data); reusing it", out)
        warn_other_code("pretrain", out, read_run_info(out))
    return out


def is_done(path: Path, fingerprint: str, world_size: int | None = None) -> bool:
    """Whether `path` holds a finished run of this fingerprint: a read only, the same on every rank
    (the run directory is on a shared filesystem), so it needs no process group. One finished with
    another number of processes is not this run (its global batch differs): refused."""
    info = read_run_info(path) if path.is_dir() else None
    if info is None or info.get("fingerprint") != fingerprint:
        return False
    _check_finished_world_size(path, info, world_size)
    refuse_changed(path, info)  # an edited log or config: stale, so a pipeline trains it again
    return True


def _check_finished_world_size(path: Path, info: dict[str, Any], world_size: int | None) -> None:
    theirs = info.get("world_size")
    if world_size is None or theirs is None or int(theirs) == world_size:
        return
    raise StaleOutputError(
        f"output directory {path} holds a run finished with {theirs} process"
        f"{'es' * (int(theirs) != 1)}; this launch has {world_size}, so its global batch (micro-batch x "
        "processes) and run would differ. Launch it as before to reuse it, pass --overwrite to train "
        "again, or choose another output path"
    )


def _longer_run_hint(path: Path, changed: str) -> str:
    """More steps for a finished run: --overwrite trains it again from the start, which a user who
    meant to go on from its weights is not told by 'replace it'."""
    steps = re.search(r"\n  train\.steps: (\d+) -> (\d+)", changed)
    if steps is None or int(steps[2]) <= int(steps[1]):
        return ""
    return (
        f" To go on from its weights instead (a new optimizer and learning-rate schedule, not the same "
        f"as one longer run), pretrain into another output with model.init_from={path / 'model'}."
    )


def _embed_norm_hint(changed: str) -> str:
    """A run written before model.embed_norm (2026-12-03) trained as today's does: the key changes
    only how the finished model embeds, so retraining for it is not needed."""
    keys = re.findall(r"\n  ([\w.\[\]]+): ", changed)
    if keys != ["model.embed_norm"] or "'(absent)'" not in changed:
        return ""
    return (
        " The run predates model.embed_norm, which changes how the model embeds, not how it trains: "
        "model.embed_norm=none reuses it as it is (its raw latent, as it embedded then)."
    )


def _refuse_live_writer(path: Path, marker: Path) -> None:
    """A run still writing `path` (a second launch, or workers a killed launcher left behind): neither
    resumed beside it nor replaced under it — the two would delete each other's checkpoints. The
    output's lock refuses any such run first; this check is what is left where the file system has no
    locks, and the guard against a run of a biomask from before the lock."""
    try:
        state = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    writer = _live_writer(state) if isinstance(state, dict) else None
    if writer is not None:
        raise InputError(
            f"output directory {path} is being written by a pretrain that is still running ({writer}); "
            "wait for it to finish or stop it (a killed launcher can leave its workers running), or "
            "choose another output path"
        )


def _live_writer(state: dict[str, Any]) -> str | None:
    """'pid N on HOST' when the run that wrote `in_progress.json` still runs here (rank 0 records its
    pid and host; a pid now used by another program does not count), else None."""
    pid, host = state.get("pid"), state.get("host")
    if not isinstance(pid, int) or host != socket.gethostname() or pid == os.getpid():
        return None
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None  # gone (or no /proc to ask: nothing can be told)
    return f"pid {pid} on {host}" if b"biomask" in command else None


def decide(
    path: Path,
    fingerprint: str,
    world_size: int,
    config: dict[str, Any],
    *,
    overwrite: bool,
    inputs: Sequence[dict] = (),
) -> str:
    """'fresh', 'resume' or 'done' for the run at `path` (raises when it must be refused; `inputs`, the
    run's input records, let a refusal with no changed key name the input whose data differ)."""
    recover_swap(path)
    if not path.exists():
        return "fresh"
    if not path.is_dir():
        raise OutputExistsError(f"output {path} exists and is not a directory; choose another output path")
    info = read_run_info(path)
    info = info if written_by_biomask(info) else None  # a run.json of someone else's: none of ours
    marker = path / IN_PROGRESS
    _refuse_live_writer(path, marker)
    if _replaced_is(path, fingerprint, world_size):
        # an unfinished replacement was stopped; the run it replaces is this very config's, finished
        if not overwrite:
            raise StaleOutputError(
                f"output directory {path} holds an unfinished run of other settings, which is replacing a "
                f"finished run of this config (kept in {path / REPLACED}); pass --overwrite to discard the "
                "unfinished one and put the finished one back"
            )
        added = foreign(path, None)
        if added:
            raise OutputExistsError(describe_foreign(path, added))
        _put_back(path)
        return "done"
    if overwrite:  # replaces a run biomask pretrain wrote, finished or not; never anything else
        if info is not None or marker.is_file() or not any(path.iterdir()):
            check_same_stage(path, info, "pretrain")
            added = foreign(path, info)
            if added:
                raise OutputExistsError(describe_foreign(path, added))
            return "fresh"
        raise OutputExistsError(
            f"output directory {path} is not empty and was not written by biomask pretrain (no run.json "
            "or in_progress.json); --overwrite only replaces biomask's own runs. Move its contents away "
            "or choose another output path" + record_gone(path, config)
        )
    if info is not None:
        check_same_stage(path, info, "pretrain")
        if info.get("fingerprint") == fingerprint:
            _check_finished_world_size(path, info, world_size)
            refuse_changed(path, info)
            return "done"
        changed = _changed_keys(path, config, inputs)
        raise StaleOutputError(
            f"output directory {path} holds a finished run of a different config or input"
            f"{changed}\nPass --overwrite to replace it, or choose another output path."
            + _longer_run_hint(path, changed)
            + _embed_norm_hint(changed)
        )
    if marker.is_file():
        try:
            state = json.loads(marker.read_text(encoding="utf-8"))
        except ValueError:
            state = {}
        if (
            not isinstance(state, dict)
            or not isinstance(state.get("fingerprint"), str)
            or not isinstance(state.get("world_size", world_size), int)
        ):  # what it was cannot be told
            raise InputError(
                f"output directory {path} holds an interrupted run whose {IN_PROGRESS} is unreadable, so "
                "whether this config may resume it cannot be told; pass --overwrite to discard it, or "
                "choose another output path"
            )
        if state["fingerprint"] != fingerprint:  # an output of other settings, as a finished one
            raise StaleOutputError(
                f"output directory {path} holds an interrupted run of a different config or input, which "
                f"cannot be resumed with this one{_changed_keys(path, config, inputs)}\nResume it with its own config "
                f"({path / 'config.yaml'}), pass --overwrite to discard it, or choose another output path."
            )
        if int(state.get("world_size", world_size)) != world_size:
            # another launch shape (tasks_per_node, --nproc_per_node) is other settings, as a changed
            # key is: a pipeline replaces it, and `submit --overwrite` jobs too
            raise StaleOutputError(
                f"output directory {path} holds an interrupted run started with {state['world_size']} "
                f"process{'es' * (int(state['world_size']) != 1)}; "
                f"resume it with the same number (this launch has {world_size}), or pass --overwrite to start over"
            )
        return "resume"
    if any(path.iterdir()):
        raise OutputExistsError(
            f"output directory {path} is not empty and was not written by biomask pretrain; "
            "choose another output path, or move its contents away" + record_gone(path, config)
        )
    return "fresh"


def start_fresh(
    path: Path, fingerprint: str, world_size: int, config_yaml: str, inputs: Sequence[dict] = ()
) -> None:
    """Clear `path` and mark it as an unfinished run. A run found there (biomask's own, which
    --overwrite replaces) is kept in `path/.replaced-run` until this one finishes; where an earlier
    replacement never finished, the run that one replaced stays the one kept."""
    path = through_link(path)
    if path.exists():
        _check_movable(path)
        aside = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        path.rename(aside)
        if (aside / REPLACED).is_dir():  # an unfinished replacement: the run it replaced stays kept
            kept: Path | None = aside / REPLACED
        else:
            kept = aside if any(aside.iterdir()) else None
        try:
            path.mkdir(parents=True)
            # marked as this run's before the kept run moves in: a kill between any two steps leaves a
            # state `recover_swap` reads (never a folder holding only .replaced-run, which nothing claims)
            atomic_write_text(path / "config.yaml", config_yaml)
            mark_in_progress(path, fingerprint, world_size, inputs)
            if kept is not None:
                kept.rename(path / REPLACED)
        except OSError as exc:  # the swap refused half-way: the run as it was, nothing else changed
            if aside.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                aside.rename(path)
            raise EnvironmentIOError(
                f"cannot replace the run in {path}: {describe_os_error(exc)}; it is left as it was"
            ) from None
        shutil.rmtree(aside, ignore_errors=True)
        return
    path.mkdir(parents=True)
    atomic_write_text(path / "config.yaml", config_yaml)
    mark_in_progress(path, fingerprint, world_size, inputs)


def _check_movable(path: Path) -> None:
    """--overwrite keeps the run it replaces inside the new folder until the new one finishes, which
    moves that folder to another parent: the OS allows it only when the folder itself is writable. A
    write-protected run (chmod -R a-w, another user's under umask 022) was set aside, the move refused,
    and the finished run left hidden beside an empty one that every later command failed on."""
    folders = [path, *(p for p in (path / REPLACED,) if p.is_dir())]
    for folder in folders:
        if not os.access(folder, os.W_OK | os.X_OK):
            owner = "" if folder.stat().st_uid == os.getuid() else " (another user's)"
            raise EnvironmentIOError(
                f"cannot replace the run in {path}: {folder} is not writable{owner}, and --overwrite moves it "
                "aside until the new run finishes; make it writable (chmod -R u+w), or write to another "
                "output. Nothing was changed"
            )


def mark_in_progress(path: Path, fingerprint: str, world_size: int, inputs: Sequence[dict] = ()) -> None:
    state = {
        "fingerprint": fingerprint,
        "world_size": world_size,
        # what it reads (name, path, digest): a refusal to resume it with other data names the input
        "inputs": list(inputs),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # a resume by other code (an upgrade before a requeue) is said, and run.json records it
        "code": code_version(),
        # CPU kernels sum in an order set by the thread count: a resume with another one is said
        "torch_threads": _threads(),
        **_writer(),
    }
    atomic_write_text(path / IN_PROGRESS, json.dumps(state, indent=2) + "\n")


def record_fingerprint(path: Path, fingerprint: str) -> None:
    """The fingerprint an unfinished run is resumed under (its config.yaml rewritten at the resume)."""
    marker = path / IN_PROGRESS
    try:
        state = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(state, dict) and state.get("fingerprint") != fingerprint:
        state["fingerprint"] = fingerprint
        atomic_write_text(marker, json.dumps(state, indent=2) + "\n")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _writer() -> dict[str, Any]:
    """Who writes the run now (rank 0): a second launch into the same output is refused while it runs;
    and from where (what its config.yaml's relative paths are relative to)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "cwd": os.getcwd()}


def note_resume(path: Path, step: int) -> None:
    """Add a resume's step to `in_progress.json` (run.json keeps the list: how the run came about),
    and say when other code trained the steps before it: the weights will mix the two."""
    marker = path / IN_PROGRESS
    try:
        state = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    before = _last_code(state)
    differs = (
        code_differs({"code": before}) if before else "an earlier biomask, which did not record its code"
    )
    if differs:
        log.warning(
            "pretrain: the steps of %s up to %d were trained by other code (%s); this code trains the rest, "
            "so its weights mix the two (run.json records which steps each trained: trained_by). Pass "
            "--overwrite to train it again from the start with this code",
            path,
            step,
            differs,
        )
    started_with, now = state.get("torch_threads"), _threads()
    if isinstance(started_with, int) and started_with != now:
        log.warning(
            "pretrain: %s resumes with %d CPU threads where it started with %d: reductions run in "
            "another order, so its weights will not be bit-identical to an uninterrupted run's (set "
            "OMP_NUM_THREADS=%d to resume it exactly)",
            path,
            now,
            started_with,
            started_with,
        )
    state["resumed_from"] = [*state.get("resumed_from", []), step]
    state["resumed_code"] = [*state.get("resumed_code", []), code_version()]
    state.update(_writer())
    atomic_write_text(marker, json.dumps(state, indent=2) + "\n")


def note_precision(path: Path, step: int, precision: str, device: str, asked: str = "auto") -> None:
    """Record the precision and device the steps from `step` train in (in_progress.json; run.json keeps
    the list where it changed: trained_in), and say when they differ from the steps before: a
    `train.precision: auto` run that started in bf16 on a GPU and resumed on a CPU node trained on in
    fp32 without a word, and its records named fp32 alone."""
    marker = path / IN_PROGRESS
    try:
        state = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(state, dict):
        return
    segments = [s for s in state.get("trained_in", []) if isinstance(s, dict)]
    last = segments[-1] if segments else None
    if last is not None and (last.get("precision"), last.get("device")) == (precision, device):
        return
    if last is not None:
        # train.precision auto resolves by the device: the way back is the device it started on (naming
        # the precision instead changes the config, and the run is refused as another one)
        how = (
            f"resume it on a {last.get('device')} node"
            if asked == "auto"
            else f"resume it on a {last.get('device')} node with train.precision={asked}"
        )
        log.warning(
            "pretrain: %s resumes in %s on %s where steps %d-%d trained in %s on %s: its weights mix the two "
            "(run.json records it: trained_in). To go on as it started, %s; or pass --overwrite to train "
            "it again",
            path,
            precision,
            device,
            last.get("from_step", 0),
            step,
            last.get("precision"),
            last.get("device"),
            how,
        )
    state["trained_in"] = [*segments, {"from_step": step, "precision": precision, "device": device}]
    atomic_write_text(marker, json.dumps(state, indent=2) + "\n")


def trained_in(path: Path) -> list[dict[str, Any]] | None:
    """The precision and device of each part of this unfinished run, where they changed; None where
    one precision on one device trained it all."""
    try:
        state = json.loads((path / IN_PROGRESS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    segments = state.get("trained_in") if isinstance(state, dict) else None
    return segments if isinstance(segments, list) and len(segments) > 1 else None


def _last_code(state: dict[str, Any]) -> dict[str, Any] | None:
    resumed = state.get("resumed_code") or []
    code = resumed[-1] if resumed else state.get("code")
    return code if isinstance(code, dict) else None


def trained_by(path: Path) -> list[dict[str, Any]] | None:
    """Which code trained which steps of this unfinished run ({from_step, code}; code None: an
    earlier biomask that did not record it), when more than one did; None when one code trained it."""
    try:
        state = json.loads((path / IN_PROGRESS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    steps = [0, *state.get("resumed_from", [])]
    codes = [state.get("code"), *state.get("resumed_code", [])]
    if len(codes) != len(steps):  # resumed by a biomask that did not record the code either
        codes = [None] * (len(steps) - len(codes)) + codes
    segments = [{"from_step": step, "code": code} for step, code in zip(steps, codes, strict=True)]
    mixed = any(not _same_code(a, b) for a, b in itertools.pairwise(codes))
    return segments if mixed else None


def _same_code(a: Any, b: Any) -> bool:
    if not isinstance(a, dict) or not isinstance(b, dict):  # unrecorded: it cannot be told the same
        return False
    if a.get("source_sha256") and b.get("source_sha256"):
        return a["source_sha256"] == b["source_sha256"]
    return bool(a.get("git_commit")) and a.get("git_commit") == b.get("git_commit")


def resumes(path: Path) -> list[int]:
    """The steps this unfinished run was resumed from, in order."""
    try:
        return list(json.loads((path / IN_PROGRESS).read_text(encoding="utf-8")).get("resumed_from", []))
    except (OSError, ValueError, AttributeError):
        return []


def finished_files(path: Path) -> tuple[list[str], dict[str, str]]:
    """The files a finished run lists as its own (run.json's file tree) and the sha256 of its smaller
    ones: files of the user's in it (notes kept inside a checkpoint) are neither, so --overwrite
    still refuses to delete them; in_progress.json (removed next) and the trackers' folders (written
    after run.json) are not hashed."""
    added = set(foreign(path, None))
    tree = sorted({*file_tree(path), "run.json"} - added)
    digests = {
        name: digest
        for name, digest in output_digests(path).items()
        if name not in added and name != IN_PROGRESS and not _ours_unlisted(name)  # temporaries, trackers
    }
    return tree, digests


def drop_replaced(path: Path) -> None:
    """The run has its portable model: the run it replaced goes (before run.json lists the files);
    what the file system will not let go (another user's files in it) is said, not kept in silence."""
    if (path / REPLACED).is_dir():
        remove_leftover(path / REPLACED)


def restore_replaced(path: Path) -> bool:
    """After this run failed: the run it replaced back at `path`, where this one wrote no checkpoint
    (nothing of it is worth keeping) and nothing but pretrain's files. True when it was put back."""
    kept = path / REPLACED
    if not kept.is_dir() or any((path / "checkpoints").glob("step*")) or foreign(path, None):
        return False
    _put_back(path)
    return True


def _replaced_is(path: Path, fingerprint: str, world_size: int) -> bool:
    """Whether the run an unfinished replacement at `path` is replacing is a finished run of this
    fingerprint and world size."""
    kept = path / REPLACED
    if not kept.is_dir() or kept.is_symlink():
        return False
    info = read_run_info(kept)
    return bool(
        written_by_biomask(info)
        and info.get("fingerprint") == fingerprint
        and info.get("world_size", world_size) == world_size
    )


def recover_swap(path: Path) -> None:
    """Undo a swap of `start_fresh` or `_put_back` that a kill cut between two renames: the run they
    moved to a hidden sibling (`.NAME.old-*`), finished or not, would be found by nothing. Called with
    the output's lock held, so no live swap is undone."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(old|failed)-[0-9a-f]{{8}}$")
    try:
        siblings = sorted(p for p in path.parent.iterdir() if pattern.match(p.name))
    except OSError:
        return
    siblings = [p for p in siblings if p.is_dir() and not p.is_symlink()]
    for empty in (p for p in siblings if ".old-" in p.name and not any(p.iterdir())):
        empty.rmdir()
    asides = [p for p in siblings if ".old-" in p.name and p.exists()]
    if len(asides) > 1:  # one swap at a time leaves one: which of several is the run is not ours to guess
        log.warning(
            "pretrain: %s are runs interrupted replacements of %s set aside; they are left there (move the "
            "one you want back, remove the others)", ", ".join(map(str, asides)), path,
        )  # fmt: skip
        return
    for aside in asides:
        empty = path.is_dir() and not path.is_symlink() and not any(path.iterdir())
        replacing = (path / IN_PROGRESS).is_file()  # path holds a replacement that has not finished
        if not path.exists() or empty:  # start_fresh or _put_back cut short: the run as it was
            if empty:
                path.rmdir()
            aside.rename(path)
        elif replacing and not (path / REPLACED).exists():
            # start_fresh cut before the kept run moved in, or _put_back after its first rename
            if (aside / REPLACED).is_dir():  # an unfinished replacement: the run it replaced is the one kept
                (aside / REPLACED).rename(path / REPLACED)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                aside.rename(path / REPLACED)
        elif replacing and not written_by_biomask(read_run_info(aside)) and not (aside / REPLACED).exists():
            # start_fresh cut after the kept run went into the new run's .replaced-run: what is left
            # is the unfinished run --overwrite was replacing, which it would have removed
            shutil.rmtree(aside, ignore_errors=True)
            log.warning(
                "pretrain: removed %s, the unfinished run a replacement cut short was discarding", aside
            )
            continue
        else:
            log.warning(
                "pretrain: %s holds a run that an interrupted replacement of %s set aside; it is left "
                "there (move it back or remove it yourself)", aside, path,
            )  # fmt: skip
            continue
        log.warning("pretrain: %s, set aside by a replacement a kill cut short, is back at %s", aside, path)
    if path.exists():  # a failed replacement _put_back was discarding, its run back in place
        for failed in (p for p in siblings if ".failed-" in p.name and p.exists()):
            shutil.rmtree(failed, ignore_errors=True)


def _put_back(path: Path) -> None:
    """The kept run in place of the unfinished replacement at `path` (which goes)."""
    kept = path / REPLACED
    aside = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    kept.rename(aside)
    failed = path.parent / f".{path.name}.failed-{uuid.uuid4().hex[:8]}"
    path.rename(failed)
    aside.rename(path)
    shutil.rmtree(failed, ignore_errors=True)


def finish(path: Path) -> None:
    """After run.json is written: the directory is a finished output. Temporaries of an export cut short
    by a kill (`.model.tmp-*`, `.run.tmp-*`: tempfile's names under biomask's prefixes) are removed."""
    (path / IN_PROGRESS).unlink(missing_ok=True)
    drop_replaced(path)
    for prefix in (".model.tmp-", ".run.tmp-"):
        for stale in path.glob(f"{prefix}*"):
            if stale.is_dir() and not stale.is_symlink() and len(stale.name) == len(prefix) + 8:
                shutil.rmtree(stale, ignore_errors=True)
