"""What every stage does around its work: decide whether its output is current, write atomically,
and leave the resolved config and provenance beside the results.

    stage = StageOutput("prep-dna", cfg, cfg.output, inputs=[{"name": ..., "sha256": ...}])
    if stage.is_current(overwrite=args.overwrite):
        return stage.path                  # same config and inputs: reuse
    with stage.writing(seeds={"split": cfg.split.seed}) as tmp:
        ...                                # write results into tmp; it replaces the output on success
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from biomask import relocation
from biomask.config import Config, config_fingerprint, config_fingerprints, write_config
from biomask.outputs import (
    FILE_TREE_KEY,
    FILES_KEY,
    OUTPUT_DIGESTS_KEY,
    atomic_output_dir,
    check_output,
    file_tree,
    output_digests,
)
from biomask.provenance import Began, code_differs, read_run_info, sha256_json, write_run_info

log = logging.getLogger(__name__)

# Bumped when a stage's output format changes, so old outputs are not taken for current ones.
OUTPUT_FORMAT_VERSION = 1


# An input entry's key for the sha256 of a checkpoint's config.json, beside its weights' sha256.
CONFIG_SHA256 = "config_sha256"


def input_identity(entry: dict[str, Any], *, with_config: bool = True) -> str:
    """What an input contributes to a stage's fingerprint: a file's sha256 (a checkpoint's also its
    config.json's), or (another stage's output, whose files are not hashed again) that stage's
    fingerprint and creation time, and the sha256 of what a stage reads of it when recorded
    (`metrics_sha256`: an evaluation's metrics.json, edited). `with_config=False`: as outputs written
    before 2026-12-05 evening computed it, from a checkpoint's weights alone."""
    if "sha256" in entry:
        # A checkpoint retrained into the same weights can still embed otherwise: its config.json
        # decides, e.g. model.embed_norm (the latent at unit length or not).
        config = entry.get(CONFIG_SHA256) if with_config else None
        return str(entry["sha256"]) + (f"+{config}" if config else "")
    return (
        str(entry.get("fingerprint", ""))
        + str(entry.get("created", ""))
        + str(entry.get("metrics_sha256", ""))
    )


# how a stage's own command recomputes an output other code wrote (fit_cells says its own way)
RECOMPUTE_HINT = "pass --overwrite to recompute it with this code"


def warn_other_code(stage: str, path: Path, info: dict[str, Any] | None) -> None:
    """Reuse compares configs and inputs, not code: say so when other code wrote the output."""
    differs = code_differs(info)
    if differs:
        log.warning(
            "%s: %s was written by other code (%s); reused as it is — %s",
            stage,
            path,
            differs,
            RECOMPUTE_HINT,
        )


def has_run_record(path: str | os.PathLike) -> bool:
    """Whether a stage finished an output at `path` (its run.json is there). A light reuse check
    (`Stage.reused`) without one has nothing to reuse: it leaves the inputs for the stage to checksum,
    once, rather than hashing them twice on a first run."""
    try:
        return (Path(path) / "run.json").is_file()
    except OSError:  # unreadable: the stage itself reports it, with the input it met first
        return False


def _mtime(path: Path) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return float("inf")


_SAID_NEWER: set[tuple[str, str]] = set()  # (output, checkpoint) pairs warned about in this process


@dataclass
class StageOutput:
    """A stage's output directory, identified by the fingerprint of its config and inputs."""

    stage: str
    config: Config
    path: Path | str
    inputs: list[dict[str, Any]] = field(default_factory=list)
    # Config keys that do not change results (paths, parallelism) and so do not enter the fingerprint.
    non_semantic: Sequence[str] = ("output", "num_workers")
    # the stage's start, for run.json's wall_seconds: stages do their work before `writing` (an
    # evaluation fits every model first), so a clock started there recorded 0.0 s for minutes of work
    began: Began = field(default_factory=Began.now, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint(config_fingerprint(self.config, self.non_semantic))

    def _fingerprint(self, config: str, *, with_config: bool = True) -> str:
        return sha256_json(
            {
                "stage": self.stage,
                "format": OUTPUT_FORMAT_VERSION,
                "config": config,
                "inputs": sorted(input_identity(i, with_config=with_config) for i in self.inputs),
            }
        )

    def fingerprints(
        self,
        *,
        with_config: bool = True,
        moved: relocation.Relocation | None = None,
        recorded: dict[str, Any] | None = None,
        written: dict[str, Any] | None = None,
    ) -> list[str]:
        """This result's fingerprint, then the ones an earlier biomask gave it (a config before the
        keys of `RETROFITTED_KEYS`; `with_config=False`: checkpoints by their weights alone, as before
        the evening of 2026-12-05), each with this config as the output's recorded one compares
        (`compared_config`)."""
        configs = config_fingerprints(self.compared_config(moved, recorded, written), self.non_semantic)
        return [self._fingerprint(c, with_config=with_config) for c in configs]

    def compared_config(
        self,
        moved: relocation.Relocation | None = None,
        recorded: dict[str, Any] | None = None,
        written: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """This config's data as the output's recorded config compares with it: a path inside a moved
        run folder as it was in the old one (`moved`), and a path spelled otherwise than recorded
        (`./runs/x` for `runs/x`, absolute, through a link) but naming the same file, as recorded.
        `recorded`: the output's run.json or in_progress.json, for the working directory it was
        written from (its `cwd`); `written`: the config it recorded (default: its config.yaml)."""
        data = self.config.model_dump(mode="json")
        data = moved.to_old(data) if moved else data
        old = relocation.recorded_config(self.path) if written is None else written
        if old is None:
            return data
        output, cwd = old.get("output"), (recorded or {}).get("cwd")
        base = relocation.written_from(
            self.path, output if isinstance(output, str) else None, cwd if isinstance(cwd, str) else None
        )
        return relocation.as_recorded(data, old, base)

    @property
    def legacy_fingerprint(self) -> str:
        """The fingerprint outputs written before the evening of 2026-12-05 hold: checkpoints by their weights alone."""
        return self.fingerprints(with_config=False)[0]

    def held_fingerprint(self, recorded: dict[str, Any] | None) -> str:
        """The fingerprint to compare with what an output records (`recorded`: its run.json, or an
        unfinished run's in_progress.json): the one it holds when an earlier biomask fingerprinted this
        same result otherwise, else this one. An output whose checkpoints counted by their weights
        alone is this result unless a checkpoint's config.json was written after it (retrained: its
        weights may be the same while what it embeds is not), which is then said."""
        held = (recorded or {}).get("fingerprint")
        if not isinstance(held, str):
            return self.fingerprint
        # a run folder moved since: its paths recorded there, the inputs' checksums as they are now
        places = [None, *filter(None, [self.moved()])]
        if any(held in self.fingerprints(moved=place, recorded=recorded) for place in places):
            return held
        checkpoints = [i for i in self.inputs if i.get(CONFIG_SHA256)]
        entries = (recorded or {}).get("inputs") or []
        if not checkpoints or any(isinstance(i, dict) and CONFIG_SHA256 in i for i in entries):
            return self.fingerprint
        if not any(
            held in self.fingerprints(with_config=False, moved=place, recorded=recorded) for place in places
        ):
            return self.fingerprint
        written = _mtime(Path(self.path) / "run.json")
        newer = [i for i in checkpoints if _mtime(Path(i["path"]) / "config.json") > written]
        if not newer:
            return held
        said = (str(self.path), newer[0]["path"])
        if said not in _SAID_NEWER:  # asked more than once per check (reuse, then the refusal's text)
            _SAID_NEWER.add(said)
            log.warning(
                "%s: %s was written before the checkpoint %s was (its config.json is newer, and that "
                "output did not record it): it may hold another model's results, so it is not reused",
                self.stage,
                self.path,
                newer[0]["path"],
            )
        return self.fingerprint

    def moved(self) -> relocation.Relocation | None:
        """How the run folder moved since the output was written (None: it did not, or no pipeline
        said which run folder this is)."""
        return relocation.of_output(self.path)

    def is_current(self, *, overwrite: bool = False) -> bool:
        """True if the output already holds this result; raises if it holds another one (unless overwrite)."""
        paths = [i["path"] for i in self.inputs if i.get("path")]
        moved = None if overwrite else self.moved()
        info = read_run_info(self.path)
        current = check_output(
            self.path,
            self.fingerprint if overwrite else self.held_fingerprint(info),
            overwrite=overwrite,
            # a refusal lists what changed, not the paths that moved with the run folder or are
            # spelled otherwise
            config=self.compared_config(moved, info),
            inputs=paths,
            stage=self.stage,
            non_semantic=self.non_semantic,
            input_records=self.inputs,
        )
        if current:
            log.info("%s: %s is up to date (same config and inputs); reusing it", self.stage, self.path)
            if moved:
                log.info("%s: written in %s, which has moved to %s", self.stage, moved.old, moved.new)
            warn_other_code(self.stage, self.path, read_run_info(self.path))
        return current

    @contextlib.contextmanager
    def writing(
        self, *, seeds: dict[str, int] | None = None, extra: dict[str, Any] | None = None
    ) -> Iterator[Path]:
        """A temporary directory that becomes the output, with config.yaml and run.json, on success."""
        assert isinstance(self.path, Path)
        started = self.began
        with atomic_output_dir(self.path) as tmp:
            yield tmp
            write_config(self.config, tmp)
            # the files this stage wrote: --overwrite refuses to delete anything else
            written = sorted({p.name for p in tmp.iterdir()} | {"config.yaml", "run.json"})
            tree = sorted({*file_tree(tmp), "config.yaml", "run.json"})
            write_run_info(
                tmp,
                stage=self.stage,
                fingerprint=self.fingerprint,
                inputs=self.inputs,
                seeds=seeds,
                extra={
                    **(extra or {}),
                    FILES_KEY: written,
                    FILE_TREE_KEY: tree,
                    OUTPUT_DIGESTS_KEY: output_digests(tmp),
                },
                started=started,
            )
