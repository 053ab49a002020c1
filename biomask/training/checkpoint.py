"""Training checkpoints: written atomically, found by validity, pruned to the last k.

    <output>/checkpoints/step00000200/      one DeepSpeed checkpoint (model, optimizer, schedule)
        rng-rank0.pt ...                    every RNG of every rank, incl. the masker's generators
        meta.json                           step, data position, files and their sizes (written last)

A checkpoint is saved under `.tmp-stepN`, and renamed to `stepN` only when every rank has finished
writing and meta.json lists every file: a process killed while saving leaves a `.tmp-` directory
that resume ignores (and removes). A checkpoint is valid when its meta.json exists and every file it
lists has the recorded size.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from biomask.outputs import atomic_write_text

log = logging.getLogger(__name__)

_TAG = re.compile(r"^step(\d{8})$")


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state(masker_state: dict[str, Any]) -> dict[str, Any]:
    """Every random state a training step consumes on this rank."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "masker": masker_state,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    """Restore the global RNGs; returns the masker's state for the caller to load."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return state["masker"]


def save(engine: Any, root: Path, step: int, *, rank: int, rng: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Save a checkpoint of every rank (a collective call); returns its final directory."""
    tag = tag_of(step)
    tmp_tag = f".tmp-{tag}"
    final = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    torch.save(rng, root / tmp_tag / f"rng-rank{rank}.pt")
    _barrier()  # every rank's files are on disk
    if rank == 0:
        tmp = root / tmp_tag
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write_text(
            tmp / "meta.json", json.dumps({**meta, "step": step, "files": files}, indent=2) + "\n"
        )
        old = root / f".old-{tag}"
        if final.exists():  # a re-save of the same step (a run resumed at its last step): swap
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def is_valid(directory: Path) -> bool:
    try:
        meta = json.loads((directory / "meta.json").read_text())
        return all((directory / name).stat().st_size == size for name, size in meta["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def valid_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)]
    found.sort(key=lambda p: int(_TAG.match(p.name).group(1)))  # type: ignore[union-attr]
    good = []
    for path in found:
        if is_valid(path):
            good.append(path)
        else:
            log.warning("ignoring incomplete checkpoint %s", path)
    return good


def latest(root: Path) -> Path | None:
    found = valid_checkpoints(root)
    return found[-1] if found else None


def read_meta(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "meta.json").read_text())


def load(engine: Any, directory: Path, *, rank: int) -> dict[str, Any]:
    """Load model, optimizer and schedule into the engine; return this rank's RNG state."""
    load_path, _ = engine.load_checkpoint(str(directory.parent), tag=directory.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {directory}")
    rng_file = directory / f"rng-rank{rank}.pt"
    return torch.load(rng_file, weights_only=False)


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and leftovers of killed saves."""
    for leftover in [*root.glob(".tmp-step*"), *root.glob(".old-step*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    for old in valid_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
