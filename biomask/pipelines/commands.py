"""The stage commands a pipeline can run, and what the pipeline needs to know about each.

Every stage follows the contract in DEVELOPERS.md ("Stage commands"): `biomask <command> --config FILE
[key=value ...] [--overwrite]`, an `output` key, reuse by fingerprint, exit 2 on bad input. The
pipeline machinery needs two more facts per command, both in the stage registry (`biomask.stages`):

- `schema`: the config class ("module:Class"). With it, every stage's config (file + overrides) is
  validated before anything runs or is submitted. Without it only the file's existence is checked.
- `training`: runs as several srun tasks (one per GPU or CPU slot), gets `--signal=B:USR1@margin` and
  `--requeue`, and exits 75 (`biomask.errors.REQUEUE_EXIT_CODE`) after checkpointing so its job
  script requeues it.

Extension point: a stage joins with its entry in `biomask.stages.STAGES`, which the CLI builds its
stage commands from; a registered command without a runner is reported as not available yet.
"""

from __future__ import annotations

from biomask.stages import STAGES, Stage

# A pipeline's stage command is a registered stage.
StageCommand = Stage

# The stage commands of the contract: the registry itself.
COMMANDS: dict[str, StageCommand] = STAGES


def lookup(name: str) -> StageCommand | None:
    """The registered stage command of that name (whitespace-normalised), or None."""
    return COMMANDS.get(" ".join(name.split()))


def is_available(command: StageCommand) -> bool:
    """Whether this biomask can run it: the CLI has every registered stage that has a runner."""
    return command.available
