"""atomic_file: the one way biomask writes a single file (embed's .h5ad output, fit_cells' input copy,
sbatch scripts, downloads, JSON/YAML beside runs) -- the old file or the whole new one, never part;
and the clean-up of what killed runs left beside an output, which spares a live writer's temporary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from biomask.outputs import atomic_file, atomic_write_text


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out" / "emb.h5ad"  # the folder is created
    atomic_write_text(target, "first")
    assert target.read_text() == "first"

    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half of the sec")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "first"

    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and not tmp.exists()  # same folder: the rename is atomic
        tmp.write_text("second")
        assert target.read_text() == "first"  # nothing replaced until the block ends
    assert target.read_text() == "second"

    with atomic_file(target) as tmp:
        tmp.write_text("second")
        tmp.unlink()  # the writer decided to keep the old file (e.g. identical content)
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["emb.h5ad"]  # no temporary left


def test_a_replaced_file_keeps_its_privacy_and_a_write_protected_one_is_not_replaced(tmp_path):
    """embed's `overwrite_input` replaced a private (0600) .h5ad of patient data with a 0644 one, and
    a write-protected (0444) file, even another user's, as easily as any: the rename needs only the
    folder. The new file is never readable by more than the old; a protected file is refused, exit 2."""
    from biomask.errors import EnvironmentIOError

    private = tmp_path / "private.h5ad"
    private.write_text("cells")
    private.chmod(0o600)
    with atomic_file(private) as tmp:
        tmp.write_text("cells + X_biomask")
        tmp.chmod(0o644)  # what a copy under umask 022 gets
    assert private.read_text() == "cells + X_biomask" and private.stat().st_mode & 0o777 == 0o600
    script = (
        tmp_path / "job.sbatch"
    )  # bits the writer sets (an executable script) stay where the old had them
    script.write_text("old")
    script.chmod(0o750)
    with atomic_file(script) as tmp:
        tmp.write_text("new")
        tmp.chmod(0o755)
    assert script.stat().st_mode & 0o777 == 0o750
    protected = tmp_path / "protected.h5ad"
    protected.write_text("mine")
    protected.chmod(0o444)
    with (
        pytest.raises(
            EnvironmentIOError, match=r"protected.h5ad is write-protected \(mode 0444\).*chmod u\+w"
        ),
        atomic_file(protected) as tmp,
    ):
        tmp.write_text("replaced")
    assert protected.read_text() == "mine" and not list(tmp_path.glob(".protected*"))


def test_another_users_file_is_said_to_be_theirs_not_write_protected():
    """A file of another user's with write bits for its owner: "write-protected (mode 0664) ...
    chmod u+w" named the wrong cause and a remedy the user cannot apply."""
    import contextlib
    import shutil
    import tempfile

    from biomask.errors import EnvironmentIOError

    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    folder = Path(tempfile.mkdtemp(prefix="biomask-test-", dir="/tmp"))
    try:
        folder.chmod(0o777)
        theirs = folder / "emb.h5ad"
        theirs.write_text("root's")
        theirs.chmod(0o664)
        with contextlib.ExitStack() as stack:
            os.setegid(65534)  # not root's group either, which may write the file (0664)
            stack.callback(os.setegid, 0)
            os.seteuid(65534)
            stack.callback(os.seteuid, 0)
            with pytest.raises(EnvironmentIOError) as refused, atomic_file(theirs) as tmp:
                tmp.write_text("nobody's")
        said = str(refused.value)
        assert (
            "(mode 0664) is not writable by this user: it is another user's" in said
            and "ask its owner" in said
        )
        assert "chmod" not in said and theirs.read_text() == "root's"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_an_output_under_a_file_is_refused_naming_it(tmp_path):
    """`--output notes.txt/out.h5ad`: exit 2 (EnvironmentIOError) naming the part that is a file, not
    a FileExistsError traceback; the file stays as it was."""
    from biomask.errors import EnvironmentIOError

    (tmp_path / "notes.txt").write_text("mine")
    for target in ("notes.txt/out.h5ad", "notes.txt/sub/out.h5ad"):
        with pytest.raises(EnvironmentIOError, match="notes.txt"), atomic_file(tmp_path / target) as tmp:
            tmp.write_text("x")
    assert (tmp_path / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt"
    ]


def test_reusing_an_output_removes_a_killed_runs_temporary_but_not_a_live_ones(tmp_path):
    """A run killed between its rename and its clean-up leaves a temporary that a later reuse removes;
    one that a live run (another process, a second notebook) is writing is left alone."""
    from biomask.outputs import atomic_output_dir, check_output
    from biomask.provenance import write_run_info

    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        write_run_info(tmp, stage="s", fingerprint="f")
    dead = tmp_path / ".out.tmp-0badc0de"
    dead.mkdir()
    (dead / "half.bin").write_bytes(b"x")
    with atomic_output_dir(out) as live:
        (live / "data.bin").write_bytes(b"y")
        assert check_output(out, "f") is True  # reused ...
        assert live.is_dir() and (live / "data.bin").exists()  # ... the writer's work untouched
        assert not dead.exists()
        write_run_info(live, stage="s", fingerprint="g")
    assert (out / "data.bin").exists() and not list(tmp_path.glob(".out.*"))


def test_a_new_write_removes_a_killed_runs_temporary_before_it_writes(tmp_path):
    """A temporary a SIGKILL left (OOM killer, a time limit) is as large as the output: the rerun
    removes it as it starts, not once it has written a second copy beside it, which a nearly full
    disk has no room for. A temporary a live run holds stays."""
    from biomask.outputs import atomic_output_dir

    out = tmp_path / "store"
    dead = tmp_path / ".store.tmp-0badc0de"
    dead.mkdir()
    (dead / "shard-00000.tokens.npy").write_bytes(b"\0" * 1024)
    previous = tmp_path / ".store.old-0badc0de"  # a whole earlier output, caught mid-swap
    previous.mkdir()
    with atomic_output_dir(out) as live:
        with atomic_output_dir(out) as tmp:
            assert not dead.exists()  # gone before the writer writes anything
            assert live.is_dir()  # another writer's, still held
            assert previous.is_dir()  # kept until a new output is in place
            (tmp / "manifest.json").write_text("{}")
        assert (out / "manifest.json").exists() and live.is_dir() and not previous.exists()


def test_run_json_identifies_the_code_and_reuse_says_when_other_code_wrote_it(tmp_path, caplog):
    """run.json records the sha256 of biomask's source (the code, also outside git or dirty), the
    threads and the libraries results depend on; reuse compares configs and inputs, not code, so
    reusing an output other code wrote says so."""
    import json
    import logging

    from biomask.config import Config
    from biomask.provenance import code_differs, code_version, environment, source_sha256
    from biomask.stage import StageOutput

    class Tiny(Config):
        n: int = 1

    code = code_version()
    assert len(code["source_sha256"]) == 64 and code["source_sha256"] == source_sha256()
    env = environment()
    assert {"scikit-learn", "scipy", "safetensors", "transformers"} <= set(env["packages"])
    assert "torch_threads" in env and "ds_accelerator" in env
    stage = StageOutput("tiny", Tiny(), tmp_path / "out")
    with stage.writing() as tmp:
        (tmp / "x.txt").write_text("x")
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["code"]["source_sha256"] == source_sha256() and code_differs(info) is None
    with caplog.at_level(logging.WARNING, logger="biomask.stage"):
        assert stage.is_current()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    info["code"]["source_sha256"] = "0" * 64  # written by another version of biomask
    (tmp_path / "out" / "run.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING, logger="biomask.stage"):
        assert stage.is_current()  # still reused: the config and inputs are the same
    assert any(
        "written by other code" in r.getMessage() and "--overwrite" in r.getMessage() for r in caplog.records
    )
    older = {"code": {"git_commit": "abc", "git_dirty": False}}  # before the source hash was kept
    assert code_differs(older) == (
        None if code["git_commit"] is None else f"commit abc (now {code['git_commit'][:10]})"
    )


def test_on_a_file_system_without_locks_outputs_are_still_written_and_the_user_told(
    tmp_path, monkeypatch, caplog
):
    """Some NFS mounts refuse flock (ENOLCK). Nothing there had ever run: the output lock and the
    live-temporary check each fall back, and a run must still write its output whole, clean up a
    killed run's temporary, and say that a second run into the output would not be refused."""
    import errno
    import logging

    from biomask import outputs
    from biomask.provenance import write_run_info

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(outputs.fcntl, "flock", no_locks)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="biomask"):
        held = outputs.hold_output(out, "pretrain")
    assert held is None
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text
    assert "Keep to one run per output" in caplog.text
    dead = tmp_path / ".out.tmp-0badc0de"
    dead.mkdir()
    with outputs.atomic_output_dir(out) as tmp:
        assert not dead.exists()  # no lock to tell a live writer by: a killed run's temporary goes
        (tmp / "data.bin").write_bytes(b"y")
        write_run_info(tmp, stage="s", fingerprint="f")
    assert (out / "data.bin").read_bytes() == b"y" and outputs.check_output(out, "f") is True
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".out.lock")) == ["out"]


def test_a_pipeline_run_on_a_file_system_without_locks_runs_and_says_so(dna_pipeline, monkeypatch, caplog):
    """`pipeline run`, its --dry-run and `pipeline status` ended in a traceback (ENOLCK) where every
    stage alone warned and went on."""
    import errno
    import logging

    from biomask.pipelines import runs
    from biomask.pipelines.plan import load_plan

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runs.fcntl, "flock", no_locks)
    plan = load_plan(dna_pipeline)
    with caplog.at_level(logging.WARNING, logger="biomask"), runs.run_lock(plan):
        assert runs.run_in_progress(plan.run_dir) is None  # nothing to tell a live run by
        assert (plan.run_dir / runs.LOCK_NAME).read_text().startswith(f"pid {os.getpid()}")
    assert "cannot lock" in caplog.text and "Keep to one run per run_dir" in caplog.text
    assert (plan.run_dir / runs.LOCK_NAME).read_text() == ""


def test_an_output_folder_that_refuses_files_is_said_before_the_work_and_a_foreign_lock_file_still_locks(
    tmp_path, monkeypatch
):
    """A non-root user's output in a folder they cannot write: the lock was skipped as "no locks
    here", every seed of an evaluation (or every cell of an embed) ran, then the write failed. Now it
    is exit 2 naming the folder at once. A lock file another user's killed run left (a group-shared
    folder) is opened read-only: flock needs no write access. (Tests run as root, which no permission
    stops, so the refusals are the file system's errors, raised where biomask opens the lock.)"""
    import errno

    from biomask import outputs
    from biomask.errors import EnvironmentIOError

    real_open = outputs.open_own

    def refuse(errno_code):
        def open_own(path, flags):
            if flags & os.O_RDWR:
                raise PermissionError(errno_code, os.strerror(errno_code), str(path))
            return real_open(path, flags)

        return open_own

    out = tmp_path / "shared" / "eval"
    for code in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC):  # no permission, read-only, full
        monkeypatch.setattr(outputs, "open_own", refuse(code))
        with pytest.raises(
            EnvironmentIOError, match=r"cannot write output .*eval: .*shared.*choose an output in a folder"
        ):
            outputs.hold_output(out, "evaluate")
    monkeypatch.setattr(outputs, "open_own", refuse(errno.EACCES))
    (tmp_path / "shared" / ".eval.lock").write_text("")  # left by another user's killed run
    real_access = os.access  # in a folder this user cannot write either: the output cannot be written
    monkeypatch.setattr(
        outputs.os, "access", lambda p, mode: Path(p) != tmp_path / "shared" and real_access(p, mode)
    )
    with pytest.raises(EnvironmentIOError, match="cannot write output"):
        outputs.hold_output(out, "evaluate")
    monkeypatch.setattr(outputs.os, "access", real_access)
    held = outputs.hold_output(out, "evaluate")
    assert held is not None
    monkeypatch.setattr(outputs, "open_own", real_open)
    from biomask.errors import OutputBusyError

    with pytest.raises(OutputBusyError):  # the read-only descriptor's lock holds
        outputs.hold_output(out, "evaluate")
    held.release()


def test_a_previous_output_that_cannot_be_removed_is_said_not_kept_silently(tmp_path, monkeypatch, caplog):
    """--overwrite of an output holding another user's files: the new output went into place and the
    old one stayed hidden beside it (`.NAME.old-*`, all of its size), without a word, retried in
    silence by every later write."""
    import logging
    import shutil

    from biomask import outputs

    out = tmp_path / "store"
    out.mkdir()
    (out / "shard.npy").write_bytes(b"x" * 2**20)
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(
        outputs.shutil,
        "rmtree",
        lambda path, ignore_errors=False: None if ".old-" in str(path) else real_rmtree(path),
    )  # what rmtree(ignore_errors=True) does where the files are not this user's to delete
    with caplog.at_level(logging.WARNING, logger="biomask"), outputs.atomic_output_dir(out) as tmp:
        (tmp / "shard.npy").write_bytes(b"y")
    left = [p for p in tmp_path.iterdir() if ".store.old-" in p.name]
    assert (out / "shard.npy").read_bytes() == b"y" and len(left) == 1
    assert f"could not remove {left[0]} (1.0 MB left; files this user cannot delete?)" in caplog.text
    # the run a pretrain --overwrite replaced, kept inside the new one until it finishes, likewise
    from biomask.training import rundir

    replaced = tmp_path / "run" / rundir.REPLACED
    replaced.mkdir(parents=True)
    (replaced / "weights.bin").write_bytes(b"x" * 2**21)
    monkeypatch.setattr(outputs.shutil, "rmtree", lambda path, ignore_errors=False: None)
    with caplog.at_level(logging.WARNING, logger="biomask"):
        rundir.drop_replaced(tmp_path / "run")
    assert f"could not remove {replaced} (2.0 MB left" in caplog.text


def test_a_checkpoint_of_the_same_weights_with_another_config_is_named_in_a_refusal():
    """A model retrained to bit-identical weights under a new commit changes only its config.json: the
    evaluation downstream was refused as "same config, different input data or format version",
    naming nothing."""
    from biomask.outputs import input_changes

    was = [{"name": "r2mae", "path": "runs/p/model", "sha256": "a" * 64, "config_sha256": "b" * 64}]
    now = [{**was[0], "config_sha256": "c" * 64}]
    (line,) = input_changes(was, now)
    assert line.startswith(
        "r2mae: runs/p/model, the same weights with another config.json (bbbbbbbbbbbb -> cccccccccccc)"
    )
    assert input_changes(was, was) == []
    assert (
        input_changes([{k: v for k, v in was[0].items() if k != "config_sha256"}], now) == []
    )  # not recorded
    # a store prepared again with only a result-free setting changed (block_size): the manifest's
    # sha256 moves, its data's does not, and the refusal said "other input data" as if it had
    store = {"name": "token-store", "path": "runs/prep", "sha256": "d" * 64, "content_sha256": "e" * 64}
    (line,) = input_changes([store], [{**store, "sha256": "f" * 64}])
    assert "its data are the same (content_sha256 unchanged)" in line and "--overwrite reruns it" in line
    (line,) = input_changes([store], [{**store, "sha256": "f" * 64, "content_sha256": "0" * 64}])
    assert "its data are the same" not in line
    fasta = {"name": "genome", "path": "g.fa", "sha256": "d" * 64}  # no content digest: nothing claimed
    (line,) = input_changes([fasta], [{**fasta, "sha256": "f" * 64}])
    assert "its data are the same" not in line


def test_a_link_left_at_the_name_of_a_lock_or_a_log_is_refused_and_what_it_points_at_untouched(
    tmp_path, dna_pipeline
):
    """Locks and logs are files biomask writes in place (truncated, appended to): a symbolic or hard
    link planted at their name once made it truncate the user's file the link pointed at, or create
    one outside the run folder."""
    from biomask.errors import InputError
    from biomask.outputs import append_own, hold_output, lock_file
    from biomask.pipelines.plan import load_plan
    from biomask.pipelines.runs import LOCK_NAME, run_lock
    from biomask.training.metrics import MetricsLogger

    victim = tmp_path / "precious.txt"
    victim.write_text("the user's data\n")
    out = tmp_path / "out"
    lock = lock_file(out)
    lock.symlink_to(victim)
    with pytest.raises(InputError, match=f"{lock} is a symbolic link \\(to {victim}\\).*remove the link"):
        hold_output(out, "embed")
    lock.unlink()
    lock.symlink_to(tmp_path / "created-outside")  # dangling: following it would create the file
    with pytest.raises(InputError, match="symbolic link"):
        hold_output(out, "embed")
    lock.unlink()
    os.mkfifo(lock)  # not waited on for a reader: refused
    with pytest.raises(InputError, match="is not a regular file"):
        hold_output(out, "embed")
    lock.unlink()
    with hold_output(out, "embed") as held:  # the lock biomask creates itself is taken as before
        assert held is not None and lock.is_file()

    plan = load_plan(dna_pipeline)
    plan.run_dir.mkdir(parents=True)
    (plan.run_dir / LOCK_NAME).symlink_to(victim)
    with pytest.raises(InputError, match="symbolic link"), run_lock(plan):
        pass
    # another user's lock file (a group-shared run folder): opened read-only, it still locks, where
    # its O_RDWR open stopped every other user's `pipeline run` (root, here, stands in for them)
    import errno

    from biomask.pipelines import runs

    (plan.run_dir / LOCK_NAME).unlink()
    (plan.run_dir / LOCK_NAME).write_text("")
    real_open = runs.open_own

    def not_writable(path, flags):
        if flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runs, "open_own", not_writable)
        with run_lock(plan):
            patch.setattr(runs, "open_own", real_open)
            with pytest.raises(InputError, match="in use by another"), run_lock(plan):
                pass
    log = plan.run_dir / "stage.log"
    log.symlink_to(victim)
    with pytest.raises(InputError, match="symbolic link"):
        append_own(log)
    os.mkfifo(plan.run_dir / "fifo.log")
    with pytest.raises(InputError, match="is not a regular file"):
        append_own(plan.run_dir / "fifo.log")
    # created as open() creates, under the umask: a group-shared run folder stays the group's
    before = os.umask(0o002)
    try:
        append_own(plan.run_dir / "shared.log").close()
    finally:
        os.umask(before)
    assert (plan.run_dir / "shared.log").stat().st_mode & 0o777 == 0o664
    snapshot = plan.run_dir / "snapshot.log"  # hard links (cp -al, rsnapshot) are not refused
    os.link(plan.run_dir / "shared.log", snapshot)
    with append_own(snapshot) as handle:
        handle.write("appended\n")

    run = tmp_path / "pretrain-run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(tmp_path / "metrics-outside.jsonl")
    with pytest.raises(InputError, match="symbolic link"):
        MetricsLogger(run, total_steps=4, start_step=2, enabled=True, progress=False, report_to=())
    (run / "metrics.jsonl").unlink()
    (run / "tensorboard").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(InputError, match="tensorboard is a symbolic link"):
        MetricsLogger(run, total_steps=4, start_step=2, enabled=True, progress=False)
    assert victim.read_text() == "the user's data\n"
    assert not (tmp_path / "created-outside").exists() and not (tmp_path / "metrics-outside.jsonl").exists()
    assert not list(tmp_path.glob("events.out.tfevents*"))


def test_a_resumed_run_drops_metrics_lines_it_did_not_write(tmp_path):
    from biomask.training.metrics import MetricsLogger

    lines = [
        '{"step": 1, "kind": "train", "loss": 1.0}',
        "5",
        '{"step": "x"}',
        '{"step": 3, "kind": "train"}',
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    logger = MetricsLogger(tmp_path, total_steps=4, start_step=2, enabled=True, progress=False, report_to=())
    logger.close()
    assert (tmp_path / "metrics.jsonl").read_text() == lines[0] + "\n"


def test_a_run_from_an_edited_checkout_records_the_edit_itself(tmp_path, monkeypatch):
    """A commit and "dirty" cannot rebuild code edited mid-study (the main job's cell arms once ran
    from three edited trees that nothing kept): run.json keeps the uncommitted change to biomask's
    source, and the source files git does not track."""
    import subprocess

    from biomask.provenance import _uncommitted

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "biomask").mkdir()
    (tmp_path / "biomask" / "model.py").write_text("WIDTH = 64\n")
    (tmp_path / "notes.txt").write_text("not source\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    (tmp_path / "biomask" / "model.py").write_text("WIDTH = 128\n")
    (tmp_path / "biomask" / "extra.py").write_text("NEW = 1\n")
    (tmp_path / "notes.txt").write_text("edited, but not source\n")
    (tmp_path / "biomask" / "weights.bin").write_bytes(b"\0")  # not source
    found = _uncommitted(tmp_path)
    assert "-WIDTH = 64\n+WIDTH = 128" in found["git_diff"] and "notes.txt" not in found["git_diff"]
    assert found["git_untracked"] == ["biomask/extra.py"] and len(found["git_diff_sha256"]) == 64
    # and run.json records it, where a manifest's or checkpoint's code record does not
    import biomask
    from biomask.provenance import code_version, write_run_info

    monkeypatch.setattr(biomask, "__file__", str(tmp_path / "biomask" / "__init__.py"))
    monkeypatch.setattr("biomask.provenance.source_checkout", lambda: tmp_path)  # biomask's own tree
    info = write_run_info(tmp_path / "biomask", stage="test", fingerprint="f")
    assert info["code"]["git_dirty"] and "+WIDTH = 128" in info["code"]["git_diff"]
    assert "git_diff" not in code_version()


def test_a_refusal_names_the_output_not_its_hidden_temporary():
    """A read-only run folder refused `.config.yaml.tmp-61d92223`: a name the user never gave. The
    message names the file they know, the temporary beside it in brackets."""
    import errno

    from biomask.errors import describe_os_error

    said = describe_os_error(
        PermissionError(errno.EACCES, "Permission denied", "/w/run/.config.yaml.tmp-61d92223")
    )
    assert said.startswith(
        "cannot use /w/run/config.yaml (its temporary .config.yaml.tmp-61d92223): Permission denied"
    )
    moved = OSError(errno.EACCES, "Permission denied", "/w/pt", None, "/w/.pt.old-1a2b3c4d")
    assert "cannot use /w/pt -> /w/pt (its earlier copy, set aside as .pt.old-1a2b3c4d)" in describe_os_error(
        moved
    )
    plain = describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/w/.hidden.tmp-file"))
    assert plain.startswith("cannot use /w/.hidden.tmp-file: No space left")  # not biomask's pattern: as is


def test_a_refusal_names_changed_data_before_keys_an_older_output_lacked(tmp_path):
    """An evaluation written before splits.group existed, of a store prepared again since: the refusal
    named the added keys (absent there, at their defaults here) and hid the store that changed. A key
    both configs give at values that behave as its absence (device auto -> cpu) is named."""
    from biomask.outputs import _describe_difference
    from biomask.provenance import write_run_info

    out = tmp_path / "ev"
    out.mkdir()
    (out / "config.yaml").write_text("store: s\ndevice: auto\n")
    write_run_info(
        out, stage="evaluate", fingerprint="f", inputs=[{"name": "store", "path": "s", "sha256": "a" * 64}]
    )
    new = {"store": "s", "device": "auto", "splits": {"group": "none", "min_shared": 32}}
    changed_data = _describe_difference(out, new, (), [{"name": "store", "path": "s", "sha256": "b" * 64}])
    assert "store: s" in changed_data and "splits.group" not in changed_data, changed_data
    same_data = _describe_difference(
        out, {**new, "device": "cpu"}, (), [{"name": "store", "path": "s", "sha256": "a" * 64}]
    )
    assert "device: 'auto' -> 'cpu'" in same_data and "splits.group" not in same_data, same_data


def test_an_output_named_by_a_link_is_written_into_the_folder_it_points_at(tmp_path, genome_store):
    """A workflow engine's task (Nextflow) links a stable folder into its work folder as the output,
    so that a retry resumes there. The link was renamed aside and a new folder made in its place: the
    target stayed empty, the output was lost with the work folder, and pretrain left a hidden link
    behind. A link to a folder not made yet failed after the work (prep, evaluate) or was a
    traceback (pretrain). Each writes into the link's target now, and the link stays."""
    from biomask.errors import InputError, StaleOutputError
    from biomask.outputs import atomic_output_dir, check_output
    from biomask.provenance import read_run_info, write_run_info
    from tests.conftest import _pretrain

    work, stable = tmp_path / "work", tmp_path / "stable"
    work.mkdir()
    (stable / "prep").mkdir(parents=True)
    (work / "prep").symlink_to(stable / "prep")  # a folder made for it
    (work / "eval").symlink_to(stable / "eval")  # not made yet
    for name in ("prep", "eval"):
        with atomic_output_dir(work / name) as tmp:
            write_run_info(tmp, stage="s", fingerprint="f")
        assert (work / name).is_symlink() and (stable / name / "run.json").is_file(), name
    assert sorted(p.name for p in work.iterdir()) == ["eval", "prep"]  # nothing else left there
    # another config through the link: --overwrite replaces the folder it points at (it was refused:
    # "--overwrite replaces a folder, not a link", so a linked output could never take a change)
    with pytest.raises(StaleOutputError):
        check_output(work / "prep", "g")
    assert check_output(work / "prep", "g", overwrite=True) is False
    with atomic_output_dir(work / "prep") as tmp:
        write_run_info(tmp, stage="s", fingerprint="g")
    assert (work / "prep").is_symlink() and read_run_info(stable / "prep")["fingerprint"] == "g"
    assert sorted(p.name for p in work.iterdir()) == ["eval", "prep"]
    # ... but never the run's own input: a labelled table prepared with `tokenizer.path` in the store
    # a link names replaced that store (the pretraining corpus) through the link
    (stable / "prep" / "tokenizer").mkdir()
    (stable / "prep" / "tokenizer" / "tokenizer.json").write_text("{}")
    for inputs in ([stable / "prep" / "tokenizer" / "tokenizer.json"], [stable / "prep"], [work / "prep"]):
        with pytest.raises(InputError, match="contains the run's input"):
            check_output(work / "prep", "h", overwrite=True, inputs=inputs)
    with pytest.raises(InputError, match="lies inside the run's input"):
        check_output(work / "prep" / "sub", "h", overwrite=True, inputs=[stable / "prep"])

    (stable / "pretrain").mkdir()
    (work / "pretrain").symlink_to(stable / "pretrain")
    (work / "fresh").symlink_to(stable / "not-yet" / "fresh")
    tiny = {"data.store": genome_store, "data.max_length": 66, "model.max_len": 66, "train.steps": 2}
    for name in ("pretrain", "fresh"):
        _pretrain("configs/pretrain/dna-tiny.yaml", work / name, **tiny)
        assert (work / name).is_symlink(), name
        assert (Path(os.path.realpath(work / name)) / "model" / "model.safetensors").is_file(), name
    assert sorted(p.name for p in work.iterdir()) == ["eval", "fresh", "prep", "pretrain"]


def test_a_stages_duration_counts_the_work_done_before_it_writes(tmp_path):
    """`biomask evaluate` fits every model, then writes its folder: run.json's wall_seconds timed the
    writing alone (0.0 s for a nine-minute evaluation), so no figure of how long a stage took could
    be checked against its run folder. The clock starts when the stage resolves its output."""
    import json
    import time

    from biomask.config import Config
    from biomask.stage import StageOutput

    class Tiny(Config):
        n: int = 1

    stage = StageOutput("evaluate", Tiny(), tmp_path / "out")
    time.sleep(1.2)  # the fitting
    with stage.writing() as tmp:
        (tmp / "metrics.json").write_text("{}", encoding="utf-8")
    run = json.loads((tmp_path / "out" / "run.json").read_text(encoding="utf-8"))
    assert 1.2 <= run["wall_seconds"] < 60, run


def test_a_clock_stepped_back_during_a_stage_gives_no_negative_duration(tmp_path):
    """A stage's duration was its wall-clock start subtracted from its end: an NTP step or a VM
    restored mid-run gave run.json `wall_seconds: -7195.5`. Measured on a monotonic clock now; the
    start stays the wall-clock time it was."""
    import time

    from biomask.provenance import Began, write_run_info

    then = time.time() + 7200  # the start as the clock read it, two hours before it was stepped back
    began = Began(then, time.monotonic() - 1.5)
    info = write_run_info(tmp_path, stage="s", fingerprint="f", started=began)
    assert 1.5 <= info["wall_seconds"] < 60, info
    assert info["started"] > info["created"]  # the wall-clock stamps as the clock gave them


def test_a_metrics_line_the_disk_refuses_names_the_file_and_is_said_once(tmp_path):
    """A full disk while pretrain wrote a metrics line: "cannot use: No space left on device" named no
    file, and closing the log on the way out raised again from the same disk, hiding the first."""
    import errno

    from biomask.training.metrics import MetricsLogger

    class Full:
        def write(self, text=""):
            raise OSError(errno.ENOSPC, "No space left on device")

        close = write

    logger = MetricsLogger(tmp_path, total_steps=10, start_step=0, enabled=True, progress=False, report_to=())
    logger.file.close()
    logger.file = Full()
    with pytest.raises(OSError) as refused:
        logger.log(1, "train", {"loss": 1.0})
    assert refused.value.errno == errno.ENOSPC and refused.value.filename == str(tmp_path / "metrics.jsonl")
    logger.close()  # quiet: the error above is the one the user is told
    # a close that fails after every line was written (its buffer flushed then) is said, naming it
    logger = MetricsLogger(tmp_path, total_steps=10, start_step=0, enabled=True, progress=False, report_to=())
    logger.file.close()
    logger.file = Full()
    with pytest.raises(OSError) as refused:
        logger.close()
    assert refused.value.filename == str(tmp_path / "metrics.jsonl")


def test_recording_the_code_version_never_takes_gits_index_lock(tmp_path, monkeypatch):
    """`git status` / `git diff` refresh the index under .git/index.lock: a developer's own `git commit`
    beside a running biomask failed ("index.lock: File exists"), and a biomask killed meanwhile left
    the lock for them to remove. Every git call biomask makes is a reader's (GIT_OPTIONAL_LOCKS=0) —
    which a git before 2.15 ignores, where its option `--no-optional-locks` failed every call and no
    commit was recorded (the stand-in below refuses that option as git 1.8 does)."""
    import shutil
    import stat

    from biomask.provenance import code_version, source_checkout

    if source_checkout() is None or shutil.which("git") is None:
        pytest.skip("not run from a git checkout of biomask")
    calls = tmp_path / "calls"
    shim = tmp_path / "bin" / "git"
    shim.parent.mkdir()
    shim.write_text(
        "#!/bin/sh\n"
        'case "$1" in --no-optional-locks) echo "Unknown option: $1" >&2; exit 129;; esac\n'
        f'echo "locks=$GIT_OPTIONAL_LOCKS $*" >> {calls}\n'
        f'exec {shutil.which("git")} "$@"\n'
    )
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{shim.parent}:{os.environ['PATH']}")
    info = code_version(with_diff=True)
    lines = calls.read_text().splitlines()
    assert info["git_commit"] and len(lines) >= 2
    assert all(line.startswith("locks=0 ") for line in lines), lines


def test_a_hung_git_is_stopped_with_its_children_at_the_time_limit(tmp_path, monkeypatch):
    """A git that never answers (a hook, an fsmonitor or a credential helper waiting) is given up at
    the limit with what it started: its child held git's pipes, so the limit waited on it, and
    killing git alone left the child running after biomask had gone on."""
    import stat
    import subprocess
    import time

    from biomask.provenance import _git

    pidfile = tmp_path / "child.pid"
    shim = tmp_path / "bin" / "git"
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {pidfile}\nwait\n", encoding="utf-8")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{shim.parent}:{os.environ['PATH']}")
    began = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        _git(tmp_path, "status", timeout=1)
    assert time.monotonic() - began < 30

    def gone(pid: int) -> bool:
        for _ in range(50):  # reaped by init once killed
            if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
                return True
            time.sleep(0.1)
        os.kill(pid, 9)
        return False

    assert gone(int(pidfile.read_text(encoding="utf-8"))), "git's child was left running"
    # Ctrl-C while git runs: in a session of its own it does not hear the terminal, so it is stopped too
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    pidfile.unlink()
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.alarm(1)
        with pytest.raises(KeyboardInterrupt):
            _git(tmp_path, "status", timeout=20)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert gone(int(pidfile.read_text(encoding="utf-8"))), "git's child was left running after Ctrl-C"


def test_every_tracker_is_closed_when_one_fails_to(tmp_path):
    """An experiment tracker failing to close (a dead network at W&B's finish) left the trackers after
    it open and the first error lost; each is closed, then the first error is raised."""
    from biomask.training.metrics import MetricsLogger

    closed = []

    class Tracker:
        def __init__(self, name, fails):
            self.name, self.fails = name, fails

        def close(self):
            closed.append(self.name)
            if self.fails:
                raise ConnectionError(f"{self.name}: the server went away")

    logger = MetricsLogger(tmp_path, total_steps=10, start_step=0, enabled=True, progress=False, report_to=())
    logger.trackers = [Tracker("first", True), Tracker("second", False)]
    with pytest.raises(ConnectionError, match="first"):
        logger.close()
    assert closed == ["first", "second"] and logger.file.closed
