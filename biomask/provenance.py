"""What every run records beside its outputs: code version, environment, inputs, seeds.

`write_run_info` produces `run.json`; together with the resolved `config.yaml` it is enough to
rerun a result and to know whether an existing output is still current (its `fingerprint`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import biomask
from biomask.resources import source_checkout

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


# git as a background reader: `git status` and `git diff` take .git/index.lock to refresh the index,
# so a developer's own `git commit` beside a running biomask failed ("index.lock: File exists"), and a
# biomask killed meanwhile (a test, a scheduler) left the lock for them to remove by hand. The variable,
# not the option `--no-optional-locks`, which git before 2.15 (RHEL 7's 1.8) refuses: no commit was
# recorded there.
#
# In a session of its own, killed whole at the time limit: a hung git's children (an fsmonitor
# daemon, a credential helper, a hook) held its pipes, so the limit waited on them for ever, and
# killing git alone left them running after biomask.
def _git(repo: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    argv = ["git", "-C", str(repo), *args]
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
        errors="replace",
        env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:  # the limit, or Ctrl-C (its own session does not hear the terminal's)
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()  # not its pipes: a child that left the session may hold them
            raise
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@functools.lru_cache(maxsize=1)
def source_sha256() -> str:
    """The sha256 of biomask's own source (every .py of the package, path and content): the code that
    ran, identified also outside git (a wheel) and in a dirty checkout, where a commit does not."""
    root = Path(biomask.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def code_version(*, with_diff: bool = False) -> dict[str, Any]:
    """biomask's version, the sha256 of its source and, when run from a git checkout, its commit and
    whether it was dirty. `with_diff`: a dirty checkout's uncommitted change too (run.json only: not
    in manifests, checkpoints or an AnnData's uns, which it would bloat)."""
    info: dict[str, Any] = {
        "biomask": biomask.__version__,
        "source_sha256": source_sha256(),
        "git_commit": None,
        "git_dirty": None,
    }
    # only biomask's own source tree: an installed copy's parent folder may be a user's repository
    repo = source_checkout()
    if repo is not None and (repo / ".git").exists():
        try:
            commit = _git(repo, "rev-parse", "HEAD", timeout=10)
            status = _git(repo, "status", "--porcelain", "--untracked-files=no", timeout=10)
            if commit.returncode == 0:
                info["git_commit"] = commit.stdout.strip()
                info["git_dirty"] = bool(status.stdout.strip())
                if info["git_dirty"] and with_diff:
                    info.update(_uncommitted(repo))
        except (OSError, subprocess.SubprocessError):
            pass
    return info


_DIFF_LIMIT = 512 * 1024  # characters of an uncommitted change kept in run.json


def _uncommitted(repo: Path) -> dict[str, Any]:
    """What a dirty checkout changed in biomask's source: the commit alone cannot rebuild the code
    that ran (results from a tree edited mid-study otherwise record only a hash). The diff against
    HEAD (cut at _DIFF_LIMIT characters; its sha256 whole) and the source files git does not track."""

    def git(*args: str) -> str:
        done = _git(repo, *args, timeout=30)
        return done.stdout if done.returncode == 0 else ""

    diff = git("diff", "HEAD", "--", "biomask")
    untracked = git("ls-files", "--others", "--exclude-standard", "--", "biomask").split()
    found: dict[str, Any] = {
        "git_diff_sha256": hashlib.sha256(diff.encode()).hexdigest(),
        "git_diff": diff[:_DIFF_LIMIT],
        "git_untracked": [name for name in untracked if name.endswith(".py")],
    }
    if len(diff) > _DIFF_LIMIT:
        found["git_diff_truncated"] = True
    return found


_PACKAGES = (
    "numpy",
    "torch",
    "deepspeed",
    "tokenizers",
    "biopython",
    "anndata",
    "scanpy",
    "pydantic",
    "scikit-learn",
    "scipy",
    "igraph",
    "safetensors",
    "h5py",
    "pandas",
    "umap-learn",
    "pynndescent",  # scanpy's neighbour graph from 8,192 cells on (Leiden, UMAP, kNN)
    "numba",
    "transformers",
)


def hardware() -> dict[str, Any]:
    """What a methods section states of the machine: the CPU, its cores (all, and those this process
    may use), memory. None where the OS does not say."""
    from biomask.resources import usable_cores

    model = platform.processor() or None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    memory = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {"cpu": model, "cpu_cores": os.cpu_count(), "usable_cores": usable_cores(), "memory_gib": memory}


def environment() -> dict[str, Any]:
    """Interpreter, platform and the versions of the packages results depend on."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    torch = sys.modules.get("torch")  # imported by the stages that compute with it
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        **hardware(),
        "packages": versions,
        # float sums reduce in another order with another thread count: the last bits of weights move
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "ds_accelerator": os.environ.get("DS_ACCELERATOR"),
        "cuda_device": (
            torch.cuda.get_device_name(0) if torch is not None and torch.cuda.is_available() else None
        ),
    }


def code_differs(info: dict[str, Any] | None) -> str | None:
    """How the code that wrote an output (its run.json's `code`) differs from the code running now,
    or None when it is the same or cannot be told (outputs written before the source hash was kept
    are compared by commit)."""
    theirs = (info or {}).get("code") or {}
    if theirs.get("source_sha256"):  # no git call on this path: reuse checks run for every stage
        ours = source_sha256()
        return (
            None
            if theirs["source_sha256"] == ours
            else f"biomask source {str(theirs['source_sha256'])[:12]}… (now {ours[:12]}…)"
        )
    commit = code_version().get("git_commit") if theirs.get("git_commit") else None
    if commit and theirs["git_commit"] != commit:
        return f"commit {str(theirs['git_commit'])[:10]} (now {commit[:10]})"
    return None


class Began(NamedTuple):
    """When a stage began: the wall clock, for the record, and a monotonic one, for its duration — a
    clock stepped during a run (NTP, a VM restored) gave run.json a negative `wall_seconds`."""

    wall: float
    clock: float

    @classmethod
    def now(cls) -> Began:
        return cls(time.time(), time.monotonic())


def write_run_info(
    directory: str | os.PathLike,
    *,
    stage: str,
    fingerprint: str,
    inputs: list[dict[str, Any]] | None = None,
    seeds: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
    started: Began | None = None,
) -> dict[str, Any]:
    """Write `run.json` (code version, environment, inputs with checksums, seeds) into `directory`.
    `started`: when this process began the stage; `created` is when it finished."""
    now = _dt.datetime.now(_dt.timezone.utc)
    timing = {}
    if started is not None:
        timing = {
            "started": _dt.datetime.fromtimestamp(started.wall, _dt.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "wall_seconds": round(time.monotonic() - started.clock, 1),
        }
    info = {
        "stage": stage,
        "fingerprint": fingerprint,
        "created": now.isoformat(timespec="seconds"),
        **timing,
        "command": sys.argv,
        # what the config's relative paths are relative to (a rerun spelling them otherwise is compared
        # by the files they name: biomask.relocation.as_recorded)
        "cwd": os.getcwd(),
        "code": code_version(with_diff=True),
        "environment": environment(),
        "inputs": inputs or [],
        "seeds": seeds or {},
        **(extra or {}),
    }
    path = Path(directory) / "run.json"
    path.write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    return info


def read_run_info(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The `run.json` of an output directory, or None if it has none (or it is unreadable)."""
    path = Path(directory) / "run.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def written_by_biomask(info: dict[str, Any] | None) -> bool:
    """Whether a run.json is biomask's own (what --overwrite may replace): its stage and fingerprint,
    not merely a file of that name."""
    return (
        info is not None and isinstance(info.get("stage"), str) and isinstance(info.get("fingerprint"), str)
    )


# What a manifest records of where, from which files and by which code a store was made: not its data
_PROVENANCE_KEYS = ("config", "code", "sources")


def content_sha256(manifest: Mapping[str, Any]) -> str:
    """A digest of a store's data -- every shard's and the tokenizer's sha256, the fields, labels and
    counts -- without the output path, the input paths and the code version the manifest also holds:
    the same data prepared in another folder, on another machine or by another biomask gives the same
    digest (the manifest's own sha256, which reuse compares, differs)."""
    data = {key: value for key, value in manifest.items() if key not in _PROVENANCE_KEYS}
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, dict):  # frozen_from: the folder the panel was taken from
        data["tokenizer"] = {key: value for key, value in tokenizer.items() if key != "frozen_from"}
    return sha256_json(data)


def input_entry(name: str, root: str | os.PathLike) -> dict[str, Any]:
    """A store as a stage's recorded input: its manifest's sha256 (what a stage's fingerprint uses)
    and `content_sha256`, to compare the data of runs made elsewhere."""
    manifest = Path(root) / "manifest.json"
    entry: dict[str, Any] = {"name": name, "path": str(root), "sha256": sha256_file(manifest)}
    with contextlib.suppress(OSError, ValueError, TypeError):  # the store's own checks say what is wrong
        entry["content_sha256"] = content_sha256(json.loads(manifest.read_text(encoding="utf-8")))
    return entry
