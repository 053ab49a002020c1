"""The stage registry: every config-driven stage command, once.

A stage is `biomask <name> --config FILE [key=value ...] [--overwrite]` (the contract in DEVELOPERS.md,
"Stage commands"). Its entry says where its config schema and its runner live, as "module:attribute"
strings so that nothing is imported until a stage is used. The CLI (`biomask.cli`) builds each stage's
`--config` / `--print-config` arguments and runs it from here; the pipelines (`biomask.pipelines`)
validate stage configs and decide how to launch a stage from here. A new stage joins both with one
entry in `STAGES` (plus its subcommand's help text in `biomask/cli.py`).

This module is low in the import graph: it imports nothing from biomask (the references are strings).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


def load_ref(ref: str) -> Any:
    """The object a "module:attribute" reference names (imports the module)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Stage:
    name: str  # as typed after `biomask`, e.g. "prep dna"
    schema: str | None = None  # "module:Class" of its config (a biomask.config.Config)
    runner: str | None = None  # "module:function", called as function(cfg, overwrite=..., **extra)
    # Training stages run as several srun tasks (one per GPU or CPU slot), get `--signal=B:USR1@margin`
    # and `--requeue`, and exit 75 (biomask.errors.REQUEUE_EXIT_CODE) after checkpointing on a signal.
    training: bool = False
    # "module:NAME" of the config keys that change no result (paths, workers, logging): an output
    # written with other values of these is reused. Default: the output path and worker count.
    non_semantic: str | None = None
    # "module:function": function(cfg) -> the output when it already holds this result, decided
    # without the runner's imports (None: the runner decides). A pipeline rerun starts one process
    # per task, and for a current output those imports were most of its time.
    reused: str | None = None

    @property
    def argv(self) -> list[str]:
        return self.name.split()

    @property
    def available(self) -> bool:
        """Whether this version of biomask can run it (a stage registered ahead of its code has no runner)."""
        return self.runner is not None

    def config_class(self) -> type | None:
        """The config class, or None when none is registered or it cannot be imported (then only the
        config file's existence is checked before running)."""
        if self.schema is None:
            return None
        try:
            return load_ref(self.schema)
        except (ImportError, AttributeError) as exc:
            log.warning(
                "%s: config schema %s not found (%s); stage configs are checked when they run",
                self.name,
                self.schema,
                exc,
            )
            return None

    def non_semantic_keys(self) -> tuple[str, ...]:
        return tuple(load_ref(self.non_semantic)) if self.non_semantic else ("output", "num_workers")


def _stages(*stages: Stage) -> dict[str, Stage]:
    return {s.name: s for s in stages}


STAGES: dict[str, Stage] = _stages(
    Stage(
        "prep dna",
        "biomask.dna.config:DNAPrepConfig",
        "biomask.dna.prep:prep_dna",
        reused="biomask.dna.reuse:current",
    ),
    Stage(
        "prep cells",
        "biomask.cells.config:CellsPrepConfig",
        "biomask.cells.prep:prep_cells",
        non_semantic="biomask.cells.config:NON_SEMANTIC",
        reused="biomask.cells.reuse:current",
    ),
    Stage(
        "pretrain",
        "biomask.training.config:PretrainConfig",
        "biomask.training.trainer:pretrain",
        training=True,
        non_semantic="biomask.training.config:NON_SEMANTIC",
    ),
    Stage(
        "evaluate",
        "biomask.evaluation.config:EvaluateConfig",
        "biomask.evaluation.evaluate:evaluate",
        non_semantic="biomask.evaluation.config:NON_SEMANTIC",
        reused="biomask.evaluation.reuse:current",
    ),
    Stage(
        "embed",
        "biomask.embedding.config:EmbedConfig",
        "biomask.embedding.stage:run_embed",
        non_semantic="biomask.embedding.config:NON_SEMANTIC",
        reused="biomask.embedding.reuse:current",
    ),
    Stage(
        "report",
        "biomask.report.config:ReportConfig",
        "biomask.report.report:make_report",
        reused="biomask.report.reuse:current",
    ),
    Stage("theory", "biomask.theory.config:TheoryConfig", "biomask.theory:run_theory"),
)


def stage_whose_keys(keys: set[str], besides: str | None = None) -> str | None:
    """The first stage (other than `besides`) whose config schema has every one of `keys`: what a
    config file given to the wrong command was written for."""
    for name, stage in STAGES.items():
        if name != besides and stage.schema and keys <= set(load_ref(stage.schema).model_fields):
            return name
    return None
