"""Output directories that are either complete or absent, and never silently replaced.

Every stage writes into a temporary sibling directory and renames it into place at the end, so a
crash, a bad input or Ctrl-C leaves nothing half-written. Before writing, `check_output` decides:

- the directory does not exist                         -> run;
- it exists and its run.json has the same fingerprint -> reuse it (nothing to do);
- it exists with another fingerprint, or is not ours  -> refuse, unless `overwrite=True`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import yaml

from biomask.config import config_diff
from biomask.errors import OutputExistsError
from biomask.provenance import read_run_info


def check_output(
    path: str | os.PathLike, fingerprint: str, *, overwrite: bool = False, config: dict | None = None
) -> bool:
    """True if `path` already holds this exact result (same fingerprint) and can be reused.

    Raises `OutputExistsError` if `path` holds something else and `overwrite` is false.
    With `overwrite=True` it returns False, so the caller recomputes and replaces the output.
    `config` (the new resolved config) lets a refusal list the keys that changed.
    """
    path = Path(path)
    if not path.exists():
        return False
    if overwrite:
        return False
    if not path.is_dir():
        raise OutputExistsError(f"output {path} exists and is not a directory; choose another output path")
    info = read_run_info(path)
    if info is None:
        if any(path.iterdir()):
            raise OutputExistsError(
                f"output directory {path} is not empty and was not written by biomask; "
                "choose another output path, or pass --overwrite to replace its contents"
            )
        return False
    if info.get("fingerprint") == fingerprint:
        return True
    details = _describe_difference(path, config)
    raise OutputExistsError(
        f"output directory {path} holds results of a different config or input{details}\n"
        "Pass --overwrite to replace them, or choose another output path."
    )


def _describe_difference(path: Path, new: dict | None) -> str:
    """The config keys that changed, when the old resolved config can be compared with the new one."""
    old_file = path / "config.yaml"
    if new is None or not old_file.exists():
        return ""
    try:
        old = yaml.safe_load(old_file.read_text()) or {}
    except yaml.YAMLError:
        return ""
    changes = config_diff(old, new)
    if not changes:
        return " (same config, different input data or format version)"
    shown = "\n  ".join(changes[:20])
    more = f"\n  ... and {len(changes) - 20} more" if len(changes) > 20 else ""
    return f"; changed keys:\n  {shown}{more}"


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{token}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.parent / f".{path.name}.old-{token}"
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file under a temporary name, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
