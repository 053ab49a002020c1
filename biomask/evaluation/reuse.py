"""Whether an evaluation's output already holds its result, decided without the stage's own imports
(scikit-learn, scanpy, torch): a pipeline rerun starts one evaluate process per evaluation, and most
of such a process's time went to imports when it had nothing to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from biomask.errors import BiomaskError
from biomask.evaluation.config import NON_SEMANTIC, EvaluateConfig
from biomask.provenance import input_entry, sha256_file
from biomask.stage import CONFIG_SHA256, StageOutput


def stage_inputs(cfg: EvaluateConfig) -> list[dict[str, Any]]:
    """What an evaluation's result depends on besides its config: the store's manifest (every shard's
    sha256) and each checkpoint's weights and config.json."""
    inputs = [input_entry("store", cfg.store)]
    for name, path in cfg.checkpoints.items():
        weights, config = Path(path) / "model.safetensors", Path(path) / "config.json"
        inputs.append(
            {
                "name": name,
                "path": str(path),
                "sha256": sha256_file(weights) if weights.exists() else None,
                CONFIG_SHA256: sha256_file(config) if config.is_file() else None,
            }
        )
    return inputs


def stage_output(cfg: EvaluateConfig) -> StageOutput:
    return StageOutput("evaluate", cfg, cfg.output, inputs=stage_inputs(cfg), non_semantic=NON_SEMANTIC)


def current(cfg: EvaluateConfig) -> Path | None:
    """The output when it holds this config's result on these inputs; None when the stage must decide
    (no output, another result, an unreadable input: the stage says what is wrong, in its own order)."""
    try:
        return Path(cfg.output) if stage_output(cfg).is_current() else None
    except (BiomaskError, OSError):
        return None
