"""`biomask pipeline run` on a real two-stage DNA pipeline (genome -> splice set with the genome's tokenizer,
swept over two split seeds): order, reuse when nothing changed, re-runs when config or inputs change,
--only / --from, failures, and the status table."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from biomask.provenance import read_run_info, sha256_file
from biomask.store import TokenStore
from tests.conftest import leftovers

pytestmark = pytest.mark.network

TASKS = ["prep_genome", "prep_splice/split.seed=0", "prep_splice/split.seed=1"]


def statuses(run_dir) -> dict[str, str]:
    data = json.loads((run_dir / "local-run.json").read_text())
    return {r["task"]: r["status"] for r in data["results"]}


def created(path) -> str:
    return read_run_info(path)["created"]


def test_runs_in_order_then_reuses_then_reruns_what_changed(dna_pipeline, tmp_path, cli):
    run = tmp_path / "run"
    code, out, err = cli("-q", "pipeline", "run", dna_pipeline)
    assert code == 0, err
    assert statuses(run) == dict.fromkeys(TASKS, "ran")
    for task in TASKS:
        assert task.split("/")[0] in out  # the status table
    genome, splice0 = run / "prep_genome", run / "prep_splice" / "split.seed=0"
    assert created(genome) <= created(splice0)
    # the splice set really was tokenized with the genome's tokenizer (an input of its fingerprint)
    tokenizer = read_run_info(genome)
    splice_inputs = {i["name"]: i for i in read_run_info(splice0)["inputs"]}
    assert splice_inputs["tokenizer"]["path"].startswith(str(genome))
    assert tokenizer is not None and TokenStore(splice0).verify() > 0
    # the split seeds differ between the two tasks
    seeds = [
        yaml.safe_load((run / "prep_splice" / s / "config.yaml").read_text())["split"]["seed"]
        for s in ("split.seed=0", "split.seed=1")
    ]
    assert seeds == [0, 1]
    # reproducibility: the resolved pipeline and each stage's config + run.json are in the run directory
    resolved = yaml.safe_load((run / "pipeline.yaml").read_text())
    assert resolved["stages"]["prep_splice"]["tasks"][1]["output"] == str(
        run / "prep_splice" / "split.seed=1"
    )
    assert (genome / "config.yaml").exists() and (run / "logs" / "prep_genome.log").exists()
    # the runner's own record names its code and the pipeline file it read
    record = json.loads((run / "local-run.json").read_text())
    assert record["code"]["source_sha256"] == read_run_info(genome)["code"]["source_sha256"]
    assert record["pipeline_file"] == {"path": str(dna_pipeline), "sha256": sha256_file(dna_pipeline)}

    # unchanged: every stage reuses its output (run.json untouched)
    before = {t: created(run / t) for t in TASKS}
    code, out, _ = cli("-q", "pipeline", "run", dna_pipeline)
    assert code == 0 and statuses(run) == dict.fromkeys(TASKS, "reused")
    assert "reused" in out
    assert {t: created(run / t) for t in TASKS} == before

    # a link left at a stage log's name: that task fails, named; nothing is written through it, and
    # the run's record still holds every task
    victim = tmp_path / "precious.txt"
    victim.write_text("mine\n")
    (run / "logs" / "prep_splice-1.log").unlink()
    (run / "logs" / "prep_splice-1.log").symlink_to(victim)
    code, _, err = cli("-q", "pipeline", "run", dna_pipeline)
    assert code != 0 and "prep_splice-1.log is a symbolic link" in err, err
    assert victim.read_text() == "mine\n"
    assert statuses(run) == {**dict.fromkeys(TASKS, "reused"), "prep_splice/split.seed=1": "failed"}
    (run / "logs" / "prep_splice-1.log").unlink()

    # a downstream config change re-runs only the downstream stage
    code, _, err = cli("-q", "pipeline", "run", dna_pipeline, "stages.prep_splice.overrides.split.test=0.25")
    assert code == 0, err
    assert statuses(run) == {
        "prep_genome": "reused",
        "prep_splice/split.seed=0": "ran (changed)",
        "prep_splice/split.seed=1": "ran (changed)",
    }
    log = (run / "logs" / "prep_splice-0.log").read_text()  # the stage's refusal, then why it is no failure
    assert log.index("holds results of a different config") < log.index("(the refusal above is expected)")

    # an upstream change re-runs it, and the splice set whose input (the tokenizer) changed with it
    kmer = ["stages.prep_genome.overrides.tokenizer.kind=kmer", "stages.prep_genome.overrides.tokenizer.k=3"]
    code, _, err = cli(
        "-q", "pipeline", "run", dna_pipeline, "stages.prep_splice.overrides.split.test=0.25", *kmer
    )
    assert code == 0, err
    assert set(statuses(run).values()) == {"ran (changed)"}
    assert TokenStore(splice0).manifest["tokenizer"]["kind"] == "kmer"
    assert leftovers(run) == [] and leftovers(run / "prep_splice") == []


def test_only_and_from_select_stages(dna_pipeline, tmp_path, cli):
    run = tmp_path / "run"
    # --only a stage whose upstream output does not exist yet: refused before anything runs
    code, _, err = cli("-q", "pipeline", "run", dna_pipeline, "--only", "prep_splice")
    assert code == 2 and "prep_splice needs prep_genome, whose output" in err
    assert not (run / "prep_splice").exists()
    # ... unless a run in progress may be writing it: then that run is the reason given
    from biomask.pipelines.plan import load_plan
    from biomask.pipelines.runs import run_lock

    with run_lock(load_plan(dna_pipeline)):
        code, _, err = cli("-q", "pipeline", "run", dna_pipeline, "--only", "prep_splice")
    assert code == 2 and "is in use by another `biomask pipeline run` (pid" in err, err

    code, _, err = cli("-q", "pipeline", "run", dna_pipeline, "--only", "prep_genome")
    assert code == 0, err
    assert statuses(run) == {"prep_genome": "ran"} and not (run / "prep_splice").exists()

    code, _, err = cli("-q", "pipeline", "run", dna_pipeline, "--from", "prep_splice")
    assert code == 0, err
    assert statuses(run) == {"prep_splice/split.seed=0": "ran", "prep_splice/split.seed=1": "ran"}

    # `pipeline status` shows the last local run
    code, out, _ = cli("pipeline", "status", run)
    assert code == 0 and "prep_splice/split.seed=1" in out and "ran" in out
    code, _, err = cli("pipeline", "status", tmp_path / "no-such-run")  # a typo in the path
    assert code == 2 and "no-such-run does not exist" in err

    # a second `pipeline run` on the same run_dir while one is running is refused, naming the holder
    with run_lock(load_plan(dna_pipeline)):
        code, _, err = cli("-q", "pipeline", "run", dna_pipeline, "--only", "prep_genome")
        status_code, status, _ = cli("pipeline", "status", run)
        _, as_json, said = cli("pipeline", "status", run, "--json")
        submit_code, _, submit_err = cli("pipeline", "submit", dna_pipeline)
    assert code == 2 and "is in use by another `biomask pipeline run` (pid" in err, err
    assert status_code == 0 and "a `biomask pipeline run` is in progress" in status  # and the last table
    assert json.loads(as_json) and "in progress" in said  # stdout stays the list a script parses
    assert submit_code == 2 and "is in use by a `biomask pipeline run`" in submit_err
    assert "in progress" not in cli("pipeline", "status", run)[1]
    code, _, err = cli("-q", "pipeline", "run", dna_pipeline, "--only", "prep_genome")  # released
    assert code == 0 and statuses(run) == {"prep_genome": "reused"}, err


def test_a_failing_stage_stops_its_dependents(dna_pipeline, tmp_path, cli):
    run = tmp_path / "run"
    missing = tmp_path / "empty-genome.fa"  # there (a missing one is refused before anything runs), but empty
    missing.write_text("")
    code, out, err = cli(
        "-q", "pipeline", "run", dna_pipeline, f"stages.prep_genome.overrides.inputs=[{{path: {missing}}}]"
    )
    assert code == 2  # the stage's own exit code: bad input
    assert statuses(run) == {
        "prep_genome": "failed",
        "prep_splice/split.seed=0": "not run",
        "prep_splice/split.seed=1": "not run",
    }
    assert "failed" in out and "prep_genome" in out  # the status table
    assert "stage prep_genome failed (exit 2)" in err and str(missing) in err  # and the stage's own message
    assert not (run / "prep_genome").exists() and leftovers(run) == []
    # a script testing the run later gets a failure too, not 0 beside a FAILED row
    code, out, _ = cli("pipeline", "status", run)
    assert code == 1 and "failed" in out and "not run" in out


def test_jobs_run_a_sweep_at_once_after_the_stage_it_needs(dna_pipeline, tmp_path, cli):
    run = tmp_path / "run"
    code, _, err = cli("pipeline", "run", dna_pipeline, "--jobs", "2")
    assert code == 0, err
    assert "running up to 2 tasks at once" in err
    results = {r["task"]: r for r in json.loads((run / "local-run.json").read_text())["results"]}
    assert [r["status"] for r in results.values()] == ["ran"] * 3
    genome, first, second = (results[t] for t in TASKS)
    # the splice tasks waited for the genome (they need its tokenizer) ...
    assert min(first["started"], second["started"]) >= genome["started"] + genome["seconds"]
    # ... and then ran at the same time
    assert max(first["started"], second["started"]) < min(
        first["started"] + first["seconds"], second["started"] + second["seconds"]
    )
    assert TokenStore(run / "prep_splice" / "split.seed=1").verify() > 0
    # the same outputs as one at a time: a rerun with one job reuses all three
    code, _, err = cli("-q", "pipeline", "run", dna_pipeline, "--jobs", "1")
    assert code == 0, err
    assert statuses(run) == dict.fromkeys(TASKS, "reused")
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error
        cli("-q", "pipeline", "run", dna_pipeline, "--jobs", "0")
    assert exit_.value.code == 2


def _would(out: str) -> dict[str, str]:
    """task -> action, from the dry run's table (one row per task; long cells fold onto more lines)."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 3 and cells[1] in ("run", "resume", "run again", "reuse", "refused"):
            rows[cells[0]] = cells[1]
    return rows


def test_the_preview_sees_inputs_that_changed_under_an_unchanged_config(tmp_path, cli, repo):
    """The preview compared configs only: an input file edited in place, or a pretrain pointed at
    another store, showed "reuse" — and `submit` queued jobs that then refused their outputs (exit 2,
    without --overwrite) after their wait. It checks inputs as the stages do."""
    from biomask import datasets

    lines = [line for line in datasets.fetch("uci-splice").read_text().splitlines() if line.strip()]
    rows = [([f.strip() for f in line.split(",")]) for line in lines if not line.startswith(("@", "%"))][
        ::20
    ][:160]
    table = tmp_path / "task.csv"
    table.write_text("sequence,label\n" + "".join(f"{''.join(r[:-1])},{r[-1]}\n" for r in rows))
    run_dir = tmp_path / "run"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"""\
name: inputs
run_dir: {run_dir}
stages:
  prep:
    command: prep dna
    config: {repo}/configs/dna/splice.yaml
    overrides: {{inputs: [{{path: {table}, format: table}}], tokenizer.kind: char}}
  pretrain:
    command: pretrain
    config: {repo}/configs/pretrain/dna-cnn-quick.yaml
    overrides: {{data.store: "${{stages.prep.output}}", data.max_length: 60, model.max_len: 60, train.steps: 2,
                 train.progress: false}}
""")
    assert cli("-q", "pipeline", "run", pipeline)[0] == 0
    code, out, _ = cli("pipeline", "run", pipeline, "--dry-run")
    assert code == 0 and _would(out) == {"prep": "reuse", "pretrain": "reuse"}
    original = table.read_text()
    table.write_text(original.replace(",EI\n", ",IE\n", 1))  # one label flipped, in place
    code, out, _ = cli("pipeline", "run", pipeline, "--dry-run")
    assert code == 0 and _would(out) == {"prep": "run again", "pretrain": "run again"}, out
    assert "not what this config makes of its inputs now" in out.replace("\n", " ").replace("│", "")
    code, _, err = cli("pipeline", "submit", pipeline, "--dry-run")
    assert code == 2 and "prep:" in err and "pass --overwrite" in err, err
    assert cli("-q", "pipeline", "submit", pipeline, "--dry-run", "--overwrite")[0] == 0
    table.write_text(original)
    # another store under the same config: the pretrain's recorded store is not it
    other = tmp_path / "other-store"
    code, _, err = cli("prep", "dna", "-c", repo / "configs/dna/splice.yaml", f"inputs=[{{path: {table}, format: table}}]",
                       "tokenizer.kind=char", "split.seed=1", f"output={other}")  # fmt: skip
    assert code == 0, err
    moved = f"stages.pretrain.overrides.data.store={other}"
    code, out, _ = cli("pipeline", "run", pipeline, "--dry-run", moved)
    assert code == 0 and _would(out) == {"prep": "reuse", "pretrain": "run again"}, out
    code, _, err = cli("pipeline", "submit", pipeline, "--dry-run", moved)
    assert code == 2 and "pretrain" in err and "pass --overwrite" in err, err
    code, out, _ = cli("pipeline", "run", pipeline, "--dry-run")
    assert code == 0 and set(_would(out).values()) == {"reuse"}
    # an input this node cannot read is no sign of a change (a job may see file systems it does not)
    table.rename(tmp_path / "away.csv")
    code, out, err = cli("pipeline", "submit", pipeline, "--dry-run")
    assert code == 0 and "2 reuse" in out, err
    (tmp_path / "away.csv").rename(table)
    # a training output of another number of processes is another global batch, which the stage
    # will not reuse or resume: the preview said "reuse", and the run then trained it again saying
    # its config had changed (a cluster's model replaced by one trained here)
    code, out, err = cli(
        "pipeline", "submit", pipeline, "--dry-run", "stages.pretrain.slurm.tasks_per_node=2"
    )
    flat = " ".join((out + err).replace("│", " ").split())
    assert (
        code == 2 and "a run finished with 1 process; this launch has 2" in flat and "pass --overwrite" in err
    ), flat
    info_path = run_dir / "pretrain" / "run.json"  # as `pipeline submit` with two tasks would have left it
    info = json.loads(info_path.read_text(encoding="utf-8"))
    info_path.write_text(json.dumps({**info, "world_size": 2}), encoding="utf-8")
    code, out, _ = cli("pipeline", "run", pipeline, "--dry-run")
    flat = " ".join(out.replace("│", " ").split())
    assert code == 0 and _would(out)["pretrain"] == "run again", out
    assert "a run finished with 2 processes; this launch has 1 (`pipeline run` trains on one)" in flat, flat
    code, out, err = cli("pipeline", "run", pipeline)
    flat = " ".join((out + err).split())
    assert (
        code == 0
        and "other settings than its output's" in flat
        and "holds a run finished with 2 processes" in flat
    ), flat
    assert "config or inputs changed" not in flat


def test_the_preview_reads_datasets_as_the_pipelines_stages_do_and_fetches_nothing(
    tmp_path, cli, repo, monkeypatch
):
    """The preview's input check ran in the shell's environment, not the pipeline's `env` (its own
    data cache or registry: a false "run again", which submit refused), and fetched through the
    registry: a damaged cached copy was set aside and downloaded again by a dry run."""
    from biomask import datasets

    source = datasets.fetch("uci-splice")
    cache = tmp_path / "cache"
    (cache / "uci-splice").mkdir(parents=True)
    copy = cache / "uci-splice" / source.name
    copy.write_bytes(source.read_bytes())
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"""\
name: cache
run_dir: {tmp_path / "run"}
env: {{BIOMASK_DATA_DIR: {cache}}}
stages:
  prep:
    command: prep dna
    config: {repo}/configs/dna/splice.yaml
    overrides: {{tokenizer.kind: char}}
""")
    assert cli("-q", "pipeline", "run", pipeline)[0] == 0
    shells = tmp_path / "shell-cache"  # this shell's cache lacks it: only the pipeline's has it
    shells.mkdir()
    monkeypatch.setenv("BIOMASK_DATA_DIR", str(shells))
    code, out, err = cli("pipeline", "submit", pipeline, "--dry-run")
    assert code == 0 and _would(out) == {"prep": "reuse"}, (out, err)
    with copy.open("ab") as handle:
        handle.write(b"junk")  # damaged: the stage will fetch it again; a dry run does nothing to it
    listing = sorted(p.name for p in cache.rglob("*"))
    code, out, _ = cli("pipeline", "run", pipeline, "--dry-run")
    assert code == 0 and _would(out) == {"prep": "reuse"}
    assert sorted(p.name for p in cache.rglob("*")) == listing and copy.read_bytes().endswith(b"junk")
    assert not any(shells.iterdir())  # nothing fetched into the shell's cache either


def test_dry_run_says_what_a_run_would_do_and_runs_nothing(dna_pipeline, tmp_path, cli):
    run = tmp_path / "run"
    code, out, err = cli("pipeline", "run", dna_pipeline, "--dry-run")
    assert code == 0, err
    assert _would(out) == {
        "prep_genome": "run",
        "prep_splice/split.seed=0": "run",
        "prep_splice/split.seed=1": "run",
    }
    assert "3 run -- nothing was run" in out and not run.exists()  # nothing written, not even the run folder
    code, out, _ = cli("-v", "pipeline", "run", dna_pipeline, "--dry-run")
    assert code == 0 and "-m biomask prep dna --config" in out  # -v: the commands

    assert cli("-q", "pipeline", "run", dna_pipeline)[0] == 0
    listing = sorted(p.relative_to(run) for p in run.rglob("*"))
    code, out, _ = cli("pipeline", "run", dna_pipeline, "--dry-run")
    assert code == 0 and set(_would(out).values()) == {"reuse"}
    # a key that changes no result (worker threads) is no reason to run again, as the stage itself decides
    code, out, _ = cli(
        "pipeline", "run", dna_pipeline, "--dry-run", "stages.prep_splice.overrides.num_workers=2"
    )
    assert code == 0 and set(_would(out).values()) == {"reuse"}
    # a downstream change: that stage only, with the key; an upstream change: the stages after it as well
    code, out, _ = cli(
        "pipeline", "run", dna_pipeline, "--dry-run", "stages.prep_splice.overrides.split.test=0.25"
    )
    assert _would(out) == {
        "prep_genome": "reuse",
        "prep_splice/split.seed=0": "run again",
        "prep_splice/split.seed=1": "run again",
    }
    assert "config changed: split.test:" in out and "-> 0.25" in out
    kmer = ["stages.prep_genome.overrides.tokenizer.kind=kmer", "stages.prep_genome.overrides.tokenizer.k=3"]
    code, out, _ = cli("pipeline", "run", dna_pipeline, "--dry-run", *kmer)
    assert set(_would(out).values()) == {"run again"} and "prep_genome runs first" in out
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == listing  # the dry runs wrote nothing
    # and the run does what the dry run said
    assert cli("-q", "pipeline", "run", dna_pipeline, *kmer)[0] == 0
    assert set(statuses(run).values()) == {"ran (changed)"}

    # an output path holding what biomask did not write: the run would refuse it, so the dry run says so
    foreign = tmp_path / "other"
    (foreign / "prep_genome").mkdir(parents=True)
    (foreign / "prep_genome" / "notes.txt").write_text("mine")
    code, out, _ = cli("pipeline", "run", dna_pipeline, "--dry-run", f"run_dir={foreign}")
    assert code == 2 and _would(out)["prep_genome"] == "refused" and "not written by biomask" in out
    assert (foreign / "prep_genome" / "notes.txt").read_text() == "mine"


def test_a_moved_run_folder_is_reused_and_what_changed_in_it_is_not(dna_pipeline, tmp_path, cli):
    """`mv run /elsewhere/renamed`, then the same pipeline with run_dir there: the paths its stages
    recorded inside the old run folder (the splice set's tokenizer.path: the genome store) compare
    as the same paths inside the new one, so nothing runs again — while a path outside the run
    folder still counts, and a moved file whose contents changed is still caught by its checksum."""
    assert cli("-q", "pipeline", "run", dna_pipeline)[0] == 0
    moved = tmp_path / "project" / "renamed"
    moved.parent.mkdir()
    (tmp_path / "run").rename(moved)
    before = {t: created(moved / t) for t in TASKS}
    code, out, err = cli("pipeline", "run", dna_pipeline, f"run_dir={moved}", "--dry-run")
    assert code == 0, err
    assert set(_would(out).values()) == {"reuse"}
    why = " ".join(line.split("│")[3].strip() for line in out.splitlines() if line.count("│") == 4)
    assert f"written in {tmp_path / 'run'}, moved here since" in why
    code, _, err = cli("-q", "pipeline", "run", dna_pipeline, f"run_dir={moved}")
    assert code == 0, err
    assert statuses(moved) == dict.fromkeys(TASKS, "reused")
    assert {t: created(moved / t) for t in TASKS} == before  # untouched, not rewritten
    # and moved again: still where it was first written, by its recorded config
    again = tmp_path / "again"
    moved.rename(again)
    code, out, _ = cli("pipeline", "run", dna_pipeline, f"run_dir={again}", "--dry-run")
    assert code == 0 and set(_would(out).values()) == {"reuse"}

    # a path outside the run folder is compared as written: another copy of the genome store is
    # another tokenizer.path, as before
    outside = tmp_path / "elsewhere" / "prep_genome"
    outside.parent.mkdir()
    shutil.copytree(again / "prep_genome", outside)
    elsewhere = f"stages.prep_splice.overrides.tokenizer.path={outside}"
    code, out, _ = cli("pipeline", "run", dna_pipeline, f"run_dir={again}", "--dry-run", elsewhere)
    assert _would(out)["prep_splice/split.seed=0"] == "run again" and "tokenizer.path:" in out

    # a file of the moved genome store edited (same tokens, other bytes): its checksum, which the
    # store's run.json records, makes the store stale, so the pipeline prepares it again (the splice
    # sets are never built on the edited one)
    tokenizer = again / "prep_genome" / "tokenizer" / "tokenizer.json"
    original = tokenizer.read_text()
    tokenizer.write_text(json.dumps(json.loads(original), indent=1))
    code, _, err = cli("-q", "pipeline", "run", dna_pipeline, f"run_dir={again}")
    assert code == 0 and statuses(again)["prep_genome"] == "ran (changed)", err
    assert tokenizer.read_text() == original
    # and where run.json recorded no checksums (an output of before 2026-12-06), the store's manifest
    # still catches it when the splice sets read it
    info_path = again / "prep_genome" / "run.json"
    info = json.loads(info_path.read_text())
    del info["output_sha256"]
    info_path.write_text(json.dumps(info))
    tokenizer.write_text(json.dumps(json.loads(original), indent=1))
    code, _, err = cli("-q", "pipeline", "run", dna_pipeline, f"run_dir={again}", "--only", "prep_splice")
    assert code == 2 and f"tokenizer file {tokenizer} was modified or removed" in err


def test_a_run_whose_pipeline_file_is_gone_still_records_itself(dna_pipeline, tmp_path):
    """local-run.json's pipeline-file digest ended the run's record in a traceback where the file had
    gone (moved while the run ran, or a plan built in memory)."""
    from biomask.pipelines.local import _record
    from biomask.pipelines.plan import load_plan

    plan = load_plan(dna_pipeline, [f"run_dir={tmp_path / 'r'}"])
    plan.source = tmp_path / "gone.yaml"
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    _record(plan, [])
    record = json.loads((plan.run_dir / "local-run.json").read_text())
    assert record["pipeline_file"] == {"path": str(tmp_path / "gone.yaml"), "sha256": None}


def test_a_stage_log_the_disk_refuses_ends_the_log_not_the_run(dna_pipeline, tmp_path, cli, monkeypatch):
    """A full disk under logs/: the runner died at its first log line (exit 2, naming no file), the
    stage it had started left running unread, no table and no local-run.json. The stage runs on,
    the log's end is said, and the run is recorded. (/dev/full refuses every write as a full disk.)"""
    from biomask.pipelines import local

    monkeypatch.setattr(
        local, "append_own", lambda path: open("/dev/full", "a", buffering=1, encoding="utf-8")
    )
    run = tmp_path / "run"
    code, out, err = cli("-q", "pipeline", "run", dna_pipeline, "--only", "prep_genome")
    assert code == 0, err
    assert "prep_genome: its log stops where the disk refused it" in " ".join(err.split())
    assert "No space left on device" in err and str(run / "logs" / "prep_genome.log") in err
    assert statuses(run) == {"prep_genome": "ran"} and "prep_genome" in out  # the table, and the record
    # a rerun after a config change: its note that the refusal is expected went to the log unguarded
    changed = "stages.prep_genome.overrides.windows.stride=256"
    code, out, err = cli("-q", "pipeline", "run", dna_pipeline, "--only", "prep_genome", changed)
    assert code == 0 and statuses(run) == {"prep_genome": "ran (changed)"}, err
