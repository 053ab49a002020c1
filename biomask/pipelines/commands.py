"""The stage commands a pipeline can run, and what the pipeline needs to know about each.

Every stage follows the contract in DEVELOPERS.md ("Stage commands"): `biomask <command> --config FILE
[key=value ...] [--overwrite]`, an `output` key, reuse by fingerprint, exit 2 on bad input. The
pipeline machinery needs two more facts per command, registered here:

- `schema`: the config class ("module:Class"). With it, every stage's config (file + overrides) is
  validated before anything runs or is submitted. Without it only the file's existence is checked.
- `training`: runs as several srun tasks (one per GPU or CPU slot), gets `--signal=B:USR1@margin` and
  `--requeue`, and exits 75 after checkpointing so its job script requeues it.

Extension point: a stage that lands (issues 3-5) sets its `schema` here; the command itself is found
in the CLI (`biomask.cli.build_parser`), so a command the CLI does not have yet is reported as such.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from dataclasses import dataclass
from functools import cache

from biomask.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageCommand:
    name: str  # as typed after `biomask`, e.g. "prep dna"
    schema: str | None = None  # "module:Class" of its config
    training: bool = False

    @property
    def argv(self) -> list[str]:
        return self.name.split()

    def config_class(self) -> type[Config] | None:
        """The config class, or None when none is registered or it cannot be imported (then only the
        config file's existence is checked before running)."""
        if self.schema is None:
            return None
        module, _, cls = self.schema.partition(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as exc:
            log.warning(
                "%s: config schema %s not found (%s); stage configs are checked when they run",
                self.name,
                self.schema,
                exc,
            )
            return None


# The stage commands of the contract. Checkpointing stages exit 75 on SIGUSR1/SIGTERM.
COMMANDS: dict[str, StageCommand] = {
    "prep dna": StageCommand("prep dna", schema="biomask.dna.config:DNAPrepConfig"),
    "prep cells": StageCommand("prep cells", schema="biomask.cells.config:CellsPrepConfig"),
    "pretrain": StageCommand("pretrain", schema="biomask.training.config:PretrainConfig", training=True),
    "evaluate": StageCommand("evaluate", schema="biomask.evaluation.config:EvaluateConfig"),
    "embed": StageCommand("embed", schema="biomask.embedding.config:EmbedConfig"),
    "report": StageCommand("report", schema="biomask.report.config:ReportConfig"),
    "theory": StageCommand("theory", schema="biomask.theory.config:TheoryConfig"),
}

# Exit code of a training stage that checkpointed on SIGUSR1/SIGTERM and asks to be requeued.
EXIT_REQUEUE = 75


@cache
def cli_commands() -> frozenset[str]:
    """The commands the installed CLI has, as "prep dna", "pretrain", ... (walks the argparse tree)."""
    from biomask.cli import build_parser

    found: set[str] = set()

    def walk(parser: argparse.ArgumentParser, prefix: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found.add(" ".join((*prefix, name)))
                    walk(child, (*prefix, name))

    walk(build_parser(), ())
    return frozenset(found)


def lookup(name: str) -> StageCommand | None:
    """The registered stage command of that name (whitespace-normalised), or None."""
    return COMMANDS.get(" ".join(name.split()))


def is_available(command: StageCommand) -> bool:
    return command.name in cli_commands()
