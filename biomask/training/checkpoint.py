"""Training checkpoints: written atomically, verified before they are resumed, pruned to the last k.

    <output>/checkpoints/step00000200/      one DeepSpeed checkpoint (model, optimizer, schedule)
        rng-rank0.json, rng-rank0.safetensors   every RNG of every rank, incl. the masker's generators
        meta.json                           step, data position, files with their sizes and sha256 (last)

A checkpoint is saved under `.tmp-stepN`, and renamed to `stepN` only when every rank has finished
writing and meta.json lists every file: a process killed while saving leaves a `.tmp-` directory
that resume ignores (and removes). A checkpoint is complete when its meta.json exists and every file
it lists has the recorded size (cheap: pruning uses it); it is resumed from only when, in addition,
every file matches its recorded sha256 and the directory holds no file meta.json does not list.
When the newest checkpoint fails that check, resume warns, moves it to `corrupt-stepN` (kept as
evidence, never pruned) and falls back to the previous good one; when none passes, it refuses (exit 2).

Nothing in a run folder can run code: the RNG state is JSON plus safetensors (no pickle), and
DeepSpeed's own files are unpickled with `weights_only=True` (tensors, plain data and the few
DeepSpeed classes in `ALLOWED_GLOBALS`), see `weights_only_loads`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from biomask.errors import InputError
from biomask.models import EncoderConfig, save_pretrained
from biomask.outputs import atomic_write_text
from biomask.provenance import sha256_file
from biomask.randomness import global_streams, restore_global_streams
from biomask.tensor_files import save_tensors

log = logging.getLogger(__name__)

_TAG = re.compile(r"^step(\d{8})$")


class CheckpointError(InputError):
    """A training checkpoint that cannot be trusted (corrupt, or holding more than tensors and data)."""


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------ RNG state, no pickle


def rng_state(masker_state: dict[str, Any]) -> dict[str, Any]:
    """Every random state a training step consumes on this rank."""
    return {**global_streams(), "masker": masker_state}


def restore_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    """Restore the global RNGs; returns the masker's state for the caller to load."""
    restore_global_streams(state)
    return state["masker"]


_TENSOR, _TUPLE, _ARRAY = "__tensor__", "__tuple__", "__ndarray__"


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Plain JSON for `obj`; its tensors go to `tensors` (saved as safetensors) under a reference."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()  # safetensors refuses shared storage
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        return {_ARRAY: obj.tolist(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(x, tensors) for x in obj]}
    if isinstance(obj, list):
        return [_encode(x, tensors) for x in obj]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"checkpoint state: dict keys must be strings, not {list(obj)[:3]}")
        return {k: _encode(v, tensors) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state: cannot store a {type(obj).__name__} without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(x, tensors) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {_TENSOR}:
        return tensors[obj[_TENSOR]]
    if set(obj) == {_TUPLE}:
        return tuple(_decode(x, tensors) for x in obj[_TUPLE])
    if set(obj) == {_ARRAY, "dtype", "shape"}:
        dtype = np.dtype(obj["dtype"])
        if dtype.hasobject:
            raise ValueError(f"an array of dtype {dtype} (objects are never stored)")
        return np.asarray(obj[_ARRAY], dtype=dtype).reshape(obj["shape"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def write_state(state: dict[str, Any], directory: Path, name: str) -> None:
    """`state` (nested dicts, lists, tuples, numbers, strings, numpy arrays, tensors) as `name.json`
    plus `name.safetensors`: nothing that needs pickle to read back."""
    tensors: dict[str, torch.Tensor] = {}
    plain = _encode(state, tensors)
    save_tensors(tensors, directory / f"{name}.safetensors")
    atomic_write_text(directory / f"{name}.json", json.dumps(plain) + "\n")


def read_state(directory: Path, name: str) -> dict[str, Any]:
    """What `write_state` wrote; a missing or corrupt file: CheckpointError naming it."""
    for path in (directory / f"{name}.json", directory / f"{name}.safetensors"):
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint {directory} cannot be resumed from")
    try:
        tensors = load_file(str(directory / f"{name}.safetensors"), device="cpu")
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise CheckpointError(f"{directory / name}.safetensors is unreadable ({exc})") from None
    try:
        return _decode(json.loads((directory / f"{name}.json").read_text(encoding="utf-8")), tensors)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{directory / name}.json is corrupt ({exc})") from None


# ------------------------------------------------------------------ DeepSpeed's files, weights only


def allowed_globals() -> list[Any]:
    """The only classes DeepSpeed's checkpoint files may name besides tensors and plain containers:
    plain data holders of its optimizers (loss scaler settings, the ZeRO stage, fragment offsets)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside, every `torch.load` unpickles with `weights_only=True` and the `allowed_globals`.

    DeepSpeed's TorchCheckpointEngine and `zero_to_fp32` unpickle everything themselves (they turn
    `weights_only` off); `torch.load` is the one point both go through. A file naming anything else
    (a pickle payload) raises CheckpointError and nothing in it runs.
    """
    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            if found is None or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", found.group(1)):
                # not a payload (no importable name: random bytes can hold a GLOBAL opcode too) but bytes
                # that are no torch file; torch's advice is not repeated
                raise CheckpointError(
                    f"{f} is corrupt: it is not a torch checkpoint file biomask can read; restore it or "
                    "pass --overwrite to start the run again"
                ) from None
            detail = found.group(1)
            raise CheckpointError(
                f"{f}: refusing to load it — it holds objects other than tensors and plain data, which "
                f"could run code when unpickled ({detail}); biomask never unpickles them. If the run folder "
                "came from someone else, do not resume it; pass --overwrite to start the run again"
            ) from None
        except CheckpointError:
            raise
        except Exception as exc:
            # arbitrary bytes reach the unpickler's internals (IndexError, struct.error, UnicodeDecodeError,
            # ...): no list of types covers them, and none of them means anything but a damaged file
            raise CheckpointError(
                f"{f} is corrupt ({type(exc).__name__}): it is not a torch checkpoint file biomask can "
                "read; restore it or pass --overwrite to start the run again"
            ) from None

    with torch.serialization.safe_globals(allowed_globals()):
        torch.load = load  # type: ignore[assignment]
        try:
            yield
        finally:
            torch.load = original  # type: ignore[assignment]


# ---------------------------------------------------------------------------------- save and load


def _file_names(directory: Path) -> list[str]:
    return [str(p.relative_to(directory)) for p in sorted(directory.rglob("*")) if p.is_file()]


def _discard(path: Path) -> None:
    """Remove a path under one of biomask's own names, never what it leads to: a link there (a crafted
    or copied run folder) is unlinked, not written or deleted through — rmtree refuses a link and the
    save then wrote its files into the link's target, replacing a meta.json there."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def save(engine: Any, root: Path, step: int, *, rank: int, rng: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Save a checkpoint of every rank (a collective call); returns its final directory."""
    tag = tag_of(step)
    tmp_tag = f".tmp-{tag}"
    final = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _discard(root / tmp_tag)
    _barrier()
    try:
        engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
        write_state(rng, root / tmp_tag, f"rng-rank{rank}")
    except (OSError, RuntimeError) as exc:
        _save_failed(root / tmp_tag, exc)
    _barrier()  # every rank's files are on disk
    if rank == 0:
        tmp = root / tmp_tag
        names = _file_names(tmp)
        files = {name: (tmp / name).stat().st_size for name in names}
        hashes = {name: sha256_file(tmp / name) for name in names}
        record = {**meta, "step": step, "files": files, "sha256": hashes}
        atomic_write_text(tmp / "meta.json", json.dumps(record, indent=2) + "\n")
        old = root / f".old-{tag}"
        _discard(old)
        if (
            final.exists() or final.is_symlink()
        ):  # a re-save of the same step (resumed at its last step): swap
            final.rename(old)
        tmp.rename(final)
        _discard(old)
    _barrier()
    return final


def _save_failed(tmp: Path, exc: BaseException) -> None:
    """A save the file system refused (disk full, read-only): remove the partial `.tmp-` checkpoint and
    say so (exit 2), naming it; the previous complete checkpoint stays the one a rerun resumes from.
    torch.save reports a full disk as a RuntimeError ("... file write failed")."""
    from biomask.errors import EnvironmentIOError, describe_os_error, first_line, is_environment_error

    # DeepSpeed logs its own failure to make the folder (permission denied, read-only, immutable) and
    # torch.save then finds no "Parent directory"
    refused = is_environment_error(exc) or (
        isinstance(exc, RuntimeError)
        and any(s in str(exc) for s in ("write failed", "inline_container", "Parent directory"))
    )
    if not refused:
        raise exc
    # measured before the partial checkpoint goes: after, the space it held read as plenty
    free = shutil.disk_usage(tmp.parent).free if tmp.parent.exists() else None
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(exc, OSError):
        reason = describe_os_error(exc, str(tmp))
    elif "inline_container" in str(exc) or "write failed" in str(exc):
        # torch's "[enforce fail at inline_container.cc:672] . unexpected pos 917440 vs 917304"
        reason = f"a short write, the disk is probably full ({first_line(exc)})"
    else:
        reason = str(exc).strip().splitlines()[-1]
    space = f" ({free:,} bytes free there when it failed)" if free is not None else ""
    raise EnvironmentIOError(
        f"saving checkpoint {tmp} failed{space}: {reason}; the partial checkpoint was removed and a "
        "rerun resumes from the previous complete one -- make the folder writable or free some space, "
        "and run the same command again"
    ) from None


def is_valid(directory: Path) -> bool:
    """Complete: meta.json exists and every file it lists has the recorded size (no hashing)."""
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        return all((directory / name).stat().st_size == size for name, size in meta["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def verify(directory: Path) -> str | None:
    """Why `directory` cannot be resumed from, or None when every file matches meta.json (sizes and
    sha256, streamed) and it holds no file meta.json does not list."""
    try:
        meta = read_meta(directory)
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError) as exc:
        return f"meta.json is unreadable ({exc})"
    if not isinstance(meta, dict):
        return "meta.json is not an object"
    files, hashes = meta.get("files"), meta.get("sha256")
    if not isinstance(files, dict) or not isinstance(hashes, dict) or set(files) != set(hashes):
        return "meta.json records no checksums (written by an older biomask)"
    # meta.json is the one file no digest covers: the step a resume continues from must be its folder's
    named = _TAG.match(directory.name)
    if named is not None and meta.get("step") != int(named.group(1)):
        return f"meta.json says step {meta.get('step')!r}, its folder {directory.name}"
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"meta.json lists {name!r}, outside the checkpoint"
    added = sorted(set(_file_names(directory)) - set(files) - {"meta.json"})
    if added:
        return f"it holds files meta.json does not list ({', '.join(added[:3])})"
    for name, size in files.items():
        path = directory / name
        if path.is_symlink():  # saves write files; a link would read (or later replace) another one
            return f"{path} is a symbolic link, not a file the save wrote"
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, not the {size} recorded"
        if sha256_file(path) != hashes[name]:
            return f"{path} does not match the sha256 recorded in meta.json"
    return None


def _checkpoints(root: Path) -> list[Path]:
    """Every `stepN` directory, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)]
    found.sort(key=lambda p: int(_TAG.match(p.name).group(1)))  # type: ignore[union-attr]
    return found


def complete_steps(root: Path) -> list[int]:
    """The steps of the complete checkpoints in `root`, oldest first (what a resume could start from)."""
    return [int(_TAG.match(p.name).group(1)) for p in _checkpoints(root) if is_valid(p)]  # type: ignore[union-attr]


def valid_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    good = []
    for path in _checkpoints(root):
        if is_valid(path):
            good.append(path)
        else:
            log.warning("ignoring incomplete checkpoint %s", path)
    return good


def latest(root: Path) -> Path | None:
    found = valid_checkpoints(root)
    return found[-1] if found else None


def resume_point(root: Path) -> Path | None:
    """The newest checkpoint that passes `verify` (None when there is none at all).

    Newer checkpoints that fail are moved to `corrupt-stepN` with a warning, so pruning never keeps them
    in place of the good one; when every checkpoint fails, CheckpointError (exit 2) and nothing moves.
    """
    failed: list[tuple[Path, str]] = []
    for path in reversed(_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            for bad, why in failed:
                aside = root / f"corrupt-{bad.name}"
                if aside.exists() and unlisted(aside):  # one set aside before, holding files of the user's
                    aside = root / f"corrupt-{bad.name}-{uuid.uuid4().hex[:8]}"
                shutil.rmtree(aside, ignore_errors=True)
                bad.rename(aside)
                log.warning(
                    "pretrain: checkpoint %s fails verification (%s); moved it to %s and falling back to "
                    "the previous complete checkpoint %s",
                    bad,
                    why,
                    aside,
                    path,
                )
            return path
        failed.append((path, problem))
    if failed:
        details = "; ".join(f"{path.name}: {why}" for path, why in failed)
        raise CheckpointError(
            f"no checkpoint in {root} can be resumed from ({details}). Restore the checkpoints, or pass "
            "--overwrite to start the run again"
        )
    return None


def read_meta(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "meta.json").read_text(encoding="utf-8"))


def load(engine: Any, directory: Path, *, rank: int) -> dict[str, Any]:
    """Load model, optimizer and schedule into the engine (weights only); return this rank's RNG state."""
    try:
        with weights_only_loads():
            load_path, _ = engine.load_checkpoint(str(directory.parent), tag=directory.name)
    except (
        RuntimeError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
        EOFError,
        OSError,
    ) as exc:
        # a truncated or altered file that still matches meta.json's digests (they were rewritten)
        raise CheckpointError(
            f"checkpoint {directory} is corrupt: DeepSpeed could not load it ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); restore it or pass "
            "--overwrite to start the run again"
        ) from None
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {directory}")
    return read_state(directory, f"rng-rank{rank}")


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and leftovers of killed saves."""
    for leftover in [*root.glob(".tmp-step*"), *root.glob(".old-step*")]:
        _discard(leftover)
    for old in valid_checkpoints(root)[:-keep]:
        added = unlisted(old)
        if added:  # a file of the user's (notes beside a checkpoint) is never deleted
            log.warning(
                "pretrain: kept %s beyond train.keep_last: it holds files the save did not write (%s)",
                old,
                ", ".join(added[:3]),
            )
            continue
        shutil.rmtree(old, ignore_errors=True)


def unlisted(directory: Path) -> list[str]:
    """Files in a checkpoint directory that its meta.json does not list (all of them when unreadable)."""
    try:
        listed = set(read_meta(directory).get("files") or {})
    except (OSError, ValueError, AttributeError):
        return _file_names(directory)
    return sorted(set(_file_names(directory)) - listed - {"meta.json"})


# --------------------------------------------------------------------------- the portable checkpoint


def consolidated_state_dict(engine: Any, ckpt: Path, stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights on rank 0: from the module (ZeRO-0) or gathered from the ZeRO checkpoint."""
    if stage == 0:
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # it prints its progress (stdout is the stage's result): kept for -v, out of every run's log;
    # its torch.load calls unpickle weights only
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), weights_only_loads():
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    finally:
        for line in printed.getvalue().splitlines():
            log.debug("zero_to_fp32: %s", line)


def export_portable(
    out: Path,
    state: dict[str, torch.Tensor],
    arch: EncoderConfig,
    *,
    tokenizer_dir: Path,
    info: dict[str, Any],
) -> Path:
    """`out/model`: the portable checkpoint (safetensors, config.json, tokenizer) that loads without
    DeepSpeed; written under a temporary name and swapped in whole, so a kill leaves the old or the new."""
    tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=out))
    tmp.rmdir()
    try:
        save_pretrained(state, arch, tmp, tokenizer_dir=tokenizer_dir, info=info)
    except BaseException:  # a full disk: the partial folder was left beside the run's checkpoints
        _discard(tmp)
        raise
    _discard(out / "model")
    tmp.rename(out / "model")
    return out / "model"
