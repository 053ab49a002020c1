"""A portable checkpoint's config.json, read and checked without torch: `biomask embed` reads it to
decide whether its output is current before it imports torch (a pipeline rerun starts one process
per embedding); loading the weights (`biomask.models.pretrained`) reads it the same way."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from biomask.errors import InputError

CHECKPOINT_FORMAT = "biomask-pretrained"
CHECKPOINT_VERSION = 1

CONFIG_SHA256 = "config_sha256"


def config_digest(config: dict[str, Any]) -> str:
    """The sha256 of config.json's content less its own digest (key order and layout do not count):
    an edited architecture or preprocessing setting would otherwise load, and embed differently."""
    content = {k: v for k, v in config.items() if k != CONFIG_SHA256}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def read_checkpoint_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a portable checkpoint, with errors that say what is wrong."""
    directory = Path(directory)
    path = directory / "config.json"
    if not directory.is_dir():
        raise InputError(
            f"checkpoint {directory} does not exist; give the `model/` directory of a pretrain run"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        inside = directory / "model"
        hint = (
            f"; it is a pretrain run: its checkpoint is {inside}"
            if (inside / "config.json").is_file()
            else "; give the `model/` directory of a pretrain run"
        )
        raise InputError(f"{directory} is not a biomask checkpoint: it has no config.json{hint}") from None
    except ValueError as exc:
        raise InputError(f"{path} is corrupt ({exc}); export the checkpoint again") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} is not a biomask checkpoint config (a JSON object is expected)")
    if config.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a biomask checkpoint config (format {config.get('format')!r})")
    if not isinstance(config.get("version", 0), int):
        raise InputError(
            f"{path}: version {config.get('version')!r} is not a checkpoint version (an integer)"
        )
    if config.get("version", 0) > CHECKPOINT_VERSION:
        raise InputError(
            f"{directory} was written by a newer biomask (checkpoint version {config['version']})"
        )
    recorded = config.get(CONFIG_SHA256)  # checkpoints written before it was kept have none ...
    if recorded is None and "sources" in (config.get("data") or {}):  # ... but these were written with it
        raise InputError(
            f"{path} was changed after the model was written: it lacks the {CONFIG_SHA256} that the "
            "biomask which wrote it records; restore the checkpoint's own config.json"
        )
    if recorded is not None and recorded != config_digest(config):
        raise InputError(
            f"{path} was changed after the model was written: its content does not match the "
            f"{CONFIG_SHA256} it records ({str(recorded)[:12]}…); restore the checkpoint's own "
            "config.json (the weights and preprocessing were trained with it)"
        )
    return config
