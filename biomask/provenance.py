"""What every run records beside its outputs: code version, environment, inputs, seeds.

`write_run_info` produces `run.json`; together with the resolved `config.yaml` it is enough to
rerun a result and to know whether an existing output is still current (its `fingerprint`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import biomask

_CHUNK = 1 << 22


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of an object's canonical JSON (sorted keys): a stable fingerprint."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def strict_json(obj: Any) -> str:
    """JSON any parser reads: a NaN or infinite number (an interval over one seed) is written null."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(obj), indent=2, allow_nan=False) + "\n"


def code_version() -> dict[str, Any]:
    """biomask's version and, when run from a git checkout, its commit and whether it was dirty."""
    info: dict[str, Any] = {"biomask": biomask.__version__, "git_commit": None, "git_dirty": None}
    repo = Path(biomask.__file__).resolve().parent.parent
    if (repo / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            )
            status = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if commit.returncode == 0:
                info["git_commit"] = commit.stdout.strip()
                info["git_dirty"] = bool(status.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return info


_PACKAGES = ("numpy", "torch", "deepspeed", "tokenizers", "biopython", "anndata", "scanpy", "pydantic")


def environment() -> dict[str, Any]:
    """Interpreter, platform and the versions of the packages results depend on."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "packages": versions,
    }


def write_run_info(
    directory: str | os.PathLike,
    *,
    stage: str,
    fingerprint: str,
    inputs: list[dict[str, Any]] | None = None,
    seeds: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `run.json` (code version, environment, inputs with checksums, seeds) into `directory`."""
    info = {
        "stage": stage,
        "fingerprint": fingerprint,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "code": code_version(),
        "environment": environment(),
        "inputs": inputs or [],
        "seeds": seeds or {},
        **(extra or {}),
    }
    path = Path(directory) / "run.json"
    path.write_text(json.dumps(info, indent=2, default=str) + "\n")
    return info


def read_run_info(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The `run.json` of an output directory, or None if it has none (or it is unreadable)."""
    path = Path(directory) / "run.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def written_by_biomask(info: dict[str, Any] | None) -> bool:
    """Whether a run.json is biomask's own (what --overwrite may replace): its stage and fingerprint,
    not merely a file of that name."""
    return (
        info is not None and isinstance(info.get("stage"), str) and isinstance(info.get("fingerprint"), str)
    )
