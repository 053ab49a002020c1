"""Pipeline files: validation before anything runs, task expansion, references, rendered sbatch scripts,
and the templates in pipelines/slurm/ staying in sync with what `submit` renders."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from biomask.config import apply_overrides
from biomask.errors import ConfigError
from biomask.pipelines.plan import build_plan, command_line_value, load_plan
from biomask.pipelines.runs import write_resolved
from biomask.pipelines.sbatch import JobScript, render
from biomask.pipelines.schema import SlurmSpec
from biomask.pipelines.slurm import job_script
from biomask.pipelines.templates import render_templates
from tests.conftest import REPO

GENOME = f"{REPO}/configs/dna/ce2-chrX.yaml"
SPLICE = f"{REPO}/configs/dna/splice.yaml"


def pipeline(tmp_path: Path, stages: dict, **top) -> Path:
    path = tmp_path / "p.yaml"
    data = {"name": "t", "run_dir": str(tmp_path / "run"), **top, "stages": stages}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_plan(path, overrides)
    return str(err.value)


def test_plan_orders_stages_and_places_outputs(dna_pipeline, tmp_path):
    plan = load_plan(dna_pipeline)
    assert list(plan.stages) == ["prep_genome", "prep_splice"]
    genome, splice = plan.stages.values()
    assert splice.needs == ["prep_genome"]  # implied by the reference
    assert genome.tasks[0].output == tmp_path / "run" / "prep_genome"
    assert [t.output.name for t in splice.tasks] == ["split.seed=0", "split.seed=1"]
    first = splice.tasks[0].overrides
    assert f"tokenizer.path={tmp_path / 'run' / 'prep_genome'}" in first
    assert first[-2:] == ["split.seed=0", f"output={tmp_path / 'run' / 'prep_splice' / 'split.seed=0'}"]
    # nested override mappings become dotted keys
    assert "windows.max_bases=200000" in genome.tasks[0].overrides


def test_sweeps_expand_to_every_combination(tmp_path):
    stages = {
        "prep": {
            "command": "prep dna",
            "config": SPLICE,
            "sweep": {"tokenizer.kind": ["char", "kmer"], "split.seed": [0, 1, 2]},
        }
    }
    plan = load_plan(pipeline(tmp_path, stages))
    tasks = plan.stages["prep"].tasks
    assert [t.index for t in tasks] == list(range(6))
    assert tasks[4].point == {"tokenizer.kind": "kmer", "split.seed": 1}
    assert tasks[4].output.name == "tokenizer.kind=kmer,split.seed=1"
    # one sweep key from the command line: `train.seed` is the key, not a section `train`
    plan = load_plan(pipeline(tmp_path, stages), ["stages.prep.sweep.split.seed=[5]"])
    assert [t.point for t in plan.stages["prep"].tasks] == [
        {"tokenizer.kind": "char", "split.seed": 5},
        {"tokenizer.kind": "kmer", "split.seed": 5},
    ]


def test_swept_stages_read_their_counterpart(tmp_path):
    stages = {
        "a": {"command": "prep dna", "config": GENOME, "sweep": {"split.seed": [0, 1]}},
        "b": {
            "command": "prep dna",
            "config": SPLICE,
            "overrides": {"tokenizer.path": "${stages.a.output}"},
            "sweep": {"split.seed": [0, 1], "tokenizer.k": [3, 4]},
        },
        "c": {
            "command": "prep dna",
            "config": SPLICE,
            "overrides": {"tokenizer.path": "${stages.a.dir}/split.seed=1"},
        },
    }
    plan = load_plan(pipeline(tmp_path, stages))
    b = plan.stages["b"].tasks[3]  # split.seed=1, tokenizer.k=4
    assert f"tokenizer.path={plan.run_dir / 'a' / 'split.seed=1'}" in b.overrides
    assert f"tokenizer.path={plan.run_dir / 'a' / 'split.seed=1'}" in plan.stages["c"].tasks[0].overrides
    # an unswept stage cannot pick one task of a sweep
    stages["c"]["overrides"] = {"tokenizer.path": "${stages.a.output}"}
    message = error_of(pipeline(tmp_path, stages))
    assert "stage c" in message and "ambiguous" in message and "${stages.a.dir}" in message
    # it names the tasks there are, as the way out that always works (an evaluate has no split.seed key)
    assert "${stages.a.dir}/split.seed=0/... (its tasks: split.seed=0, split.seed=1" in message


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        (
            {
                "a": {"command": "prep dna", "config": GENOME, "needs": ["c"]},
                "b": {"command": "prep dna", "config": GENOME, "needs": ["a"]},
                "c": {"command": "prep dna", "config": GENOME, "needs": ["b"]},
            },
            "dependency cycle: a -> c -> b -> a",
        ),
        (
            {"a": {"command": "prep dna", "config": GENOME, "needs": ["prep"]}},
            "stage a needs 'prep', which is not a stage of this pipeline",
        ),
        (  # which key refers to the stage itself
            {
                "a": {
                    "command": "prep dna",
                    "config": SPLICE,
                    "overrides": {"tokenizer.path": "${stages.a.output}"},
                }
            },
            "stage a needs itself (overrides.tokenizer.path: ${stages.a.output})",
        ),
        (
            {"a": {"command": "prep dna", "config": SPLICE, "overrides": {"x": "${stages.nope.output}"}}},
            "stage a needs 'nope' (overrides.x: ${stages.nope.output}), which is not a stage",
        ),
        (
            {"a": {"command": "prep dna", "config": "configs/dna/missing.yaml"}},
            "stage a: config file configs/dna/missing.yaml does not exist",
        ),
        ({"a": {"command": "prep rna", "config": GENOME}}, "stage a: unknown command 'prep rna'"),
        (
            {"a": {"command": "prep dna", "config": GENOME, "overrides": {"tokenizer.kind": "bytes"}}},
            "tokenizer.kind",
        ),
        (
            {"a": {"command": "prep dna", "config": GENOME, "overrides": {"output": "/x"}}},
            "`output` is set by the pipeline",
        ),
        (  # a typo in the pipeline file is the pipeline's, not the command line's
            {"a": {"command": "prep dna", "config": GENOME, "overrides": {"windows.lenght": 5}}},
            "(value set by the pipeline (stage a's overrides, sweep or output)): unknown key 'windows.lenght'",
        ),
        (
            {"a": {"command": "prep dna", "config": GENOME, "slurm": {"tasks_per_node": 2}}},
            "only training stages run as several tasks",
        ),
        (
            {"a": {"command": "prep dna", "config": GENOME, "slurm": {"time": 3600}}},
            "put the time limit in quotes",
        ),
        (
            {"a": {"command": "prep dna", "config": SPLICE, "overrides": {"x": "${stage.a.output}"}}},
            "unknown reference ${stage.a.output}",
        ),
        (  # without braces the text went to the stage as a path, which failed only once it ran
            {
                "a": {"command": "prep dna", "config": GENOME},
                "b": {
                    "command": "prep dna",
                    "config": SPLICE,
                    "overrides": {"tokenizer.path": "$stages.a.output"},
                },
            },
            "overrides.tokenizer.path: $stages.a.output is no reference (the braces are missing); "
            "write ${stages.a.output}",
        ),
        (  # a path under a swept stage that none of its tasks writes: refused before the sweep runs
            {
                "a": {"command": "prep dna", "config": GENOME, "sweep": {"split.seed": [0, 1]}},
                "b": {
                    "command": "prep dna",
                    "config": SPLICE,
                    "overrides": {"tokenizer.path": "${stages.a.dir}/split.seed=3"},
                },
            },
            "${stages.a.dir}/split.seed=3 is not a task of a; its tasks: split.seed=0, split.seed=1",
        ),
        (  # a typo in a swept stage is reported once, and not also as its dependents naming no task
            {
                "a": {
                    "command": "prep dna",
                    "config": GENOME,
                    "overrides": {"windows.lenght": 5},
                    "sweep": {"split.seed": [0, 1]},
                },
                "b": {
                    "command": "prep dna",
                    "config": SPLICE,
                    "overrides": {"tokenizer.path": "${stages.a.dir}/split.seed=1"},
                },
            },
            "is not valid:\n  - stage a (sweep point {'split.seed': 0}): ",
        ),
    ],
    ids=[
        "cycle",
        "unknown-need",
        "needs-itself",
        "unknown-reference-stage",
        "missing-config",
        "unknown-command",
        "bad-stage-config",
        "output-override",
        "typo-in-overrides",
        "tasks-outside-training",
        "unquoted-time",
        "bad-reference",
        "reference-without-braces",
        "no-such-task",
        "typo-in-a-sweep",
    ],
)
def test_bad_pipelines_are_reported_before_anything_runs(tmp_path, cli, stages, expected):
    path = pipeline(tmp_path, stages)
    message = error_of(path)
    assert expected in message
    assert message.count("\n  - ") == 1, message  # one mistake, one message
    for action in ("run", "submit"):
        code, _, err = cli("pipeline", action, path)
        assert code == 2, err
        assert expected in err and str(path) in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_command_biomask_does_not_have_yet_is_reported(tmp_path, cli, monkeypatch):
    """A pipeline written for a newer biomask names a stage command this CLI lacks."""
    from biomask.pipelines import commands

    monkeypatch.setitem(commands.COMMANDS, "align", commands.StageCommand("align"))
    path = pipeline(tmp_path, {"e": {"command": "align", "config": GENOME}})
    code, _, err = cli("pipeline", "run", path)
    assert code == 2 and "'align' is not available in this version of biomask" in err


def test_unknown_pipeline_keys_name_the_file(tmp_path, cli):
    path = pipeline(tmp_path, {"a": {"command": "prep dna", "config": GENOME, "after": ["b"]}})
    code, _, err = cli("pipeline", "run", path)
    assert code == 2 and str(path) in err and "stages.a.after" in err


@pytest.mark.parametrize("name", ["logs", "slurm"])
def test_a_stage_named_as_a_folder_of_the_runner_is_refused_before_running(tmp_path, cli, name):
    # its output, run_dir/<stage>, would be the runner's logs/ (or slurm/) folder
    path = pipeline(tmp_path, {name: {"command": "prep dna", "config": GENOME}})
    code, _, err = cli("pipeline", "run", path)
    assert code == 2 and str(path) in err and f"stage names ['{name}']" in err and "rename the stage" in err
    assert not (tmp_path / "run").exists()


def test_an_override_into_a_stage_the_file_lacks_names_the_stages(tmp_path):
    # a misspelt stage name used to add a stage, reported as missing its command and config
    path = pipeline(tmp_path, {"prep_genome": {"command": "prep dna", "config": GENOME}})
    message = error_of(path, "stages.prep_gnome.overrides.windows.length=500")
    assert "has no stage 'prep_gnome' (stages: prep_genome)" in message and str(path) in message
    assert "missing required key" not in message
    # a whole new stage is still an override
    extra = "stages.more={command: prep dna, config: " + GENOME + "}"
    assert list(load_plan(path, [extra]).stages) == ["prep_genome", "more"]


def test_submit_without_sbatch_fails_before_writing(dna_pipeline, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no SLURM client anywhere on PATH
    code, _, err = cli("pipeline", "submit", dna_pipeline)
    assert code == 2 and "`sbatch` is not on PATH" in err
    assert not (tmp_path / "run").exists()


def test_a_second_submit_while_the_first_jobs_may_still_run_is_refused(
    dna_pipeline, tmp_path, cli, monkeypatch
):
    """Both submissions would train into the same outputs, and the second jobs.json would hide the
    first jobs from `pipeline status`. Stand-in SLURM clients: sbatch hands out job ids 41, 42, ...;
    scontrol shows every job in the state the test sets."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f"#!/bin/bash\nenv > {tmp_path}/sbatch-env\n"
        f"n=$(cat {tmp_path}/last 2>/dev/null || echo 40); echo $((n + 1)) | tee {tmp_path}/last\n"
    )
    # a numba folder biomask chose for this (login) node is not passed on to the jobs
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/tmp/biomask-numba-0")
    monkeypatch.setenv("BIOMASK_SET_NUMBA_CACHE_DIR", "/tmp/biomask-numba-0")
    state = tmp_path / "state"
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "JobId=$4 JobState=$(cat {state}) Reason=None"\n')
    for tool in ("sbatch", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    jobs = tmp_path / "run" / "jobs.json"
    assert cli("-q", "pipeline", "submit", dna_pipeline)[0] == 0
    first = jobs.read_text()
    assert json.loads(first)["stages"]["prep_genome"]["job_id"] == "41"
    passed = (tmp_path / "sbatch-env").read_text()
    assert "NUMBA_CACHE_DIR" not in passed and f"PATH={bin_dir}" in passed
    for current in ("PENDING", "RUNNING", "REQUEUED"):
        state.write_text(current)
        code, _, err = cli("-q", "pipeline", "submit", dna_pipeline)
        assert code == 2 and f"prep_genome 41 {current}" in err and "scancel 41 42" in err
        assert jobs.read_text() == first and (tmp_path / "last").read_text() == "42\n"  # nothing submitted
        # a local run, and the dry run, refuse the same (a pending job holds no output lock)
        for args in (["run"], ["submit", "--dry-run"]):
            code, _, err = cli("-q", "pipeline", *args, dna_pipeline)
            assert code == 2 and f"prep_genome 41 {current}" in err, (args, err)
        assert not (tmp_path / "run" / "prep_genome").exists()
    state.write_text("COMPLETED")
    assert cli("-q", "pipeline", "submit", dna_pipeline)[0] == 0
    assert json.loads(jobs.read_text())["stages"]["prep_genome"]["job_id"] == "43"
    # --only: the stages left out keep their jobs in the record, so status still shows them
    (tmp_path / "run" / "prep_genome").mkdir()
    (tmp_path / "run" / "prep_genome" / "run.json").write_text('{"stage": "prep-dna", "fingerprint": "f"}')
    assert cli("-q", "pipeline", "submit", dna_pipeline, "--only", "prep_splice")[0] == 0
    stages = json.loads(jobs.read_text())["stages"]
    assert list(stages) == ["prep_genome", "prep_splice"]
    assert (stages["prep_genome"]["job_id"], stages["prep_splice"]["job_id"]) == ("43", "45")


def test_a_submit_waits_only_for_the_earlier_jobs_of_the_stages_it_touches(tmp_path):
    """`submit --only c` while an unrelated stage's job still runs is fine; its own, the stages it
    reads and those reading it are what a second submission would collide with."""
    from biomask.pipelines.slurm import related_stages

    stages = {
        "a": {"command": "prep dna", "config": GENOME},
        "b": {"command": "prep dna", "config": SPLICE, "overrides": {"tokenizer.path": "${stages.a.output}"}},
        "c": {"command": "prep dna", "config": GENOME},
    }
    plan = load_plan(pipeline(tmp_path, stages))
    assert related_stages(plan, ["b"]) == {"a", "b"} and related_stages(plan, ["a"]) == {"a", "b"}
    assert related_stages(plan, ["c"]) == {"c"} and related_stages(plan, ["a", "c"]) == {"a", "b", "c"}


def test_only_and_from_name_existing_stages(dna_pipeline, cli):
    code, _, err = cli("pipeline", "run", dna_pipeline, "--only", "prep_gnome")
    assert code == 2 and "no stage named 'prep_gnome'" in err


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "0.1",
        "true",
        "a: b",
        "with space",
        "[draft] R2",
        "*bold*",
        "@home",
        "%done",
        "| x",
        3,
        0.5,
        None,
        [1, "x"],
        {"k": 1},
    ],
)
def test_override_values_survive_the_command_line(value):
    data: dict = {}
    apply_overrides(data, [f"key={command_line_value(value)}"])
    assert data["key"] == value


def test_rendered_scripts_are_readable_and_valid_bash(dna_pipeline, tmp_path):
    plan = load_plan(dna_pipeline)
    splice = render(job_script(plan, plan.stages["prep_splice"]))
    assert "#SBATCH --array=0-1\n" in splice
    assert "#SBATCH --kill-on-invalid-dep=yes\n" in splice
    assert "#SBATCH --time=00:05:00\n" in splice
    assert "#SBATCH --mem=1G\n" in splice
    assert (
        f"  1) ARGS+=(split.seed=1 output={tmp_path / 'run' / 'prep_splice' / 'split.seed=1'}) ;;" in splice
    )
    assert "--signal" not in splice and "srun" not in splice  # not a training stage
    # threads follow the allocation, not the submitting shell's OMP_NUM_THREADS (sbatch passes it on)
    assert 'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"\n' in splice
    for name, stage in plan.stages.items():
        script = tmp_path / f"{name}.sbatch"
        script.write_text(render(job_script(plan, stage)))
        subprocess.run(["bash", "-n", str(script)], check=True)  # parses


def test_training_scripts_checkpoint_and_requeue():
    text = render_templates()["pretrain.sbatch"]
    assert "#SBATCH --signal=B:USR1@600\n#SBATCH --requeue\n" in text
    assert "#SBATCH --gpus-per-node=4\n" in text and "#SBATCH --ntasks-per-node=4\n" in text
    # the step's shape comes from the #SBATCH lines, so editing them (as the README says) is enough
    assert 'STEP=(srun --nodes="$SLURM_JOB_NUM_NODES" --kill-on-bad-exit=1)' in text
    assert 'STEP+=(--ntasks-per-node="$SLURM_NTASKS_PER_NODE")' in text
    assert 'STEP+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")' in text
    assert "trap on_usr1 USR1" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text


# A stand-in for a stage: it logs its arguments, and acts on files in its folder as biomask would —
# `stale`: refuses (StaleOutputError, through BIOMASK_ERROR_FILE) unless given --overwrite; `bad`:
# refuses as bad input; `train`: exits 75 (checkpointed) the first time, then resumes.
STAND_IN_STAGE = """\
here=$(dirname "$0")
echo "$*" >> "$here/calls"
refuse() { printf '{"error": "%s", "exit_code": 2, "message": "m"}' "$1" > "$BIOMASK_ERROR_FILE"; exit 2; }
case " $* " in *" --overwrite "*) rm -f "$here/stale" "$here/checkpoint" ;; esac
if [ -f "$here/stale" ]; then refuse StaleOutputError; fi
if [ -f "$here/bad" ]; then refuse InputError; fi
if [ -f "$here/train" ] && [ ! -f "$here/checkpoint" ]; then touch "$here/checkpoint"; exit 75; fi
exit 0
"""


@pytest.mark.parametrize("training", [False, True])
def test_submitted_with_overwrite_a_job_replaces_only_an_output_of_other_settings(tmp_path, training):
    """`pipeline submit --overwrite` must not hand the stage --overwrite outright: a requeued training
    job would discard its own checkpoints and start again at every requeue, never finishing. The job
    runs the stage as usual and reruns it with --overwrite only when it refuses a stale output."""
    (tmp_path / "stage.sh").write_text(STAND_IN_STAGE)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$*" >> {tmp_path}/scontrol\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    job = JobScript(
        pipeline="p",
        stage="train" if training else "prep",
        summary="stand-in",
        workdir=str(tmp_path),
        python="bash",
        program=f'"$PYTHON" {tmp_path / "stage.sh"}',
        log_dir=str(tmp_path),
        slurm=SlurmSpec(),
        training=training,
        tasks=[["output=x"]],
        replace_stale=True,
    )
    script = tmp_path / "job.sbatch"
    script.write_text(render(job))
    # an allocation made with --ntasks and no --cpus-per-task (#SBATCH lines edited): SLURM sets
    # neither SLURM_NTASKS_PER_NODE nor SLURM_CPUS_PER_TASK, and `set -u` must not trip on them
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1"}

    def run(*marks: str, resume: bool = False) -> tuple[int, list[str]]:
        """Run the job script once with these marks; `resume`: as a requeued run, checkpoint kept."""
        for name in ("calls", "stale", "bad", "train", "scontrol", *(() if resume else ("checkpoint",))):
            (tmp_path / name).unlink(missing_ok=True)
        for mark in marks:
            (tmp_path / mark).touch()
        code = subprocess.run(["bash", str(script)], env=env, capture_output=True).returncode
        return code, (tmp_path / "calls").read_text().splitlines()

    assert run() == (0, ["output=x"])  # current or new: run once, as submitted
    assert run("stale") == (0, ["output=x", "--overwrite output=x"])  # other settings: replaced
    assert run("bad") == (2, ["output=x"])  # any other refusal stays a failure
    assert not list(tmp_path.glob(".*.error.json"))
    if training:  # checkpointed (75) -> requeued -> the rerun resumes, not given --overwrite
        assert run("train") == (0, ["output=x"])
        assert (tmp_path / "scontrol").read_text() == "requeue 7\n" and (tmp_path / "checkpoint").exists()
        assert run("train", resume=True) == (0, ["output=x"])
        assert (tmp_path / "checkpoint").exists()


@pytest.mark.parametrize(
    ("limit", "seconds"),
    [
        ("30", 1800),
        ("1:30", 90),
        ("01:00:00", 3600),
        ("2-0", 172800),
        ("1-02:03", 93780),
        ("1-00:00:01", 86401),
    ],
)
def test_slurm_time_limits_in_seconds(limit, seconds):
    assert SlurmSpec(time=limit).time_seconds == seconds


def test_training_signal_must_come_before_the_time_limit(tmp_path):
    stage = {"command": "pretrain", "config": "configs/pretrain/dna.yaml", "slurm": {"time": "00:05:00"}}
    with pytest.raises(
        ConfigError, match=r"signal_margin \(300 s, the default\) must be shorter than the time"
    ):
        build_plan({"name": "t", "stages": {"train": stage}}, "p.yaml", tmp_path / "p.yaml", False, tmp_path)
    stage["slurm"]["signal_margin"] = 400
    with pytest.raises(ConfigError, match=r"signal_margin \(400 s\) must be shorter"):
        build_plan({"name": "t", "stages": {"train": stage}}, "p.yaml", tmp_path / "p.yaml", False, tmp_path)
    stage["slurm"]["signal_margin"] = 120
    plan = build_plan(
        {"name": "t", "stages": {"train": stage}}, "p.yaml", tmp_path / "p.yaml", False, tmp_path
    )
    assert "#SBATCH --signal=B:USR1@120\n" in render(job_script(plan, plan.stages["train"]))


def test_templates_match_what_submit_renders():
    """pipelines/slurm/*.sbatch are what `biomask pipeline submit` renders (paths relative to the repo)."""
    rendered = render_templates()
    on_disk = {p.name: p.read_text() for p in (REPO / "pipelines" / "slurm").glob("*.sbatch")}
    assert set(on_disk) == set(rendered)
    for name, text in rendered.items():
        assert on_disk[name] == text, (
            f"pipelines/slurm/{name} is out of date: biomask pipeline templates --out pipelines/slurm"
        )


def test_templates_never_replace_an_edited_copy_unless_asked(tmp_path, cli):
    """The README says to edit the templates in place: rerunning the command keeps the edits."""
    assert cli("pipeline", "templates", "--out", tmp_path)[0] == 0
    edited = tmp_path / "pretrain.sbatch"
    edited.write_text(edited.read_text().replace("#SBATCH", "#SBATCH --account=mylab\n#SBATCH", 1))
    mine = edited.read_text()
    code, _, err = cli("pipeline", "templates", "--out", tmp_path)
    assert code == 2 and "pretrain.sbatch" in err and "--overwrite" in err and edited.read_text() == mine
    assert cli("pipeline", "templates", "--out", tmp_path, "--overwrite")[0] == 0
    assert edited.read_text() == render_templates()["pretrain.sbatch"]


def test_a_run_dir_holding_files_biomask_did_not_write_is_refused(tmp_path, cli):
    """run_dir may be a folder of the user's: a run never replaces their pipeline.yaml, records or logs."""
    mine = tmp_path / "project"
    mine.mkdir()
    path = mine / "pipeline.yaml"  # the user's own pipeline file, in the folder they make run_dir
    path.write_text(
        yaml.safe_dump(
            {"name": "t", "run_dir": str(mine), "stages": {"g": {"command": "prep dna", "config": GENOME}}}
        )
    )
    before = path.read_text()
    for action in (["run"], ["run", "--dry-run"], ["submit", "--dry-run"]):
        code, _, err = cli("pipeline", *action, path)
        assert code == 2, err
        assert f"run_dir {mine} holds pipeline.yaml" in err and "set run_dir to another folder" in err
    assert path.read_text() == before
    assert sorted(p.name for p in mine.iterdir()) == ["pipeline.yaml"]

    elsewhere = pipeline(
        tmp_path, {"g": {"command": "prep dna", "config": GENOME}}, run_dir=str(mine / "run")
    )
    (mine / "run" / "logs").mkdir(parents=True)
    (mine / "run" / "logs" / "g.log").write_text("my notes\n")
    (mine / "run" / "local-run.json").write_text("[1, 2]\n")
    code, _, err = cli("pipeline", "run", elsewhere)
    assert code == 2 and "holds local-run.json, logs/" in err
    assert (mine / "run" / "logs" / "g.log").read_text() == "my notes\n"
    assert not (mine / "run" / "pipeline.yaml").exists()


def test_a_run_dir_of_another_pipeline_is_refused(tmp_path, cli):
    """Two pipeline files pointing at one run_dir: the second's stages of the same names used to
    count as changed and replace the first's outputs (and its records) without a word."""
    stages = {"g": {"command": "prep dna", "config": GENOME}}
    run = tmp_path / "run"
    first = pipeline(tmp_path, stages)
    write_resolved(load_plan(first))
    second = tmp_path / "other.yaml"
    second.write_text(yaml.safe_dump({"name": "other", "run_dir": str(run), "stages": stages}))
    before = (run / "pipeline.yaml").read_text()
    for action in (["run"], ["run", "--dry-run"], ["submit", "--dry-run"]):
        code, _, err = cli("pipeline", *action, second)
        assert code == 2, err
        assert f"run_dir {run} holds the run of pipeline 't' ({first})" in err and "another folder" in err
    assert (run / "pipeline.yaml").read_text() == before and not (run / "logs").exists()
    # the same file with its pipeline renamed is still the same pipeline
    first.write_text(first.read_text().replace("name: t", "name: renamed"))
    code, _, err = cli("pipeline", "submit", "--dry-run", first)
    assert code == 0, err


def test_a_missing_input_file_is_refused_before_anything_runs(tmp_path, cli, monkeypatch):
    """A misspelt input path of a later stage used to be found only after the stages before it ran.
    A pattern (`*.fa`) that matches a file is no missing input."""
    fasta = tmp_path / "mine.fa"
    fasta.write_text(">r\n" + "ACGT" * 500 + "\n")
    small = {"windows.length": 100, "split.block_size": 200}
    pattern = str(tmp_path / "mi*.fa")
    stages = {
        "genome": {"command": "prep dna", "config": GENOME, "overrides": {"inputs": [{"path": pattern}], **small}},
        "cells": {"command": "prep cells", "config": f"{REPO}/configs/cells/pbmc3k.yaml",
                  "overrides": {"inputs": [{"path": "data/mycels.h5ad"}]}},
    }  # fmt: skip
    path = pipeline(tmp_path, stages)
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("pipeline", "run", path)
    assert code == 2 and str(path) in err and "nothing has run" in err
    assert "stage cells: inputs[0].path: data/mycels.h5ad does not exist" in err and "mi*.fa" not in err
    assert f"relative paths are read from the working directory, {tmp_path}" in err
    assert not (tmp_path / "run" / "genome").exists()
    # --only a stage whose inputs are there runs it
    code, _, err = cli("-q", "pipeline", "run", path, "--only", "genome")
    assert code == 0, err


def test_a_stage_config_beside_the_pipeline_file_is_pointed_to(tmp_path, monkeypatch):
    """Relative paths are read from the working directory; a config given relative to the pipeline
    file's folder used to be reported only as missing from the working directory."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "my-genome.yaml").write_text(Path(GENOME).read_text())
    path = pipeline(folder, {"a": {"command": "prep dna", "config": "my-genome.yaml"}})
    monkeypatch.chdir(tmp_path)
    message = error_of(path)
    assert f"config file my-genome.yaml does not exist (looked for {tmp_path / 'my-genome.yaml'})" in message
    assert f"not from the pipeline file's folder, where it is: config: {folder / 'my-genome.yaml'}" in message
    monkeypatch.chdir(folder)  # from the pipeline file's folder it is found
    assert load_plan(path).stages["a"].config == folder / "my-genome.yaml"


def test_templates_out_naming_a_file_is_a_clear_error(tmp_path, cli):
    target = tmp_path / "notes.txt"  # it used to end in a FileExistsError traceback, exit 1
    target.write_text("mine")
    code, _, err = cli("pipeline", "templates", "--out", target)
    assert code == 2 and f"--out {target} is a file; name a folder" in err and "Traceback" not in err
    assert target.read_text() == "mine"


def test_status_without_a_run_dir_finds_the_latest_run_under_runs(tmp_path, cli, monkeypatch):
    """The shipped pipelines' run_dirs are runs/<name> (runs/main for the main job): `pipeline status`
    alone used to look only under runs/pipelines and find none of them."""
    record = {"pipeline": "study-quick", "finished": "2026-12-05T20:00:00+0000", "results": []}
    (tmp_path / "runs" / "main").mkdir(parents=True)
    (tmp_path / "runs" / "main" / "local-run.json").write_text(json.dumps(record))
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("pipeline", "status")
    assert code == 0, err
    assert "last local run of" in out and "main" in out


def test_a_number_in_env_is_its_text(tmp_path):
    # `OMP_NUM_THREADS: 4` in YAML is a number: it used to be refused as "key 'env': not a valid string"
    path = pipeline(tmp_path, {"a": {"command": "prep dna", "config": GENOME}}, env={"OMP_NUM_THREADS": 4})
    assert load_plan(path).pipeline.env == {"OMP_NUM_THREADS": "4"}


def test_dry_run_resumes_an_interrupted_training_run_of_the_same_config(tmp_path, repo):
    """What an interrupted pretrain leaves (its resolved config and in_progress.json, as the trainer
    writes them at start): the same settings resume it, other settings start over."""
    from biomask.config import dump_config, load_config
    from biomask.pipelines.preview import preview
    from biomask.training import rundir
    from biomask.training.config import PretrainConfig

    def planned(steps: int):
        data = {
            "name": "t",
            "run_dir": str(tmp_path / "run"),
            "stages": {
                "train": {
                    "command": "pretrain",
                    "config": str(repo / "configs/pretrain/dna-tiny.yaml"),
                    "overrides": {"data": {"store": str(tmp_path / "store")}, "train": {"steps": steps}},
                }
            },
        }
        return build_plan(data, "t.yaml", tmp_path / "t.yaml", workdir=tmp_path)

    plan = planned(50)
    task = plan.stages["train"].tasks[0]
    assert [(p.action, p.why) for p in preview(plan, ["train"])] == [("run", "no output yet")]
    cfg = load_config(PretrainConfig, plan.stages["train"].config, task.overrides)
    rundir.start_fresh(task.output, "fingerprint-of-the-run", 1, dump_config(cfg))
    assert [p.action for p in preview(plan, ["train"])] == ["resume"]
    again = preview(planned(80), ["train"])[0]
    assert again.action == "run again" and "train.steps: 50 -> 80" in again.why and "discarded" in again.why


def test_stage_names_differing_only_in_case_are_refused_before_running(tmp_path, cli):
    # on macOS and Windows run_dir/Genome is run_dir/genome: the second stage reused or replaced the first
    stages = {n: {"command": "prep dna", "config": GENOME} for n in ("genome", "Genome")}
    code, _, err = cli("pipeline", "run", pipeline(tmp_path, stages))
    assert code == 2 and "genome and Genome differ only in case" in err and "rename one" in err
    assert not (tmp_path / "run").exists()


def test_a_stage_named_as_a_runner_folder_in_other_case_is_refused(tmp_path):
    message = error_of(pipeline(tmp_path, {"Logs": {"command": "prep dna", "config": GENOME}}))
    assert "stage names ['Logs']" in message and "rename the stage" in message


def test_a_stage_name_too_long_for_its_files_is_refused_before_running(tmp_path, cli):
    # its job script's temporary (`.NAME.sbatch.tmp-XXXXXXXX`) passed a file name's 255 bytes: the
    # run failed only at that stage
    long = "s" * 101
    code, _, err = cli(
        "pipeline", "run", pipeline(tmp_path, {long: {"command": "prep dna", "config": GENOME}})
    )
    assert code == 2 and "at most 100 characters" in err and not (tmp_path / "run").exists()
    load_plan(pipeline(tmp_path, {"s" * 100: {"command": "prep dna", "config": GENOME}}))


def test_sweep_values_differing_only_in_case_are_refused(tmp_path):
    stage = {"command": "prep dna", "config": SPLICE, "sweep": {"tokenizer.kind": ["kmer", "KMER"]}}
    message = error_of(pipeline(tmp_path, {"prep": stage}))
    assert "clashing directory names" in message and "case is ignored" in message


def test_a_misspelt_sweep_key_is_reported_once_not_as_every_reader_being_ambiguous(tmp_path):
    # prep's typo made other's reference "ambiguous" (swept over split.sed, other over split.seed),
    # with advice about naming tasks that had nothing to do with the mistake
    stages = {
        "prep": {"command": "prep dna", "config": SPLICE, "sweep": {"split.sed": [0, 1]}},
        "other": {
            "command": "prep dna",
            "config": SPLICE,
            "overrides": {"tokenizer.path": "${stages.prep.output}"},
            "sweep": {"split.seed": [0, 1]},
        },
    }
    message = error_of(pipeline(tmp_path, stages))
    assert "unknown key 'split.sed'" in message
    assert "ambiguous" not in message and message.count("\n  - ") == 1, message


def test_a_left_out_sweep_is_named_once_per_stage_not_per_task(tmp_path, cli):
    # --only the report of a study listed every missing task output, one line each (50 lines)
    stages = {
        "a": {"command": "prep dna", "config": GENOME, "sweep": {"split.seed": [0, 1, 2, 3]}},
        "b": {
            "command": "prep dna",
            "config": SPLICE,
            "overrides": {"tokenizer.path": "${stages.a.dir}/split.seed=0"},
        },
    }
    code, _, err = cli("pipeline", "run", pipeline(tmp_path, stages), "--only", "b", "--dry-run")
    assert code == 2 and err.count("\n  - ") == 1, err
    assert (
        f"b needs a, whose outputs of 4 of its 4 tasks do not exist ({tmp_path / 'run' / 'a'}/: "
        "split.seed=0, split.seed=1, split.seed=2, ...)" in err
    )


@pytest.mark.parametrize(
    ("option", "key"),
    [("--time=00:01:00", "slurm.time"), ("--array=0-9", "sweep"), ("--output=/tmp/x.out", "run_dir/logs")],
)
def test_extra_cannot_override_what_the_scripts_write_from_their_keys(tmp_path, option, key):
    """`extra: ["--time=00:01:00"]` came after the script's own --time (a later #SBATCH line wins) and
    bypassed the check that signal_margin fits the limit: the training job checkpointed and requeued
    at every start, 22 times in 11 minutes."""
    stages = {"a": {"command": "prep dna", "config": GENOME, "slurm": {"extra": [option]}}}
    with pytest.raises(ConfigError, match=re.escape(option) + r".*" + re.escape(key)):
        load_plan(pipeline(tmp_path, stages))
    stages["a"]["slurm"]["extra"] = ["--constraint=a100"]  # anything else is passed on
    plan = load_plan(pipeline(tmp_path, stages))
    assert "#SBATCH --constraint=a100\n" in render(job_script(plan, plan.stages["a"]))


def test_a_submit_dry_run_writes_nothing_into_the_run_folder(tmp_path, cli):
    """The dry run rendered into run_dir: a fresh folder became this pipeline's (another pipeline
    was then refused there, and status spoke of a run that stopped), and a live submission's
    scripts were rewritten under its running jobs. It renders elsewhere and says where."""
    stages = {"g": {"command": "prep dna", "config": GENOME}}
    path = pipeline(tmp_path, stages, run_dir=str(tmp_path / "fresh"))
    code, out, err = cli("pipeline", "submit", "--dry-run", path)
    assert code == 0, err
    assert not (tmp_path / "fresh").exists() and "nothing was written to" in out
    script = Path(next(line for line in out.splitlines() if line.endswith("g.sbatch")))
    assert script.is_file() and "#SBATCH --job-name=" in script.read_text()


@pytest.mark.network
def test_a_submit_names_the_datasets_its_jobs_would_fetch(tmp_path, cli, monkeypatch):
    """Compute nodes often have no network: a job fetching a dataset failed after queueing, and every
    stage after it was cancelled. The submission (and its dry run) names what is not in the cache."""
    stages = {"g": {"command": "prep dna", "config": GENOME}}
    path = pipeline(tmp_path, stages, run_dir=str(tmp_path / "fresh"))
    monkeypatch.setenv("BIOMASK_DATA_DIR", str(tmp_path / "empty-cache"))
    code, out, err = cli("pipeline", "submit", "--dry-run", path)
    dataset = yaml.safe_load(Path(GENOME).read_text())["inputs"][0]["dataset"]
    assert code == 0, err
    assert f"not in the dataset cache the jobs read ({tmp_path / 'empty-cache'}): {dataset}" in out
    assert f"biomask datasets fetch {dataset} --data-dir {tmp_path / 'empty-cache'}" in out
    monkeypatch.delenv("BIOMASK_DATA_DIR")  # the shared cache holds it (fetched by the fixtures)
    from biomask import datasets

    datasets.fetch(dataset)
    code, out, err = cli("pipeline", "submit", "--dry-run", path)
    assert code == 0 and "not in the dataset cache" not in out, err
    # the cache the jobs read is the pipeline's env, where it sets one; embed's input by name counts
    stages["e"] = {"command": "embed", "config": f"{REPO}/configs/embed/pbmc68k_reduced.yaml",
                   "overrides": {"checkpoint": str(tmp_path / "some-checkpoint")}}  # fmt: skip
    path = pipeline(
        tmp_path,
        stages,
        run_dir=str(tmp_path / "fresh"),
        env={"BIOMASK_DATA_DIR": str(tmp_path / "job-cache")},
    )
    code, out, err = cli("pipeline", "submit", "--dry-run", path)
    assert code == 0, err
    assert (
        f"not in the dataset cache the jobs read ({tmp_path / 'job-cache'}): {dataset}, pbmc68k_reduced"
        in out
    )


def test_status_rows_of_an_array_slurm_forgot_are_per_task_never_one_for_all(tmp_path):
    """The jobcomp file (`sacct -c`) keeps an array under one task's job id: that row used to stand
    for the whole array, so a failed task showed as COMPLETED. Each task is its own row: from sacct
    where it lists the task, else from its output (COMPLETED where written, UNKNOWN where not)."""
    from biomask.pipelines.slurm import JobState, _per_task

    done, failed = tmp_path / "t1", tmp_path / "t0"
    done.mkdir()
    (done / "run.json").write_text('{"stage": "pretrain", "fingerprint": "f"}')
    job = {
        "job_id": "53",
        "array": True,
        "tasks": [{"index": 0, "output": str(failed)}, {"index": 1, "output": str(done)}],
    }
    whole = JobState("pretrain", "", "53", "COMPLETED", "", "0:0", 0, "", "", "sacct")
    rows = _per_task("pretrain", job, [whole])
    assert [(r.task, r.state, r.source) for r in rows] == [
        ("0", "UNKNOWN", "output"),
        ("1", "COMPLETED", "output"),
    ]
    listed = JobState("pretrain", "0", "53_0", "FAILED", "", "2:0", 0, "", "", "sacct")
    rows = _per_task("pretrain", job, [listed])
    assert [(r.task, r.state, r.source) for r in rows] == [
        ("0", "FAILED", "sacct"),
        ("1", "COMPLETED", "output"),
    ]


def test_what_yaml_would_drop_silently_is_refused_and_an_empty_section_is_passed_on(tmp_path):
    """A stage copied under the same name (YAML keeps the second), one key written both dotted and in
    its section (one was dropped), and `overrides: {key: {}}` (flattened to nothing, so the config's
    own entries stayed): each used to run something other than what the file says."""
    path = tmp_path / "p.yaml"
    stage = f"  prep:\n    command: prep dna\n    config: {GENOME}\n"
    path.write_text(f"name: t\nrun_dir: {tmp_path / 'run'}\nstages:\n{stage}{stage}")
    message = error_of(path)
    assert "key 'prep' appears twice in one mapping (lines 4 and 7)" in message and str(path) in message
    both = {
        "prep": {
            "command": "prep dna",
            "config": GENOME,
            "overrides": {"split.seed": 1, "split": {"seed": 2}},
        }
    }
    assert "split.seed is given twice" in error_of(pipeline(tmp_path, both))
    emptied = {"prep": {"command": "prep dna", "config": GENOME, "overrides": {"windows": {}}}}
    assert "windows={}" in load_plan(pipeline(tmp_path, emptied)).stages["prep"].tasks[0].overrides
    # a misspelt key inside a stage is shown with the stage's keys (the stages mapping is walked)
    message = error_of(pipeline(tmp_path, emptied), "stages.prep.overide.x=1")
    assert (
        "unknown key 'stages.prep.overide'; did you mean 'overrides'?; allowed keys here: command" in message
    )


def test_an_override_of_one_stage_leaves_the_stages_that_share_its_anchor(tmp_path):
    """YAML anchors give stages one shared mapping (study-full.yaml's `slurm: *gpu_training`): a
    command-line override of one stage's key changed every stage using the anchor."""
    path = tmp_path / "p.yaml"
    path.write_text(
        f"name: t\nrun_dir: {tmp_path / 'run'}\nstages:\n"
        f"  a: {{command: prep dna, config: {GENOME}, slurm: &s {{time: '00:10:00'}}, overrides: &o {{split.seed: 1}}}}\n"
        f"  b: {{command: prep dna, config: {GENOME}, slurm: *s, overrides: *o}}\n"
    )
    # a file's override written nested is replaced by the command line's, not kept beside it
    nested = tmp_path / "nested.yaml"
    nested.write_text(
        f"name: t\nrun_dir: {tmp_path / 'run'}\nstages:\n  a: {{command: prep dna, config: {GENOME}, overrides: {{split: {{seed: 1, val: 0.1}}}}}}\n"
    )
    task = load_plan(nested, ["stages.a.overrides.split.seed=2"]).stages["a"].tasks[0].overrides
    assert "split.seed=2" in task and "split.seed=1" not in task and "split.val=0.1" in task
    plan = load_plan(path, ["stages.a.slurm.time=00:20:00", "stages.a.overrides.split.seed=2"])
    assert plan.stages["a"].slurm.time == "00:20:00" and plan.stages["b"].slurm.time == "00:10:00"
    assert "split.seed=2" in plan.stages["a"].tasks[0].overrides
    assert "split.seed=1" in plan.stages["b"].tasks[0].overrides


def test_a_dry_run_replaces_its_own_scripts_and_never_a_folder_it_did_not_make(tmp_path, caplog):
    """`pipeline submit --dry-run` made a new /tmp folder each time (hundreds piled up)."""
    from biomask.cli import _dry_run_folder

    with _dry_run_folder(tmp_path, "dna prep") as first:
        (first / "prep.sbatch").write_text("old")
    with _dry_run_folder(tmp_path, "dna prep") as again:
        assert again == first and not (again / "prep.sbatch").exists()
    theirs = tmp_path / f"biomask-dry-run-{os.getuid()}-other"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("not biomask's")
    with _dry_run_folder(tmp_path, "other") as other:
        assert other != theirs and (theirs / "notes.txt").read_text() == "not biomask's"
    # two at once: the second waits until the first has printed its scripts (it emptied the folder
    # under the first mid-render, a traceback or another run's scripts shown as its own)
    import logging
    import threading
    import time

    order = []

    def second():
        with _dry_run_folder(tmp_path, "dna prep") as folder:
            order.append(("second", sorted(p.name for p in folder.iterdir())))

    with caplog.at_level(logging.WARNING, logger="biomask"):
        with _dry_run_folder(tmp_path, "dna prep") as folder:
            (folder / "prep.sbatch").write_text("the first's")
            waiting = threading.Thread(target=second)
            waiting.start()
            time.sleep(0.3)
            order.append(("first", (folder / "prep.sbatch").read_text()))
        waiting.join()
    assert order == [("first", "the first's"), ("second", [".biomask-dry-run"])]
    # and says why it waits (the first may sit in a pager nobody reads on)
    assert "waiting for another `biomask pipeline submit --dry-run` of dna prep" in caplog.text
    # a link planted at the lock's name (another user, a shared /tmp) is never followed: the dry run
    # gets a folder of its own and the link's target is not created
    lock = tmp_path / f"biomask-dry-run-{os.getuid()}-planted.lock"
    lock.symlink_to(tmp_path / "created-through-the-link")
    with _dry_run_folder(tmp_path, "planted") as folder:
        assert folder.name.startswith("biomask-dry-run-planted-") and folder.is_dir()
    assert lock.is_symlink() and not (tmp_path / "created-through-the-link").exists()


def test_pipeline_status_says_a_failed_job_without_a_log_never_started(tmp_path, capsys):
    """A job SLURM cancelled while pending has no log; once only sacct knows it, its reason
    (DependencyNeverSatisfied) may be gone, and the hint pointed at a log that was never written."""
    import json
    from types import SimpleNamespace

    from biomask.cli import _what_next

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a-11.out").write_text("the error\n")
    (tmp_path / "jobs.json").write_text(json.dumps({"source": "pipe.yaml", "stages": {}}))
    ended = [
        SimpleNamespace(stage="a", task="", state="FAILED", job_id="11", reason=""),
        SimpleNamespace(stage="b", task="", state="CANCELLED", job_id="12", reason=""),
    ]
    _what_next(tmp_path, ended)
    out = capsys.readouterr().out
    assert f"a: FAILED — log {tmp_path / 'logs' / 'a-11.out'}" in out
    assert "b: CANCELLED — no log: it never started" in out and "biomask pipeline submit pipe.yaml" in out


def test_status_without_a_run_folder_takes_the_latest_by_its_records_not_file_times(tmp_path, monkeypatch):
    """`biomask pipeline status` with no run folder took the folder holding the newest file: one
    copied with `rsync -a` from a host whose clock ran ahead was shown instead of today's run, and a
    dangling link in any run folder (an output a scratch purge took) failed the command. The runs'
    own records say when each ran."""
    import json
    import os

    from biomask.pipelines.runs import find_run_dir

    monkeypatch.chdir(tmp_path)
    today, copied, submitted = (tmp_path / "runs" / n for n in ("today", "old_copied", "cluster"))
    for folder, name, key, when in (
        (today, "local-run.json", "finished", "2026-12-07T10:00:00+0000"),
        (copied, "local-run.json", "finished", "2026-11-01T10:00:00+0000"),
        (submitted, "jobs.json", "submitted", "2026-12-06T09:00:00-0500"),
    ):
        folder.mkdir(parents=True)
        (folder / name).write_text(json.dumps({key: when}))
    future = 4_102_444_800  # 2100: the copy's files carry the other host's clock
    os.utime(copied / "local-run.json", (future, future))
    (copied / "embed_scratch").symlink_to(tmp_path / "purged")
    assert find_run_dir(None) == today.resolve()
    (submitted / "jobs.json").write_text(json.dumps({"submitted": "2026-12-07T09:00:00-0500"}))  # 14:00 UTC
    assert find_run_dir(None) == submitted.resolve()
    # a run in progress is the one a user asks about, whatever its previous run's record says; so is
    # a first run that has written only its resolved pipeline
    import fcntl

    from biomask.pipelines.runs import LOCK_NAME

    with open(copied / LOCK_NAME, "w", encoding="utf-8") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 1 on here")
        held.flush()
        assert find_run_dir(None) == copied.resolve()
    first = tmp_path / "runs" / "first"
    first.mkdir()
    (first / "pipeline.yaml").write_text("name: first\n")
    os.utime(first / "pipeline.yaml", (future, future))  # no record: its own file's time decides
    assert find_run_dir(None) == first.resolve()


def test_nothing_a_pipeline_file_holds_runs_as_shell_in_its_job_scripts(tmp_path):
    """A shared pipeline file's env name (`X;touch f;Y`), a newline in slurm.partition / account /
    qos, or in a config file's or the run folder's path, was written unquoted into the job script
    (an `export` name, an `#SBATCH` line, a comment): the text after it ran as the job, and an
    `#SBATCH` line of its own bypassed the checks `extra` has. Each is refused; values stay quoted."""
    stages = {"a": {"command": "prep dna", "config": GENOME}}
    for top, said in (
        ({"env": {"X;touch PWNED;Y": "v"}}, "environment variable's name"),
        ({"env": {"A=B": "1"}}, "environment variable's name"),
        ({"slurm": {"partition": "gpu\ntouch PWNED"}}, "one word"),
        ({"slurm": {"qos": "normal\n#SBATCH --time=99-00:00:00"}}, "one word"),
        ({"slurm": {"account": "lab project"}}, "one word"),
        ({"run_dir": str(tmp_path / "rn\ntouch PWNED\n#")}, "a path on one line"),
        ({"run_dir": "$SCRATCH/runs/x"}, "does not expand"),  # a folder named `$SCRATCH` was made
        ({"run_dir": "${SCRATCH:-/tmp}/x"}, "does not expand"),
    ):
        assert said in error_of(pipeline(tmp_path, stages, **top)), top
    odd = tmp_path / "cfg\ntouch PWNED\n#"
    odd.mkdir()
    (odd / "c.yaml").write_text(Path(GENOME).read_text())
    plan = load_plan(pipeline(tmp_path, {"a": {"command": "prep dna", "config": str(odd / "c.yaml")}}))
    with pytest.raises(ConfigError, match="holds a line break"):
        render(job_script(plan, plan.stages["a"]))
    # what the script body carries is quoted: a value with shell in it stays a value
    plan = load_plan(pipeline(tmp_path, stages, env={"NOTE": "$(touch PWNED); `x`"}))
    assert "export NOTE='$(touch PWNED); `x`'\n" in render(job_script(plan, plan.stages["a"]))
    # the job log's folder as sbatch reads an #SBATCH line (checked on a real cluster in
    # test_pipeline_slurm): a space or quote inside double quotes, a % doubled
    job = dataclasses.replace(job_script(plan, plan.stages["a"]), log_dir='/x/it\'s 50%x "d"')
    assert '#SBATCH --output="/x/it\'s 50%%x \\"d\\"/a-%j.out"\n' in render(job)
    job = dataclasses.replace(job, log_dir="/x/run#2")  # a # ended the line
    assert '#SBATCH --output="/x/run#2/a-%j.out"\n' in render(job)
    job = dataclasses.replace(job, log_dir="/x/plain")
    assert "#SBATCH --output=/x/plain/a-%j.out\n" in render(job)  # as before where nothing needs it
    # sbatch turns %j off under a backslash whatever the quoting: the job log would go nowhere
    # (run_dir refuses one; a relative run_dir under such a working folder gets here)
    job = dataclasses.replace(job_script(plan, plan.stages["a"]), log_dir=str(tmp_path / "a\\b" / "logs"))
    with pytest.raises(ConfigError, match="backslash"):
        render(job)


def test_a_submission_that_does_not_finish_cancels_the_jobs_it_got_accepted(
    dna_pipeline, tmp_path, cli, monkeypatch
):
    """sbatch that never answered (a controller down) made `pipeline submit` wait in silence for
    ever; Ctrl-C then left the stages already accepted running, recorded nowhere, and the next submit
    queued them again beside them. sbatch is given a time limit, and the accepted jobs are
    cancelled whenever the submission does not finish. Stand-ins: sbatch accepts the first job and
    hangs on the second; scancel logs what it cancels."""
    from biomask.pipelines import slurm

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f"#!/bin/bash\nif [ -e {tmp_path}/first ]; then exec sleep 30; fi\ntouch {tmp_path}/first; echo 41\n"
    )
    (bin_dir / "scancel").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/cancelled\n')
    for tool in ("sbatch", "scancel"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setattr(slurm, "SBATCH_TIMEOUT", 3.0)  # room for a slow machine's stand-ins
    code, _, err = cli("-q", "pipeline", "submit", dna_pipeline)
    assert code == 2 and "sbatch gave no answer in 3 s for stage" in err and "squeue --me" in err, err
    assert "the jobs this submission had got accepted were cancelled (41)" in err
    assert (tmp_path / "cancelled").read_text() == "41\n"
    assert not (tmp_path / "run" / "jobs.json").exists()
    # a scancel that fails is said as such, with the command to run (not "were cancelled")
    (tmp_path / "first").unlink()
    (bin_dir / "scancel").write_text("#!/bin/bash\nexit 1\n")
    code, _, err = cli("-q", "pipeline", "submit", dna_pipeline)
    assert code == 2 and "scancel could not cancel" in err and "scancel 41" in err, err
    assert "were cancelled" not in err
    (bin_dir / "scancel").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/cancelled\n')
    # interrupted (Ctrl-C, SIGTERM) between two jobs: the same
    (tmp_path / "first").unlink()
    (tmp_path / "cancelled").unlink()
    (bin_dir / "sbatch").write_text(
        f"#!/bin/bash\nif [ -e {tmp_path}/first ]; then kill -INT $PPID; sleep 1; fi\n"
        f"touch {tmp_path}/first; echo 51\n"
    )
    code, _, err = cli("-q", "pipeline", "submit", dna_pipeline)
    assert code == 130 and "the jobs this submission had got accepted were cancelled (51)" in err, err
    assert "sbatch was submitting" in err and "may have had it accepted" in err  # the one in flight
    assert (tmp_path / "cancelled").read_text() == "51\n"
    assert not (tmp_path / "run" / "jobs.json").exists()
    # every job accepted, then the record could not be written (a full disk): cancelled too
    (tmp_path / "cancelled").unlink()
    (bin_dir / "sbatch").write_text(
        f"#!/bin/bash\nn=$(cat {tmp_path}/last 2>/dev/null || echo 60); echo $((n + 1)) | tee {tmp_path}/last\n"
    )

    def full(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(slurm, "atomic_write_text", full)
    code, _, err = cli("-q", "pipeline", "submit", dna_pipeline)
    assert code == 2 and "No space left on device" in err and "were cancelled (61, 62)" in err, err
    assert (tmp_path / "cancelled").read_text() == "61 62\n"
    monkeypatch.undo()
    # a record the permissions protect is refused before any job is submitted (and cancelled again)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert cli("-q", "pipeline", "submit", dna_pipeline)[0] == 0  # jobs 63, 64
    (tmp_path / "run" / "jobs.json").chmod(0o444)
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\necho "slurm_load_jobs error: Invalid job id" >&2; exit 1\n'
    )
    (bin_dir / "scontrol").chmod(0o755)
    code, _, err = cli("-q", "pipeline", "submit", dna_pipeline)
    assert code == 2 and "jobs.json is write-protected" in err, err
    assert (tmp_path / "last").read_text() == "64\n"  # sbatch never asked


def test_status_asks_a_controller_that_does_not_answer_once_not_once_per_job(tmp_path, monkeypatch, caplog):
    """With slurmctld and the accounting down, `pipeline status` waited 3 queries x 20 s for every
    stage, in silence (a 31-stage study: half an hour); the first query that times out is said, and
    not asked again."""
    import logging

    from biomask.pipelines import slurm

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("scontrol", "sacct"):
        (bin_dir / tool).write_text(f"#!/bin/bash\necho {tool} >> {tmp_path}/asked\nexec sleep 30\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setattr(slurm, "SLURM_QUERY_TIMEOUT", 2.0)  # room for a slow machine's stand-ins
    run = tmp_path / "run"
    run.mkdir()
    tasks = lambda name: [{"index": 0, "name": name, "output": str(run / name)}]  # noqa: E731
    stages = {name: {"job_id": str(i), "array": False, "tasks": tasks(name)} for i, name in enumerate("abcd")}
    (run / "jobs.json").write_text(json.dumps({"pipeline": "p", "stages": stages}))
    with caplog.at_level(logging.WARNING, logger="biomask"):
        rows = slurm.job_states(run)
    assert [r.state for r in rows] == ["UNKNOWN"] * 4 and {r.source for r in rows} == {"output"}
    # one scontrol, one sacct, one sacct -c: not 12
    assert (tmp_path / "asked").read_text().split() == ["scontrol", "sacct", "sacct"]
    assert "gave no answer in 2 s; the other jobs are read from sacct or their outputs" in caplog.text
