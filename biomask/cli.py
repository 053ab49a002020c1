"""The `biomask` command line. Each subcommand imports its stage lazily so `--help` stays fast.

Exit codes: 0 success; 1 unexpected failure; 2 bad input (a file, record, line or config key the
message names); 3 a data source could not be reached; 75 training checkpointed on a scheduler's
signal (errors.SCHEDULER_SIGNALS; requeue and rerun to resume), or stopped by one while starting;
130 interrupted; 143 stopped by one in any other command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import posixpath
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from biomask import __version__
from biomask.errors import SCHEDULER_SIGNALS, BiomaskError, ConfigError, InputError, Terminated
from biomask.stages import STAGES, load_ref

log = logging.getLogger("biomask")
# the commands that checkpoint on a scheduler's signal and exit 75, which their job scripts requeue on
TRAINING_COMMANDS = frozenset({"fit-cells", *(name for name, spec in STAGES.items() if spec.training)})


# Override examples in each stage's --help (optional): its own keys (tests/test_config_reference.py
# checks them).
OVERRIDE_EXAMPLES = {
    "prep dna": "tokenizer.kind=kmer tokenizer.k=6 split.seed=3",
    "prep cells": "labels.column=cell_type labels.missing=drop hvg.n_top_genes=2000",
    "pretrain": "masking.scheme=bert15 train.steps=3000 deepspeed.stage=1 train.report_to=[tensorboard,wandb]",
    "evaluate": "seeds=[0,1,2] splits.mode=store protocols=[linear_probe,knn]",
    "report": "title=Splice r2mae=r2mae-long provenance=[runs/prep/splice-char]",
}


def _add_stage_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    """The arguments every config-driven stage takes (`stage`: its name in `biomask.stages.STAGES`)."""
    parser.add_argument("-c", "--config", help="the stage's YAML config (required to run the stage)")
    parser.set_defaults(schema=STAGES[stage].schema, config_required=True)
    _add_print_config(parser)
    # the example is optional: a stage registered without one still gets its command (and the parser,
    # which every command builds, does not fail on it)
    example = OVERRIDE_EXAMPLES.get(stage)
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],  # optional (argparse calls a bare nargs="*" positional required)
        metavar="KEY=VALUE",
        help=f"override config keys, e.g. {example}" if example else "override config keys (key.sub=value)",
    )
    parser.epilog = (
        f"Every key with its default: biomask {stage} --print-config, or docs/config-reference.md "
        "(biomask config-reference)."
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output written with a different config"
    )


def _add_print_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML (the defaults, with --config and overrides applied) and exit",
    )


class _Version(argparse.Action):
    """`biomask --version`: 0.1.0 alone named every commit alike; the code a run folder records
    (run.json's `code`) is matched by the commit and the source's sha256."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from biomask.provenance import code_version

        code = code_version()
        commit = code["git_commit"]
        where = (
            f"commit {commit[:12]}{' (uncommitted changes)' if code['git_dirty'] else ''}, " if commit else ""
        )
        print(f"biomask {__version__} ({where}source sha256 {code['source_sha256'][:12]})")
        parser.exit()


def _schema_defaults(schema) -> tuple[dict, list[str]]:
    """Every key of a schema with its default; required keys without one are null (and listed)."""
    from pydantic import BaseModel
    from pydantic_core import to_jsonable_python

    from biomask.config import field_model

    data: dict = {}
    required: list[str] = []
    for name, field in schema.model_fields.items():
        if not field.is_required():
            value = field.get_default(call_default_factory=True)
            data[name] = (
                value.model_dump(mode="json") if isinstance(value, BaseModel) else to_jsonable_python(value)
            )
            continue
        model = field_model(field.annotation)
        if model is None:
            data[name], found = None, [name]
        else:
            inner, found = _schema_defaults(model)
            found = [f"{name}.{key}" for key in found] or [name]
            data[name] = [inner] if typing.get_origin(field.annotation) is list else inner
        required += found
    return data, required


def _wrong_beyond_required(schema, merged: dict, required: list[str]) -> bool:
    """Whether the schema finds more wrong with `merged` than the required keys left null."""
    from pydantic import ValidationError

    try:
        schema.model_validate(merged)
    except ValidationError as exc:
        for problem in exc.errors():
            where = ".".join(str(part) for part in problem["loc"] if not isinstance(part, int))
            if not any(where == key or where.startswith(key + ".") for key in required):
                return True
    return False


def cmd_print_config(args: argparse.Namespace) -> int:
    """`biomask <stage> --print-config`: the config the stage would run with, as YAML."""
    import yaml

    from biomask.config import apply_overrides, dump_config, load_config, read_yaml
    from biomask.errors import ConfigError

    schema = load_ref(args.schema)
    overrides = [*getattr(args, "shortcut_overrides", lambda a: [])(args), *args.overrides]
    try:
        print(dump_config(load_config(schema, args.config, overrides)), end="")
        return 0
    except ConfigError as error:
        if args.config is not None:
            raise  # the file itself is wrong: the error says where
        problem = error
    # No file: the defaults, with the keys a config must set shown as null — unless an override is
    # wrong too (an unknown key, a value of the wrong type), which the stage would refuse: said here
    data, required = _schema_defaults(schema)
    given = read_yaml(args.config) if args.config else {}
    apply_overrides(given, overrides)
    merged = _merge(data, given)
    if _wrong_beyond_required(schema, merged, required):
        raise problem
    print(
        f"# biomask {args.command} {' '.join(filter(None, [getattr(args, 'prep_command', None)]))}".rstrip()
    )
    print(
        "# defaults; set the null keys (required): "
        + ", ".join(k for k in required if _at(merged, k) is None)
    )
    print(yaml.safe_dump(merged, sort_keys=False, default_flow_style=None, allow_unicode=True), end="")
    return 0


def _at(data: dict, dotted: str) -> object:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for key, value in new.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


# ----------------------------------------------------------------------------------------- commands


def cmd_datasets_list(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from biomask import datasets

    entries = datasets.registry()
    if args.json:
        print(json.dumps({name: e.model_dump(mode="json") for name, e in entries.items()}, indent=2))
        return 0
    columns = ("name", "modality", "kind", "size", "source", "licence", "cached")
    rows = [
        (name, e.modality, e.kind, f"{e.size / 1e6:.1f} MB" if e.size else "?", e.source.describe(), e.licence,
         "yes" if datasets.is_cached(name) else "")
        for name, e in sorted(entries.items())
    ]  # fmt: skip
    # piped or in a log: one tab-separated line per dataset, for grep and cut; so too on a terminal
    # too narrow for the table (at 40 columns four of its columns shrank to nothing)
    if not sys.stdout.isatty() or Console().width < 100:
        # the cache on standard error (not under --quiet): the table stays one line per dataset
        logging.getLogger("biomask").info("cache: %s", datasets.data_dir())
        print("\t".join(columns))
        for row in rows:
            print("\t".join(row))
        return 0
    table = Table(title=f"biomask datasets (cache: {datasets.data_dir()})")
    for column in columns:
        # names stay whole (they are what users type); the long columns fold
        table.add_column(column, overflow="fold", no_wrap=column == "name")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    return 0


def cmd_datasets_fetch(args: argparse.Namespace) -> int:
    from biomask import datasets

    names = list(datasets.registry()) if args.all else args.names
    if not names:
        raise InputError("name a dataset to fetch (see `biomask datasets list`), or pass --all")
    for name in names:
        path = datasets.fetch(name, args.data_dir, force=args.force)
        print(f"{name}\t{path}")
    return 0


def cmd_datasets_task(args: argparse.Namespace) -> int:
    from biomask.datasets.annotation_tasks import write_task

    path = write_task(
        args.task,
        args.genome,
        args.output,
        length=args.length,
        placement=args.placement,
        max_per_class=args.max_per_class,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(path)
    return 0


def _stage_config(stage: str, path: str | None, overrides: list[str]) -> typing.Any:
    """A stage's config from its file and overrides. A file written for another command (an evaluate
    YAML given to pretrain, a pipeline file to a stage) listed a dozen unknown keys and suggested near
    names for them: said in one line instead."""
    from biomask.config import load_config, read_yaml
    from biomask.stages import stage_whose_keys

    schema = load_ref(STAGES[stage].schema)
    try:
        return load_config(schema, path, overrides)
    except ConfigError as error:
        try:
            keys = set(read_yaml(path)) if path is not None else set()
        except (ConfigError, TypeError, ValueError):
            raise error from None
        unknown = keys - set(schema.model_fields)
        if "stages" in unknown:
            raise ConfigError(
                f"{path} is a pipeline file: run it with `biomask pipeline run {path}`"
            ) from None
        # one key unknown is a slip in this command's config: its own error says it
        other = stage_whose_keys(keys, besides=stage) if len(unknown) >= 2 else None
        if other:
            raise ConfigError(
                f"{path} is a `biomask {other}` config, not a `biomask {stage}` one: run "
                f"`biomask {other} -c {path}`, or give {stage} a config of its own (configs/ has examples)"
            ) from None
        raise


def _run_stage(stage: str, args: argparse.Namespace, overrides: list[str] | None = None, **extra) -> Path:
    """A registered stage (`biomask.stages.STAGES`): load its config from --config and key=value
    overrides, run its runner `function(cfg, overwrite=..., **extra)` and return the output path."""

    spec = STAGES[stage]
    cfg = _stage_config(stage, args.config, args.overrides if overrides is None else overrides)
    done = load_ref(spec.reused)(cfg) if spec.reused and not args.overwrite else None
    if done:
        return done
    if spec.training:  # pretrain holds its output's lock itself (rank 0 alone, across the launch)
        return load_ref(spec.runner)(cfg, overwrite=args.overwrite, **extra)
    from biomask.outputs import hold_output

    # two runs into one output (a workflow engine's retry beside the first try, two shells): each
    # computed and renamed its result over the other's, and both said they wrote it. The second is
    # refused while the first runs; started after it, it reuses or refuses what the first wrote.
    output = Path(cfg.output).absolute()
    missing = [p for p in output.parents if _absent(p)]  # the lock's folder, made for it
    held = hold_output(output, stage)
    try:
        return load_ref(spec.runner)(cfg, overwrite=args.overwrite, **extra)
    finally:
        if held is not None:
            held.release()
        if _absent(output):  # refused or failed: no empty folders made for the lock are left
            for folder in missing:
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _absent(path: Path) -> bool:
    """Whether `path` does not exist; a folder this user cannot look into is not taken as absent (the
    stage's own message names what it cannot read)."""
    try:
        return not path.exists()
    except OSError:
        return False


def _print_stage(stage: str, args: argparse.Namespace, overrides: list[str] | None = None) -> int:
    """Run a stage and print the output path it returns (stdout: the result only)."""
    path = _run_stage(stage, args, overrides)
    try:
        print(path, flush=True)
    except OSError as exc:
        # `biomask ... > run.log` on a full disk: the stage had finished, and the error named no file
        from biomask.errors import EnvironmentIOError, describe_os_error, is_environment_error

        if not is_environment_error(exc):
            raise
        raise EnvironmentIOError(
            f"{stage} finished and wrote {path}, but its path could not be written to standard output: "
            + describe_os_error(exc, "standard output")
        ) from None
    return 0


def cmd_prep_dna(args: argparse.Namespace) -> int:
    return _print_stage("prep dna", args)


def cmd_prep_cells(args: argparse.Namespace) -> int:
    return _print_stage("prep cells", args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    return _print_stage("evaluate", args)


def cmd_report(args: argparse.Namespace) -> int:
    return _print_stage("report", args)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from biomask.errors import Requeue
    from biomask.training.distributed import resolve_env
    from biomask.training.rundir import finished_run

    # -q: only warnings and errors, so no progress lines either (train.progress changes no result)
    cfg = _stage_config(
        "pretrain", args.config, [*args.overrides, *(["train.progress=false"] if args.quiet else [])]
    )
    env = resolve_env(os.environ, args.local_rank)  # srun sets SLURM_PROCID, not RANK, until setup_env
    done = None if args.overwrite else finished_run(cfg, env.world_size, env.rank)
    try:
        path = done or load_ref(STAGES["pretrain"].runner)(
            cfg, overwrite=args.overwrite, local_rank=args.local_rank
        )
    except Requeue as exc:
        if env.rank == 0:  # said once, not by every process of a launch
            with contextlib.suppress(OSError):  # SIGHUP, the terminal gone: the checkpoint and 75 stand
                print(f"biomask: {requeue_message(exc)}", file=sys.stderr)
        return exc.exit_code
    if env.rank == 0:
        print(path)
    return 0


def requeue_message(exc: BiomaskError) -> str:
    """A training stop as the command line reports it: with the exit code a job script requeues on."""
    return f"{exc}; exiting with code {exc.exit_code} so the job can be requeued"


def _embed_shortcuts(args: argparse.Namespace) -> list[str]:
    shortcuts = {
        "checkpoint": args.checkpoint,
        "input": args.input,
        "output": args.output,
        "pooling": args.pooling,
        "layer": args.layer,
        "batch_size": args.batch_size,
        "umap.color": args.umap_color,
        "matrix": args.matrix,
    }
    # The flags are overrides like any key=value; a value that YAML would read as another type
    # (a path named 'true', say) is quoted.
    return [f"{key}={json.dumps(value)}" for key, value in shortcuts.items() if value is not None]


def cmd_embed(args: argparse.Namespace) -> int:
    return _print_stage("embed", args, [*_embed_shortcuts(args), *args.overrides])


def cmd_export_hf(args: argparse.Namespace) -> int:
    from biomask.export import export_hf

    print(export_hf(args.checkpoint, args.output, overwrite=args.overwrite))
    return 0


def cmd_fit_cells(args: argparse.Namespace) -> int:
    from biomask.config import apply_overrides
    from biomask.embedding.fit import fit_cells_file

    counts: dict = {}
    apply_overrides(counts, [o.removeprefix("counts.") for o in args.overrides if o.startswith("counts.")])
    overrides = dict(o.split("=", 1) for o in args.overrides if not o.startswith("counts.") and "=" in o)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise InputError(f"fit-cells: {bad[0]!r} is not of the form key.sub=value")
    if args.quiet:  # only warnings and errors: no progress lines either
        overrides.setdefault("train.progress", "false")
    print(
        fit_cells_file(
            args.input,
            args.output,
            matrix=args.matrix,
            counts=counts,
            gene_column=args.gene_column,
            strip_version=args.strip_version,
            batch_key=args.batch_key,
            duplicates=args.duplicates,
            n_top_genes=args.n_top_genes,
            masking=args.masking,
            seed=args.seed,
            init_from=args.init_from,
            overrides=overrides,
            umap_color=args.umap_color,
            key=args.key,
            overwrite=args.overwrite,
        )
    )
    return 0


def cmd_store_verify(args: argparse.Namespace) -> int:
    from biomask.store import TokenStore

    failed = 0
    for root in args.stores:  # every store is checked: one damaged store does not hide the next
        try:
            count = TokenStore(root, check_sizes=False).verify()
        except BiomaskError as exc:
            if len(args.stores) == 1:
                raise
            print(f"biomask: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{root}: {count} files match the manifest")
    if failed:
        raise InputError(f"{failed} of {len(args.stores)} stores failed verification (each named above)")
    return 0


def cmd_store_info(args: argparse.Namespace) -> int:
    import json

    from biomask.provenance import content_sha256
    from biomask.store import TokenStore

    store = TokenStore(args.store)
    m = store.manifest
    summary = {
        "content_sha256": content_sha256(m),
        "modality": m.get("modality"),
        "kind": m.get("kind"),
        "tokenizer": m.get("tokenizer"),
        "label_names": m.get("label_names"),
        "class_counts": m.get("class_counts"),
        "splits": {
            name: {k: s[k] for k in ("num_records", "num_tokens", "fixed_length")}
            | {"shards": len(s["shards"])}
            for name, s in m["splits"].items()
        },
        "stats": m.get("stats"),
        "sources": m.get("sources"),
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_pipeline_run(args: argparse.Namespace) -> int:
    from biomask.pipelines.local import Stopped, exit_code, run_pipeline
    from biomask.pipelines.plan import load_plan
    from biomask.pipelines.tables import local_table, print_failures, show

    plan = load_plan(args.pipeline, args.overrides)
    title = f"pipeline {plan.pipeline.name} ({plan.run_dir})"
    if args.dry_run:
        from biomask.pipelines.preview import print_preview

        return print_preview(plan, only=args.only or (), start=args.start, verbose=args.verbose)
    try:
        results = run_pipeline(
            plan, only=args.only or (), start=args.start, echo=not args.quiet, jobs=args.jobs
        )
    except Stopped as exc:  # what ran before the signal, then its message
        with contextlib.suppress(OSError):  # SIGHUP: the terminal is gone; the run is recorded
            show(local_table(title, exc.results))
        raise
    show(local_table(title, results))
    print_failures(results)
    return exit_code(results)


def cmd_pipeline_submit(args: argparse.Namespace) -> int:
    from biomask.pipelines.plan import load_plan
    from biomask.pipelines.preview import print_submit_preview
    from biomask.pipelines.runs import run_in_progress
    from biomask.pipelines.slurm import render_scripts, submit

    plan = load_plan(args.pipeline, args.overrides)
    holder = run_in_progress(plan.run_dir)
    if holder is not None:  # jobs would train the same runs beside it (a dry run says so too)
        raise InputError(
            f"run_dir {plan.run_dir} is in use by a `biomask pipeline run` ({holder}); wait for it to finish "
            "or stop it first, or submit to another run_dir"
        )

    def announce(selected: Sequence[str]) -> None:
        print_submit_preview(plan, selected, overwrite=args.overwrite)

    if args.dry_run:
        import tempfile

        from biomask.pipelines.slurm import check_no_active_jobs, check_time_limits, related_stages

        selected = plan.select(args.only or (), args.start)
        check_no_active_jobs(plan.run_dir, related_stages(plan, selected), unknown_ok=True)  # as submit
        check_time_limits(plan, selected)
        announce(selected)
        # rendered outside run_dir: a dry run neither claims an empty run folder for this pipeline
        # nor rewrites the scripts of a submission whose jobs still read them. One folder per user
        # and pipeline, replaced by the next dry run: a folder each time filled /tmp (hundreds seen)
        with _dry_run_folder(Path(tempfile.gettempdir()), plan.pipeline.name) as into:
            for path in render_scripts(
                plan, only=args.only or (), start=args.start, overwrite=args.overwrite, into=into
            ).values():
                print(path)
            print(f"(rendered under {into}; nothing was written to {plan.run_dir})")
        return 0
    record = submit(plan, only=args.only or (), start=args.start, overwrite=args.overwrite, before=announce)
    for name, job in record["stages"].items():
        after = f" after {','.join(job['after'])}" if job["after"] else ""
        print(f"{name}\t{job['job_id']}{after}\t{job['script']}")
    log.info("submitted; follow with: biomask pipeline status %s", plan.run_dir)
    return 0


_DRY_RUN_MARK = ".biomask-dry-run"


@contextlib.contextmanager
def _dry_run_folder(tmp: Path, name: str) -> typing.Iterator[Path]:
    """`tmp/biomask-dry-run-<uid>-<pipeline>`, emptied of an earlier dry run's scripts (only a folder
    an earlier dry run marked as its own; anything else gets a fresh folder beside it). Held under
    an flock until the caller has printed its scripts: two dry runs at once emptied each other's
    folder mid-render (a traceback, errors naming files that had gone) or printed scripts the other
    had written."""
    import fcntl
    import shutil
    import tempfile

    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "pipeline"
    folder = tmp / f"biomask-dry-run-{os.getuid()}-{slug}"
    try:
        lock = os.open(tmp / f"{folder.name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:  # not ours (a link, another user's): a folder of this run's own, unshared
        yield Path(tempfile.mkdtemp(prefix=f"biomask-dry-run-{slug}-", dir=tmp))
        return
    try:
        with contextlib.suppress(OSError):  # where flock is refused, as before
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held while the other prints (a pager not read on holds it on)
                log.warning(
                    "waiting for another `biomask pipeline submit --dry-run` of %s to finish printing "
                    "its scripts (it holds %s; a pager it prints into holds it until you leave the pager; "
                    "Ctrl-C stops this one)",
                    name,
                    tmp / f"{folder.name}.lock",
                )
                fcntl.flock(lock, fcntl.LOCK_EX)
        if folder.is_dir() and not folder.is_symlink() and (folder / _DRY_RUN_MARK).is_file():
            shutil.rmtree(folder)
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:  # not ours to replace
            folder = Path(tempfile.mkdtemp(prefix=f"biomask-dry-run-{slug}-", dir=tmp))
        (folder / _DRY_RUN_MARK).write_text(
            "scripts rendered by `biomask pipeline submit --dry-run`\n", encoding="utf-8"
        )
        yield folder
    finally:
        os.close(lock)


def _what_next(run_dir: Path, ended: list) -> None:
    """Under the table of a submission with jobs that ended without their output: each one's log,
    and how to go on (a table of FAILED and DependencyNeverSatisfied rows said what, not what next)."""
    if not ended:
        return
    from biomask.pipelines.slurm import read_jobs

    record = read_jobs(run_dir)
    own = [s for s in ended if "DependencyNeverSatisfied" not in s.reason]
    for s in own:  # an array task's job_id is SLURM's <array job>_<index>, as its log is named
        task = f"[{s.task}]" if s.task != "" else ""
        log_file = run_dir / "logs" / f"{s.stage}-{s.job_id}.out"
        # no log: it never started (cancelled while pending, its reason forgotten once only sacct knows it)
        where = f"log {log_file}" if log_file.exists() else "no log: it never started"
        print(f"{s.stage}{task}: {s.state} — {where}")
    waiting = len(ended) - len(own)
    if waiting:
        print(f"{waiting} job(s) cancelled because a job they depend on ended without its output")
    print(
        f"When the cause is fixed: biomask pipeline submit {record.get('source', 'PIPELINE')} — finished "
        "stages are reused and interrupted training resumes from its last checkpoint"
    )


def cmd_pipeline_status(args: argparse.Namespace) -> int:
    import json

    from biomask.pipelines.runs import find_run_dir, run_in_progress
    from biomask.pipelines.slurm import UNSUCCESSFUL_STATES, job_states
    from biomask.pipelines.tables import local_table, show, slurm_table

    # 1 where a stage ended without its output (failed, cancelled, timed out, stopped), so a script
    # can test the run as it tests `pipeline run`; pending and running jobs are not failures.

    run_dir = find_run_dir(args.target)
    holder = run_in_progress(run_dir)
    if holder is not None:  # with --json on stderr: stdout stays the list a script parses
        line = f"a `biomask pipeline run` is in progress in {run_dir} ({holder}); its log: {run_dir / 'logs'}"
        print(line, file=sys.stderr if args.json else sys.stdout)
    if (run_dir / "jobs.json").exists():
        states = job_states(run_dir)
        if args.json:
            print(json.dumps([s.as_dict() for s in states], indent=2))
        else:
            show(slurm_table(f"SLURM jobs of {run_dir}", states))
            _what_next(run_dir, [s for s in states if s.state in UNSUCCESSFUL_STATES])
        return 1 if any(s.state in UNSUCCESSFUL_STATES for s in states) else 0
    if (run_dir / "local-run.json").exists():
        from biomask.pipelines.local import TaskResult

        record = run_dir / "local-run.json"
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
            results = [TaskResult(**r) for r in data["results"]]
            finished = data["finished"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"{record} is corrupt or not biomask's ({type(exc).__name__}: {exc}); run the pipeline "
                "again to rewrite it (finished stages are reused)"
            ) from None
        if args.json:
            print(json.dumps(data["results"], indent=2))
        else:
            show(local_table(f"last local run of {run_dir} ({finished})", results))
        return 0 if all(r.ok for r in results) else 1
    if holder is not None:  # the first run, not finished yet
        if args.json:
            print("[]")
        return 0
    if (run_dir / "logs").is_dir():  # a run started here and stopped before its end (killed)
        raise InputError(
            f"{run_dir}: no run has finished here and none is running: the last one stopped before its end "
            f"(its logs: {run_dir / 'logs'}); run the pipeline again (finished stages are reused)"
        )
    raise InputError(f"{run_dir}: neither jobs.json nor local-run.json; run or submit the pipeline first")


def cmd_pipeline_templates(args: argparse.Namespace) -> int:
    from pathlib import Path

    from biomask.pipelines.templates import write_templates

    for path in write_templates(Path(args.out), overwrite=args.overwrite):
        print(path)


def _theory_shortcuts(args: argparse.Namespace) -> list[str]:
    return [f"output={args.output}"] if args.output else []


def cmd_theory(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + _theory_shortcuts(args)
    return _print_stage("theory", args, overrides)


def cmd_config_reference(args: argparse.Namespace) -> int:
    from biomask import config_reference

    if args.output == "-":
        print(config_reference.render(), end="")
    else:
        log.info("wrote %s", config_reference.write(Path(args.output)))
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    """The shipped configs, for a user of an installed biomask (no configs/ folder of a checkout to
    copy from): listed, or one printed whole, comments and all, to be saved and edited."""
    from biomask.resources import configs_dir, shipped_configs

    found = shipped_configs()
    if args.name is None:
        width = max(map(len, found), default=0)
        for name, about in found.items():
            print(f"{name:<{width}}  {about}".rstrip())
        return 0
    name = posixpath.normpath(args.name.replace(os.sep, "/")).removeprefix("configs/")  # ./x, configs/x
    if name not in found:
        import difflib

        by_file = {Path(n).name: n for n in found}
        near = difflib.get_close_matches(name, found, n=3, cutoff=0.6) or [
            by_file[m] for m in difflib.get_close_matches(Path(name).name, by_file, n=3, cutoff=0.6)
        ]
        raise InputError(
            f"no shipped config {args.name!r}"
            + (f"; did you mean {', '.join(near[:3])}?" if near else "")
            + " (`biomask configs` lists them)"
        )
    raw = (configs_dir() / name).read_bytes()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a text-only stream (a notebook's): the text, as it takes it
        sys.stdout.write(raw.decode("utf-8"))
    else:  # the file's own bytes: a copy under an ASCII locale keeps its UTF-8 comments
        sys.stdout.flush()
        buffer.write(raw)
        buffer.flush()
    return 0


def cmd_main(args: argparse.Namespace) -> int:
    from biomask.main_job import run_main_job

    return run_main_job(args)


# ----------------------------------------------------------------------------------------- parser


def _seed(value: str) -> int:
    from biomask.config import MAX_SEED

    try:
        seed = int(value)
    except ValueError:
        seed = -1
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"--seed {value!r}: a whole number from 0 to {MAX_SEED}")
    return seed


def _jobs(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise argparse.ArgumentTypeError(f"--jobs {value!r}: a number >= 1 or 'auto'")
    return jobs


def jobs_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--jobs",
        "-j",
        type=_jobs,
        default=None,
        metavar="N|auto",
        help="tasks run at once (a sweep's runs, independent stages); default: the pipeline's local.jobs",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="biomask",
        description="Masked pretraining (R²MAE and baselines) of DNA and single-cell foundation models.",
    )
    parser.add_argument(
        "--version",
        action=_Version,
        nargs=0,
        help="show the version, with the commit and source sha256 run folders record (run.json's code)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The deepspeed launcher inserts --local_rank=N right after the program name.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        parent: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        p.set_defaults(func=func, command_parser=p)  # its own usage and options in an error
        # -q / -v after the subcommand too (`biomask pretrain -q ...`); SUPPRESS keeps the global flag
        # when they are not repeated here
        p.add_argument(
            "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings and errors"
        )
        p.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
        )
        return p

    ds = sub.add_parser("datasets", help="the registry of real datasets").add_subparsers(
        dest="datasets_command", metavar="ACTION", required=True
    )
    p = command(
        ds, "list", cmd_datasets_list, "list registered datasets, their sources, licences and cache state"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = command(ds, "fetch", cmd_datasets_fetch, "fetch datasets into the cache (verified by sha256)")
    p.add_argument("names", nargs="*", default=[], metavar="NAME")
    p.add_argument("--all", action="store_true", help="fetch every registered dataset")
    p.add_argument("--force", action="store_true", help="fetch again even if a verified copy is cached")
    p.add_argument("--data-dir", help="cache directory (default: $BIOMASK_DATA_DIR or ~/.cache/biomask/data)")

    from biomask.datasets.annotation_tasks import TASKS  # numpy only: the parser stays quick to build

    p = command(
        ds,
        "task",
        cmd_datasets_task,
        "derive a labelled DNA task (CSV for `biomask prep dna`) from a registered annotated genome",
    )
    p.add_argument(
        "task",
        choices=list(TASKS),
        help="gene-starts: windows holding an annotated CDS start vs others; coding: windows inside CDS "
        "read in the genes' direction, against it, or outside any CDS (3 classes)",
    )
    p.add_argument(
        "--genome",
        required=True,
        help="a registered GenBank dataset (ecoli-k12, bjaponicum, macetivorans) or a GenBank path",
    )
    p.add_argument("--output", required=True, help="the CSV to write (sequence, label, source)")
    p.add_argument("--length", type=int, default=200, help="window length in bases (default 200)")
    p.add_argument(
        "--placement",
        choices=["random", "centre"],
        default="random",
        help="gene-starts: random puts the start anywhere in the middle half (a motif task); centre: a "
        "position task",
    )
    p.add_argument("--max-per-class", type=int, default=None, help="at most this many windows per label")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    prep = sub.add_parser("prep", help="data-preparation stages").add_subparsers(
        dest="prep_command", metavar="MODALITY", required=True
    )
    _add_stage_arguments(
        command(
            prep, "dna", cmd_prep_dna, "tokenize DNA (FASTA genomes, labelled tables) into a token store"
        ),
        "prep dna",
    )
    _add_stage_arguments(
        command(
            prep,
            "cells",
            cmd_prep_cells,
            "tokenize single-cell expression (h5ad, 10x, loom) into a token store of cells",
        ),
        "prep cells",
    )

    p = command(
        sub,
        "pretrain",
        cmd_pretrain,
        "masked pretraining with DeepSpeed ZeRO (resumes automatically; exit 75 = checkpointed on a signal)",
    )
    _add_stage_arguments(p, "pretrain")

    _add_stage_arguments(
        command(
            sub,
            "evaluate",
            cmd_evaluate,
            "downstream classification: baselines and pretrained models over seeds",
        ),
        "evaluate",
    )

    p = command(
        sub,
        "fit-cells",
        cmd_fit_cells,
        "pretrain the cell model on your own cells (labels unused) and embed them: prep, pretrain, embed",
    )
    p.add_argument("--input", required=True, help="the .h5ad of your cells (counts, or see counts.mode)")
    p.add_argument(
        "--output", required=True, help="a directory: store/, pretrain/model/, embed/embeddings.h5ad"
    )
    p.add_argument("--matrix", default="X", help="where the expression is: X, raw or layers/NAME")
    p.add_argument(
        "--gene-column", default=None, help="var column with gene identifiers (default: var index)"
    )
    p.add_argument(
        "--strip-version", action="store_true", help="drop Ensembl IDs' .N version suffixes (ENSG….4 → ENSG…)"
    )
    p.add_argument(
        "--batch-key",
        metavar="OBS_COLUMN",
        help="each cell's sample or batch: the decoder reads it, so the embedding need not split batches",
    )
    p.add_argument(
        "--duplicates",
        choices=["sum", "first", "error"],
        default="sum",
        help="gene names that occur more than once: add their counts up, keep the first column, or refuse",
    )
    p.add_argument(
        "--n-top-genes",
        type=int,
        default=None,
        help="the panel: this many most variable genes (default 2000; not with --init-from: its panel is kept)",
    )
    p.add_argument("--masking", default="r2mae", help="masking scheme (r2mae, bert15, fixed40, mae75, ...)")
    p.add_argument("--seed", type=_seed, default=0, help="pretraining seed")
    p.add_argument(
        "--init-from", help="continue this cells checkpoint on your cells (its gene panel is kept)"
    )
    p.add_argument("--umap-color", metavar="OBS_COLUMN", help="also save a UMAP PNG coloured by this column")
    p.add_argument("--key", default="X_biomask", help="obsm key of the embedding (and its uns provenance)")
    p.add_argument(
        "overrides",
        nargs="*",
        default=[],  # optional (argparse calls a bare nargs="*" positional required)
        metavar="KEY=VALUE",
        help="counts.mode=log1p (log-normalised input), pretrain keys (e.g. train.steps=3000), or on a "
        "small machine hvg.max_cells and block_size",
    )
    p.add_argument("--overwrite", action="store_true", help="replace outputs written with other settings")

    p = command(
        sub,
        "embed",
        cmd_embed,
        "embeddings of cells (h5ad) or DNA sequences from a pretrained checkpoint, into AnnData for scanpy",
    )
    p.add_argument(
        "-c", "--config", help="the stage's YAML config (the flags below are shortcuts for its keys)"
    )
    p.add_argument(
        "overrides", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys, e.g. matrix=raw"
    )
    p.add_argument("--checkpoint", help="a portable checkpoint (the model/ directory of a pretrain run)")
    p.add_argument("--input", help="an .h5ad of cells, or DNA: FASTA, CSV/TSV table, token store")
    p.add_argument("--output", help="an .h5ad file, or a directory (embeddings.h5ad, umap.png, provenance)")
    p.add_argument(
        "--pooling",
        choices=("cls", "mean", "max", "mean_layers"),
        help="[CLS] vector, mean or per-feature max over content tokens, or every block's mean side by side",
    )
    p.add_argument("--layer", type=int, help="-1 (last, default) ... 0 (the embeddings)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="records per forward pass (the vectors agree to float rounding across sizes)",
    )
    p.add_argument(
        "--umap-color", metavar="OBS_COLUMN", help="also save a UMAP PNG coloured by this obs column"
    )
    p.add_argument("--matrix", help="h5ad: where the expression is: X (default), raw or layers/NAME")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing output written with a different config"
    )
    p.set_defaults(schema=STAGES["embed"].schema, shortcut_overrides=_embed_shortcuts)
    _add_print_config(p)

    p = command(
        sub,
        "export-hf",
        cmd_export_hf,
        "a portable checkpoint as a Hugging Face folder (AutoModel with trust_remote_code, AutoTokenizer)",
    )
    p.add_argument(
        "--checkpoint", required=True, help="a portable checkpoint (the model/ directory of a pretrain run)"
    )
    p.add_argument(
        "--output", required=True, help="the export directory (config.json, weights, tokenizer, code)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace another checkpoint's export there (the export's own files only; others are kept)",
    )

    _add_stage_arguments(
        command(
            sub,
            "report",
            cmd_report,
            "the study report: tables, paired tests, curves, ratios, UMAP, provenance",
        ),
        "report",
    )

    store = sub.add_parser("store", help="inspect and verify token stores").add_subparsers(
        dest="store_command", metavar="ACTION", required=True
    )
    p = command(store, "verify", cmd_store_verify, "check every shard's sha256 against the manifest")
    p.add_argument("stores", nargs="+", metavar="STORE")
    p = command(store, "info", cmd_store_info, "summarise a token store")
    p.add_argument("store", metavar="STORE")

    pipe = sub.add_parser("pipeline", help="stage graphs: run here, or submit to SLURM").add_subparsers(
        dest="pipeline_command", metavar="ACTION", required=True
    )

    def pipeline_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "pipeline", metavar="PIPELINE", help="a pipeline file, e.g. configs/pipelines/dna-prep.yaml"
        )
        p.add_argument(
            "overrides",
            nargs="*",
            default=[],
            metavar="KEY=VALUE",
            help="override pipeline keys, e.g. run_dir=/scratch/run1",
        )
        which = p.add_mutually_exclusive_group()
        which.add_argument("--only", action="append", metavar="STAGE", help="only this stage (repeatable)")
        which.add_argument(
            "--from", dest="start", metavar="STAGE", help="this stage and every stage after it"
        )

    p = command(
        pipe, "run", cmd_pipeline_run, "run the stages here in dependency order, reusing current outputs"
    )
    pipeline_arguments(p)
    jobs_argument(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="say what each stage would do (run, resume, run again and why, reuse), run nothing",
    )
    p = command(
        pipe, "submit", cmd_pipeline_submit, "render one sbatch script per stage and submit the chain"
    )
    pipeline_arguments(p)
    p.add_argument(
        "--overwrite", action="store_true", help="stages replace outputs written with another config"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="say what each job would do and render the scripts into a temporary folder; write and submit nothing",
    )
    p = command(
        pipe, "status", cmd_pipeline_status, "the state of each stage's job (or of the last local run)"
    )
    p.add_argument(
        "target", nargs="?", metavar="RUN_DIR", help="run directory or pipeline file (default: latest)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = command(
        pipe, "templates", cmd_pipeline_templates, "write the plain sbatch templates (pipelines/slurm/)"
    )
    p.add_argument("--out", default="pipelines/slurm", help="directory (default: pipelines/slurm)")
    p.add_argument("--overwrite", action="store_true", help="replace templates that were edited")

    p = command(
        sub,
        "theory",
        cmd_theory,
        "linear-model simulation of mask pretraining: risk against mask ratio, R²MAE vs best fixed ratio",
    )
    p.add_argument(
        "-c", "--config", help="YAML config (default: the built-in defaults, see configs/theory.yaml)"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. test_repetitions=50",
    )
    p.add_argument("--output", help="output directory (default: the config's `output`, runs/theory)")
    p.add_argument("--overwrite", action="store_true", help="replace an output written with another config")
    p.set_defaults(schema=STAGES["theory"].schema, shortcut_overrides=_theory_shortcuts)
    _add_print_config(p)

    p = command(
        sub,
        "config-reference",
        cmd_config_reference,
        "write the reference of every stage's config keys, generated from the schemas",
    )
    p.add_argument(
        "--output", default="docs/config-reference.md", help="file, or - for stdout (default: %(default)s)"
    )

    p = command(
        sub,
        "configs",
        cmd_configs,
        "the configs biomask ships: listed, or one printed to copy and edit "
        "(biomask configs evaluate/motif-task.yaml > my-task.yaml)",
    )
    p.add_argument(
        "name", nargs="?", help="a config to print, e.g. pretrain/dna-tiny.yaml (default: list them)"
    )

    p = command(sub, "main", cmd_main, "the main job: the R²MAE study end to end on the built-in real data")
    p.add_argument("--output", default="runs/main", help="run directory (default: runs/main)")
    jobs_argument(p)
    p.add_argument(
        "--pipeline",
        help="the study pipeline (default: configs/pipelines/study-quick.yaml; see study-full.yaml)",
    )
    p.add_argument("--dry-run", action="store_true", help="say what each stage would do, run nothing")
    return parser


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    if quiet or not sys.stderr.isatty():
        # progress bars only on a terminal: in logs (pipelines, SLURM) every refresh would be a line
        os.environ.setdefault("TQDM_DISABLE", "1")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("biomask: %(message)s"))
    root = logging.getLogger("biomask")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _said_by_rank0(exc: BiomaskError) -> bool:
    """On ranks above 0, an error every rank raises alike (rank 0's bad-input verdict, the requeue
    checkpoint) is printed by rank 0 alone: once in a log, not once per GPU."""
    from biomask.errors import Requeue

    rank = os.environ.get("RANK", "0")
    return (
        rank.isdigit() and int(rank) > 0 and (getattr(exc, "from_rank0", False) or isinstance(exc, Requeue))
    )


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return (
        type(exc).__name__ == "OutOfMemoryError" or "can't allocate memory" in text or "out of memory" in text
    )


def _report_error(exc: BiomaskError | Terminated) -> None:
    """Tell a pipeline runner which error ended a stage (it re-runs one whose output went stale)."""
    path = os.environ.get("BIOMASK_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError):
            payload = {"error": type(exc).__name__, "exit_code": exc.exit_code, "message": str(exc)}
            Path(path).write_text(json.dumps(payload), encoding="utf-8")


def _usable_streams() -> None:
    """A closed stdout or stderr (`>&-`, a daemon's) is None in Python: a finished report or theory run
    then failed at its last flush, and every command with stderr closed did nothing, exit 1. Text on a
    stream that cannot encode it (PYTHONIOENCODING=ascii: `--help` names R²MAE) is escaped, not a
    UnicodeEncodeError. Files biomask writes are UTF-8 whatever the locale (encoding= everywhere)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))
        elif (getattr(stream, "encoding", None) or "utf-8").lower().replace("-", "") != "utf8":
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.reconfigure(errors="backslashreplace")


def _option_hints(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """The nearest option of the command for a misspelled one; an override written as a flag
    (`--train.steps=5`) said to be written without dashes. Python 3.11's argparse suggests nothing."""
    import difflib

    options = [o for action in parser._actions for o in action.option_strings]
    hints = []
    for item in extra:
        flag = item.split("=", 1)[0]
        if not item.startswith("-") or flag in options:
            continue
        close = difflib.get_close_matches(flag, options, n=1, cutoff=0.7)
        if close:
            hints.append(f"{flag}: did you mean {close[0]}?")
        elif "=" in item and "." in flag:
            hints.append(f"{item}: overrides are written without dashes ({item.lstrip('-')})")
    return "; " + "; ".join(hints) if hints else ""


def _suggest_command(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A misspelled command (`biomask pretrian`, `biomask prep dan`) named with the nearest one."""
    import difflib

    words = [w for w in argv if not w.startswith("-")]
    current, path = parser, ["biomask"]
    for word in words:
        actions = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            return
        choices = actions[0].choices
        if word not in choices:
            close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
            if close:
                current.error(f"unknown command {' '.join([*path[1:], word])!r}: did you mean "
                              f"`{' '.join([*path, close[0]])}`?")  # fmt: skip
            return
        current, path = choices[word], [*path, word]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (`argv`, default sys.argv[1:]) and return its exit code; the variables it sets
    for itself are the caller's again after it (a script or notebook calling it in-process)."""
    from biomask.resources import restoring_env

    with restoring_env("TQDM_DISABLE", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    _usable_streams()
    # oneDNN (torch's CPU convolutions and matmuls) keeps a compiled kernel for each input shape it
    # meets, 1,024 of them by default, each holding memory: embedding DNA records of many lengths grew
    # about 50 MB per 8,000 records (50,000 records peaked at 1,029 MB; 719 MB with 64, and faster:
    # docs/benchmarks.md) (read when the first kernel is built; a user's own setting is kept)
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    parser = build_parser()
    _suggest_command(parser, list(sys.argv[1:] if argv is None else argv))
    args, extra = parser.parse_known_args(argv)
    own = getattr(args, "command_parser", parser)  # the subcommand's: its usage, its options
    # key=value overrides may follow flags (`--overwrite tokenizer.k=4`), which argparse cannot interleave
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        own.error(f"unrecognized arguments: {' '.join(extra)}{_option_hints(own, extra)}")
    if getattr(args, "config_required", False) and args.config is None and not args.print_config:
        own.error("the following arguments are required: -c/--config")
    _setup_logging(args.quiet, args.verbose)
    from biomask.cells.kernels import use_writable_cache

    use_writable_cache()  # before scanpy or umap imports numba: a read-only home failed them
    stops = [_SigtermStop(), *(_SchedulerStop(s) for s in SCHEDULER_SIGNALS if s != signal.SIGTERM)]
    interrupt = _SigintStop()
    with contextlib.ExitStack() as guards:
        for guard in (*stops, interrupt):
            guards.enter_context(guard)
        code = _run(args)
    caught_by = [(stop, signal.Signals(stop.SIGNAL).name, Terminated.exit_code) for stop in stops]
    for caught, name, exit_code in (*caught_by, (interrupt, "Ctrl-C", 130)):
        if caught.raised and code == 0:
            # the stop was raised where the command stood and something it called (C code checking for
            # signals: numba's compiler, a ctypes callback) dropped it: the command ran on to the end.
            # Its output is whole; the stop is said
            log.warning(
                "%s reached this command, which did not stop (a library it called let the stop pass) and "
                "finished instead: its output is complete; exiting %d, as for the stop",
                name,
                exit_code,
            )
            return exit_code
    return code


class _SigtermStop:
    """SIGTERM's default ends the process where it stands, leaving the temporary output a stage was
    writing (`.NAME.tmp-...`, as large as the store) until a later run of that output removes it; as
    an exception it unwinds through the stage's clean-up, as Ctrl-C does. Training replaces this
    handler with its own while it runs (it checkpoints and exits 75, and may then ignore SIGTERM: that
    is kept). A handler set by whoever called main() (a notebook, a test, an ignored SIGTERM) is left
    alone."""

    # a repeat within this many seconds (a scheduler's before its SIGKILL) must not cut the clean-up
    # the first one started short; a later one stops a command that let the first pass (it ran on,
    # deaf to every SIGTERM, where the handler had set SIG_IGN)
    REPEAT_GRACE_S = 10.0

    SIGNAL = signal.SIGTERM
    DEFAULT: typing.Any = signal.SIG_DFL  # the handler this one stands in for (another's is left)

    def __init__(self) -> None:
        self.raised = False
        self.first: float | None = None

    def __call__(self, signum: int, frame: typing.Any) -> None:
        now = time.monotonic()
        if self.first is not None and now - self.first < self.REPEAT_GRACE_S:
            return
        self.first = now
        self.raised = True
        self.stop()

    def stop(self) -> None:
        raise Terminated

    def __enter__(self) -> None:
        self.installed = (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(self.SIGNAL) is self.DEFAULT
        )
        if self.installed:
            signal.signal(self.SIGNAL, self)

    def __exit__(self, *exc: object) -> None:
        if self.installed and (self.raised or signal.getsignal(self.SIGNAL) is self):
            signal.signal(self.SIGNAL, self.DEFAULT)


class _SchedulerStop(_SigtermStop):
    """Another scheduler's stop signal, outside training (which checkpoints on it and exits 75):
    SIGUSR1 (SLURM's --signal, LSF's -wa), SIGUSR2 (SGE's -notify before its SIGKILL), SIGXCPU (a
    CPU-time limit). Their default ended the command where it stood, its temporary output left
    behind and no word said; as SIGTERM, it unwinds through the stage's clean-up."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.SIGNAL = signum

    def stop(self) -> None:
        raise Terminated(signal.Signals(self.SIGNAL).name)


class _SigintStop(_SigtermStop):
    """Ctrl-C as Python's own handler raises it (KeyboardInterrupt), and recorded: raised inside a
    ctypes callback (numba compiling a kernel) Python prints it and drops it, and `evaluate` ran every
    seed and exited 0. Every press raises (no grace): a second Ctrl-C is how a user insists."""

    SIGNAL = signal.SIGINT
    DEFAULT = signal.default_int_handler
    REPEAT_GRACE_S = 0.0

    def stop(self) -> None:
        raise KeyboardInterrupt


# what each command's memory grows with, as a setting it takes (measured under a 512 MB cap: prep
# cells fitted once all four of its were lowered; embed with chunk_size 2,048)
_MEMORY_SETTINGS = {
    "prep cells": "block_size, hvg.max_cells (the cells scanpy's HVG selection holds), shard_tokens and "
    "tokenizer.median_max_values",
    "prep dna": "shard_tokens (the tokens held before a shard is written); an input's annotation task "
    "(task: coding) holds about 25 bytes per base of its genome whatever max_per_class is: give it "
    "fewer records (a GenBank file of the contigs wanted) or more memory",
    "pretrain": "train.micro_batch_size (train.grad_accum keeps the global batch)",
    "evaluate": "batch_size",
    "embed": "chunk_size (cells read at a time) and batch_size (records per forward pass)",
    "fit-cells": "hvg.max_cells and block_size (prep), train.micro_batch_size",
}  # other commands (export-hf, report, theory) take no such setting


def _run(args: argparse.Namespace) -> int:
    try:
        code = cmd_print_config(args) if getattr(args, "print_config", False) else int(args.func(args) or 0)
        sys.stdout.flush()  # a reader gone away shows here, inside the handlers, not at interpreter exit
        return code
    except BiomaskError as exc:
        from biomask.errors import Requeue

        if not _said_by_rank0(exc):
            # a training stop (fit-cells stopped by a signal) is no error: the same command resumes it
            line = (
                f"biomask: {requeue_message(exc)}" if isinstance(exc, Requeue) else f"biomask: error: {exc}"
            )
            with contextlib.suppress(OSError):  # stderr gone (a terminal closed): the exit code tells
                print(line, file=sys.stderr)
        _report_error(exc)
        return exc.exit_code
    except BrokenPipeError:
        # the reader went away (`biomask store info S | head`): stop quietly, as `cat` does; stdout
        # is pointed at /dev/null so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        # the file system refused (disk full, read-only, permission denied, a directory for a file):
        # a message naming the path and exit 2, not a traceback; other OSErrors are bugs (traceback)
        from biomask.errors import EnvironmentIOError, describe_os_error, is_environment_error

        if not is_environment_error(exc):
            raise
        error = EnvironmentIOError(describe_os_error(exc))
        print(f"biomask: error: {error}", file=sys.stderr)
        _report_error(error)
        return error.exit_code
    except (MemoryError, RuntimeError) as exc:
        # numpy's "Unable to allocate 117. MiB ..." and torch's "DefaultCPUAllocator: can't allocate
        # memory" (a RuntimeError, as CUDA's out of memory is) as tracebacks named no way out
        if not _out_of_memory(exc):
            raise
        from biomask.errors import first_line

        first = first_line(exc)
        settings = _MEMORY_SETTINGS.get(
            " ".join(filter(None, [getattr(args, "command", None), getattr(args, "prep_command", None)]))
        )
        error = BiomaskError(
            f"out of memory{f' ({first[:300]})' if first else ''}. Give it more memory"
            + (f", or lower what sets it: {settings}" if settings else "")
        )
        with contextlib.suppress(OSError):
            print(f"biomask: error: {error}", file=sys.stderr)
        _report_error(error)
        return error.exit_code
    except KeyboardInterrupt:
        print("biomask: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        if getattr(args, "command", None) in TRAINING_COMMANDS:
            # training checkpoints and exits 75 on these signals; one that came while it started (the
            # imports, the config, the store) or finished, outside its own handlers, exited 143, and a
            # job script that requeues on 75 let the job end instead
            from biomask.errors import Requeue

            stop = Requeue(
                f"{exc} outside the training steps (starting or finishing): nothing half-written is left, "
                "and the same command resumes or reuses what was written"
            )
            print(f"biomask: {requeue_message(stop)}", file=sys.stderr)
            _report_error(stop)
            return stop.exit_code
        print(
            f"biomask: {exc}; what it was writing was removed, nothing half-written is left. "
            "Run the same command again to do it",
            file=sys.stderr,
        )
        _report_error(exc)
        return exc.exit_code


def entry() -> None:
    """The `biomask` console script and `python -m biomask`: main(), then the process ends."""
    from biomask.errors import Requeue

    Requeue.ends_process = True
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C before a command's own handler is in place (parsing, imports)
        print("biomask: interrupted", file=sys.stderr)
        code = 130
    except Exception:
        # a bug's traceback (or a backend's RuntimeError) in a process that started a group: printed,
        # exit 1, and the same end as any other (the interpreter's teardown is where ranks abort)
        distributed = sys.modules.get("biomask.training.distributed")
        if distributed is None or not distributed.started_process_group():
            raise
        import traceback

        traceback.print_exc()
        code = 1
    distributed = sys.modules.get("biomask.training.distributed")  # imported by a command that trains
    if distributed is None:
        raise SystemExit(code)
    distributed.leave_process(code)


if __name__ == "__main__":
    entry()
