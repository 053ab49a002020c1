"""One device decision for torch and DeepSpeed (issue 19): DS_ACCELERATOR is the user's choice and
torch follows it; unset, the GPU torch sees; a GPU that torch cannot use is said, not silently skipped."""

from __future__ import annotations

import logging

import pytest
import torch

from biomask.errors import ConfigError
from biomask.training import accelerator as acc


def test_unset_follows_torch_and_is_exported(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert acc.accelerator() == expected
    assert acc.os.environ["DS_ACCELERATOR"] == expected  # what DeepSpeed reads when it first picks
    assert acc.training_device(0).type == expected


@pytest.mark.parametrize("value", ["tpu", "cuda"])
def test_an_accelerator_torch_cannot_use_is_refused(monkeypatch, value):
    if value == "cuda" and torch.cuda.is_available():
        pytest.skip("torch sees a GPU here")
    monkeypatch.setenv("DS_ACCELERATOR", value)
    with pytest.raises(ConfigError, match=f"DS_ACCELERATOR={value}"):
        acc.accelerator()


def test_cpu_precision_and_description():
    cpu = torch.device("cpu")
    assert acc.resolve_precision("auto", cpu) == "fp32"
    assert acc.resolve_precision("bf16", cpu) == "bf16"  # an explicit choice is kept
    assert acc.describe(cpu).startswith("cpu (")


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees the GPU here")
def test_a_gpu_torch_cannot_see_is_reported(monkeypatch, caplog):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(acc, "nvidia_gpu_present", lambda: "/dev/nvidia0")
    acc._warn_unused_gpu.cache_clear()
    with caplog.at_level(logging.WARNING, logger="biomask"):
        assert acc.accelerator() == "cpu"
    acc._warn_unused_gpu.cache_clear()
    (record,) = [r for r in caplog.records if "/dev/nvidia0" in r.getMessage()]
    assert "training on the CPU" in record.getMessage()
    assert ("CPU build" in record.getMessage()) == (torch.version.cuda is None)


def test_torch_keeps_the_omp_threads_asked_for_after_scanpy_starts_numba():
    """OMP_NUM_THREADS=1 (what a pipeline gives each of two stages side by side): scanpy's normalize_total
    on a sparse matrix (pbmc68k_reduced's, made sparse) starts numba's OpenMP layer, which sets the shared runtime to every core, and torch then
    ran on all of them. honour_omp_threads (called where pretraining starts) gives torch its 1 back."""
    import json
    import os
    import subprocess
    import sys

    from biomask.resources import usable_cores

    script = (
        "import json, numpy as np, scipy.sparse as sp, torch, scanpy as sc\n"
        "from biomask.resources import honour_omp_threads\n"
        "start = torch.get_num_threads()\n"
        "a = sc.datasets.pbmc68k_reduced(); a.X = sp.csr_matrix(np.abs(a.raw.X.toarray()))\n"
        "sc.pp.normalize_total(a); sc.pp.log1p(a)\n"
        "after_scanpy = torch.get_num_threads()\n"
        "honour_omp_threads()\n"
        "print(json.dumps([start, after_scanpy, torch.get_num_threads()]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NUMBA_NUM_THREADS", None)
    env.pop("NUMBA_THREADING_LAYER", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    start, after_scanpy, honoured = json.loads(out.stdout.strip().splitlines()[-1])
    assert start == 1 and honoured == 1
    if usable_cores() > 1:  # the override this guards against (numba's pool: every core)
        assert after_scanpy > 1


def test_auto_counts_no_more_cores_than_the_cgroups_cpu_quota(tmp_path, monkeypatch):
    """A container run with `--cpus 2` on a 64-core host (docker, Kubernetes, a systemd slice) sees
    all 64 in its affinity mask: `local.jobs: auto` started 64 training tasks at once on 2 CPUs."""
    from biomask import resources

    def tree(files: dict[str, str], own: str) -> tuple:
        for name, text in files.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
        (tmp_path / "self-cgroup").write_text(own)
        return tmp_path, tmp_path / "self-cgroup"

    # cgroup v2: the process's own cgroup and its parents, the least quota of them
    v2 = {"cpu.max": "max 100000\n", "kube/cpu.max": "250000 100000\n", "kube/pod/cpu.max": "max 100000\n"}
    assert resources.cgroup_cpu_quota(*tree(v2, "0::/kube/pod\n")) == 2.5
    (tmp_path / "kube/pod/cpu.max").write_text("400000 100000\n")  # the tighter of the two holds
    assert resources.cgroup_cpu_quota(tmp_path, tmp_path / "self-cgroup") == 2.5
    # cgroup v1 in a container without a cgroup namespace: the host's path, only the mount root here
    (tmp_path / "cpu.max").unlink()
    v1 = {"cpu,cpuacct/cpu.cfs_quota_us": "150000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    own = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n"
    root, own_file = tree(v1, own)
    assert resources.cgroup_cpu_quota(root, own_file) == 1.5
    (root / "cpu,cpuacct/cpu.cfs_quota_us").write_text("-1\n")  # v1's "no quota"
    assert resources.cgroup_cpu_quota(root, own_file) is None
    assert resources.cgroup_cpu_quota(root, tmp_path / "no-such-file") is None

    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(resources, "cgroup_cpu_quota", lambda: 2.5)
    assert resources.usable_cores() == 3
    monkeypatch.setattr(resources, "cgroup_cpu_quota", lambda: None)
    assert resources.usable_cores() == 64
    monkeypatch.setattr(resources, "cgroup_cpu_quota", lambda: 0.5)
    assert resources.usable_cores() == 1


def test_an_omp_num_threads_beyond_the_cores_is_cut_to_them_and_said(monkeypatch, caplog):
    """OMP_NUM_THREADS=100000 (a typo) segfaulted pretrain and evaluate where torch alone holds to its
    cores: biomask's thread settings take at most the usable cores, and say so."""
    import logging

    import torch

    from biomask import resources

    monkeypatch.setattr(resources, "usable_cores", lambda: 2)
    monkeypatch.setattr(resources, "_said_omp_cap", False)
    monkeypatch.setenv("OMP_NUM_THREADS", "100000")
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING, logger="biomask"):
            assert resources.resolve_threads("auto") == 2
            resources.honour_omp_threads()
            assert torch.get_num_threads() == 2
        assert caplog.text.count("OMP_NUM_THREADS=100000 is more than the 2 core(s)") == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert resources.resolve_threads("auto") == 1 and resources.resolve_threads(3) == 3
    finally:
        torch.set_num_threads(before)


def test_an_omp_num_threads_of_zero_is_no_thread_count(monkeypatch):
    """OMP_NUM_THREADS=0 names no count (torch.set_num_threads(0) raises): torch's own stands."""
    import torch

    from biomask import resources

    monkeypatch.setenv("OMP_NUM_THREADS", "0")
    assert resources.omp_threads() is None
    before = torch.get_num_threads()
    resources.honour_omp_threads()
    assert torch.get_num_threads() == before


def test_an_omp_num_threads_that_is_no_count_is_said_and_spaces_are_read(monkeypatch, caplog):
    """OMP_NUM_THREADS=abc was ignored in silence (every core: libgomp's own line names no remedy),
    and " 1" — which libgomp and torch read as 1 — was no count to biomask."""
    import logging

    from biomask import resources

    monkeypatch.setattr(resources, "usable_cores", lambda: 2)
    monkeypatch.setattr(resources, "_said_omp_bad", False)
    monkeypatch.setenv("OMP_NUM_THREADS", " 1")
    assert resources.omp_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2,1")  # nested levels, as libgomp reads them: the outer's
    assert resources.omp_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "abc")
    with caplog.at_level(logging.WARNING, logger="biomask"):
        assert resources.omp_threads() is None and resources.resolve_threads("auto") == 2
    assert caplog.text.count("OMP_NUM_THREADS='abc' is not a positive whole number") == 1


def test_a_command_gives_the_callers_environment_back(tmp_path, monkeypatch, cli):
    """main() in a script or notebook left TQDM_DISABLE (no progress bars in the caller from then on)
    and ONEDNN_PRIMITIVE_CACHE_CAPACITY set, and prep dna RAYON_NUM_THREADS, in the caller's
    environment and in every process it started later; the caller's own values stay."""
    import os

    from biomask.dna.config import DNAPrepConfig
    from biomask.dna.prep import prep_dna

    for name in ("TQDM_DISABLE", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "RAYON_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    code, _, _ = cli("--quiet", "datasets", "list")
    assert code == 0
    assert "TQDM_DISABLE" not in os.environ and "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    assert cli("datasets", "list")[0] == 0 and os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"
    table = tmp_path / "labelled.csv"
    table.write_text("sequence,label\n" + "".join(f"{'ACGT'[i % 4] * 40},{i % 2}\n" for i in range(40)))
    cfg = {"inputs": [{"path": str(table)}], "output": str(tmp_path / "store"), "num_workers": 2}
    prep_dna(DNAPrepConfig.model_validate(cfg))
    assert (tmp_path / "store" / "manifest.json").is_file() and "RAYON_NUM_THREADS" not in os.environ
