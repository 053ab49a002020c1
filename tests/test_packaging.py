"""A built wheel is a complete biomask: installed with `pip install --no-deps --target` and run from a
directory without the repository's configs/, it prepares data, pretrains (reading its ZeRO preset) and
embeds, takes `configs/...` paths from the copy it ships, and finds the main job's pipeline and the
template pipeline. No network: the wheel is built without build isolation (setuptools is in the venv)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from biomask import datasets

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]  # the input is cut from the splice set

# What a wheel needs from the checkout; tests/, runs/ and caches are left behind.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "biomask", "configs")

# Runs inside the installed copy, in one process (one torch/DeepSpeed import for the three stages).
SCRIPT = """
import sys
from pathlib import Path
import anndata
import biomask
from biomask.cli import main

target = Path(sys.argv[1]).resolve()
table, work = sys.argv[2], Path.cwd()
assert Path(biomask.__file__).resolve().is_relative_to(target), biomask.__file__
assert not (work / "configs").exists()
tiny = ["model.d_model=32", "model.d_ff=64", "model.max_len=64", "data.max_length=62", "train.steps=3",
        "train.micro_batch_size=8", "train.eval_batches=1", "train.log_every=1", "train.progress=false"]
commands = [
    ["prep", "dna", "-c", "configs/dna/splice.yaml", f"inputs=[{{path: {table}}}]", "output=store"],
    ["pretrain", "-c", "configs/pretrain/dna-tiny.yaml", "data.store=store", "output=run", *tiny],
    ["embed", "--checkpoint", "run/model", "--input", table, "--output", "emb.h5ad"],
]
for argv in commands:
    assert main(argv) == 0, argv
print("cells embedded:", anndata.read_h5ad("emb.h5ad").obsm["X_biomask"].shape)

from biomask.main_job import DEFAULT_PIPELINE
from biomask.pipelines.plan import load_plan
from biomask.pipelines.templates import render_templates

assert Path(DEFAULT_PIPELINE).is_relative_to(target)
plan = load_plan(DEFAULT_PIPELINE, [f"run_dir={work / 'main'}"])  # checks every stage config
templates = render_templates()
print("main job stages:", len(plan.stages), "templates:", sorted(templates))
# no checkout, no .venv in the submit folder: a template runs the interpreter biomask is installed in
assert f"BIOMASK_PYTHON:-{sys.executable}" in templates["stage.sbatch"], templates["stage.sbatch"][:2000]
assert "repository root" not in templates["stage.sbatch"]
# the configs a user of the installed copy copies from: listed, and one printed whole with its comments
assert main(["configs"]) == 0 and main(["configs", "evaluate/motif-task.yaml"]) == 0
# a shipped pipeline named as the README names it: the records must name the file that was read
shipped = load_plan("configs/pipelines/dna-prep.yaml", [f"run_dir={work / 'prep'}"])
assert shipped.source.is_relative_to(target) and shipped.source.is_file(), shipped.source

# installed into a folder that is a git repository of the user's own: not biomask's commit
from biomask.provenance import code_version
assert code_version()["git_commit"] is None, code_version()

# a cells kernel compiled and cached: in the user's numba cache, not inside the installed package
import numpy as np
from biomask.cells.medians import _count_and_keep
_count_and_keep(np.array([0, 1]), np.array([0]), np.ones(1, np.float32), np.ones(1, np.float32),
                np.zeros(1, np.int64), np.zeros((1, 2), np.float32))
print("numba cache files inside the package:", len(list(target.rglob("*.nb[ic]"))))
"""


def test_wheel_installs_and_runs_outside_the_checkout(repo, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (repo / name).is_dir():
            shutil.copytree(repo / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(repo / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [
        *pip,
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        tmp_path / "dist",
        source,
    ]
    subprocess.run(build, check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("biomask-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("deepspeed/zero2.json", "pipelines/study-quick.yaml", "pipelines/dna-prep.yaml"):
        assert f"biomask/configs/{shipped}" in names
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", target, wheel], check=True)
    git = ["git", "-C", target, "-c", "user.name=u", "-c", "user.email=u@example.org"]
    subprocess.run(["git", "init", "-q", target], check=True)  # the user's project, biomask installed in it
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "user's project"], check=True)

    lines = [line.split(",") for line in datasets.fetch("uci-splice").read_text().splitlines() if "," in line]
    rows = [("".join(f.strip() for f in fields[:-1]), fields[-1].strip()) for fields in lines[::10][:300]]
    table = tmp_path / "splice-cut.csv"  # 300 real rows, every 10th (the file is sorted by class)
    table.write_text(
        "id,sequence,label\n" + "".join(f"r{i},{seq},{label}\n" for i, (seq, label) in enumerate(rows))
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    # a user's shell: no DS_ACCELERATOR, biomask picks the device (and tells DeepSpeed)
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {
        "PYTHONPATH": str(target),
        "OMP_NUM_THREADS": "1",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    env.pop("NUMBA_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(target), str(table)],
                          cwd=work, env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "cells embedded: (300, 32)" in done.stdout
    # the run's first line says where it trains and in what precision
    first = next(line for line in done.stderr.splitlines() if "pretrain:" in line)
    expected = (
        r"pretrain: cuda:0 \(.+ GiB\), precision (bf16|fp32) \(DS_ACCELERATOR=cuda\)"
        if torch.cuda.is_available()
        else r"pretrain: cpu \(\d+ threads?\), precision fp32 \(DS_ACCELERATOR=cpu\)"
    )
    assert re.search(expected, first), first
    assert "templates: ['pretrain.sbatch', 'stage.sbatch', 'sweep.sbatch']" in done.stdout
    assert "numba cache files inside the package: 0" in done.stdout
    assert "pretrain/dna-tiny.yaml" in done.stdout and "# Template: a MOTIF task" in done.stdout
    assert list((tmp_path / "cache" / "numba").rglob("*.nbi")), "the kernel was not cached at all"
    # a user cache that cannot be made (a read-only home): no cache, rather than numba's fallback to
    # the package's own __pycache__
    (tmp_path / "not-a-folder").write_text("")
    kernel = (
        "import numpy as np; from biomask.cells.medians import _count_and_keep; "
        "_count_and_keep(np.array([0, 1]), np.array([0]), np.ones(1, np.float32), np.ones(1, np.float32), "
        "np.zeros(1, np.int64), np.zeros((1, 2), np.float32))"
    )
    env["XDG_CACHE_HOME"] = str(tmp_path / "not-a-folder" / "cache")
    done = subprocess.run([sys.executable, "-c", kernel], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "compiling them for this run only" in done.stderr, done.stderr[-2000:]
    assert not list(target.rglob("*.nb[ic]"))
