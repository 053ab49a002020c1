"""The pretrained models' rows of the `biomask evaluate` table: every checkpoint under every protocol,
and the same architecture randomly initialised (seeded per evaluation seed) under the same protocols.

| protocol       | features                                     | classifier                                   |
|----------------|----------------------------------------------|----------------------------------------------|
| `linear_probe` | frozen embeddings, computed once per model   | standardised + the baselines' tuned logistic |
|                | (random init: once per seed)                 | regression (C chosen on val)                 |
| `mlp_probe`    | the same embeddings                          | one-hidden-layer MLP, early stopping on val  |
| `finetune`     | the whole encoder, trained                   | a linear head, through the DeepSpeed engine  |
|                |                                              | (biomask.training.finetune)                  |

Every checkpoint is loaded and checked before any method runs: its modality, tokenizer and (cells)
scheme must be the store's — otherwise a clear error and exit 2, nothing written.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from biomask.embedding.inference import embed_records, inference_max_length
from biomask.errors import InputError
from biomask.evaluation.config import EvaluateConfig
from biomask.evaluation.data import LabelledRecords
from biomask.evaluation.evaluate import Method
from biomask.evaluation.probes import linear_probe, mlp_probe
from biomask.models import MaskedEncoder, check_tokenizer, load_pretrained

log = logging.getLogger(__name__)

RANDOM_INIT = "random-init"
LABELS = {"linear_probe": "linear probe", "mlp_probe": "MLP probe", "finetune": "fine-tune"}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Tiny models on a busy machine run fastest on few threads (idle OpenMP threads spin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_checked(name: str, path: str, data: LabelledRecords) -> MaskedEncoder:
    """A checkpoint that fits the store: same modality, tokenizer and (cells) scheme."""
    model = load_pretrained(path)
    store = data.store
    if model.config.modality != data.modality:
        raise InputError(
            f"checkpoint {name} ({path}) is a {model.config.modality} model, but store {store.root} holds "
            f"{data.modality} records; evaluate it on a {model.config.modality} store"
        )
    check_tokenizer(model, store.root)
    scheme = store.manifest.get("scheme") if data.modality == "cells" else None
    if scheme is not None and model.config.scheme != scheme:
        raise InputError(
            f"checkpoint {name} ({path}) was trained on {model.config.scheme} cells, but store {store.root} is "
            f"{scheme}; prepare the evaluation set with tokenizer.scheme={model.config.scheme}"
        )
    return model


class Features:
    """Frozen embeddings of every labelled record: once per checkpoint, or once per seed (random init)."""

    def __init__(self, cfg: EvaluateConfig, data: LabelledRecords, records: Callable[[], list[dict]]) -> None:
        self.cfg, self.data, self.records = cfg, data, records
        self.cache: dict[Any, np.ndarray] = {}

    def of(
        self, model_for_seed: Callable[[int], MaskedEncoder], seed: int | None, max_length: int
    ) -> np.ndarray:
        if seed not in self.cache:
            model = model_for_seed(seed if seed is not None else 0)
            with torch_threads(self.cfg.num_workers):
                self.cache[seed] = embed_records(
                    model,
                    self.records(),
                    pooling=self.cfg.pooling,
                    batch_size=self.cfg.batch_size,
                    max_length=max_length,
                )
        return self.cache[seed]


def random_init(template: MaskedEncoder, seed: int) -> MaskedEncoder:
    """The template's architecture with fresh weights drawn from `seed` (its RNG only)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MaskedEncoder(template.config)
    return model.eval()


def model_methods(cfg: EvaluateConfig, data: LabelledRecords) -> list[Method]:
    """Methods for every checkpoint × protocol (+ random-init × protocol); see the module docstring."""
    from biomask.training.finetune import FinetuneSettings, finetune

    models = {name: load_checked(name, path, data) for name, path in cfg.checkpoints.items()}
    if RANDOM_INIT in models:
        raise InputError(f"checkpoint name {RANDOM_INIT!r} is reserved for the randomly initialised model")
    cache: list[list[dict]] = []

    def records() -> list[dict]:
        if not cache:
            cache.append([data.record(i) for i in range(len(data))])
        return cache[0]

    if cfg.pooling == "concat":
        lengths = {len(r["tokens"]) for r in records()}
        if len(lengths) > 1:
            raise InputError(
                f"pooling concat needs records of one length (fixed-length sequences), but store "
                f"{data.store.root} has {min(lengths)} to {max(lengths)} tokens per record; use pooling=mean"
            )

    n_classes = len(data.label_names)
    settings = FinetuneSettings(**cfg.finetune.model_dump(exclude={"max_length"}))
    methods: list[Method] = []

    def add(
        name: str, model_for_seed: Callable[[int], MaskedEncoder], per_seed: bool, max_length: int
    ) -> None:
        features = Features(cfg, data, records)
        for protocol in cfg.protocols:
            if protocol in ("linear_probe", "mlp_probe"):

                def predict(data, train, val, test, seed, protocol=protocol):
                    x = features.of(model_for_seed, seed if per_seed else None, max_length)
                    with torch_threads(1):
                        if protocol == "linear_probe":
                            return linear_probe(x, data.labels, train, val, test, seed)
                        return mlp_probe(x, data.labels, train, val, test, seed, n_classes=n_classes)

            else:

                def predict(data, train, val, test, seed):
                    encoder = copy.deepcopy(model_for_seed(seed))  # every seed starts from the same weights
                    with torch_threads(cfg.num_workers):
                        result = finetune(
                            encoder,
                            records(),
                            data.labels,
                            (train, val, test),
                            n_classes=n_classes,
                            settings=settings,
                            seed=seed,
                            max_length=min(max_length, cfg.finetune.max_length or max_length),
                            pooling=cfg.pooling,
                        )
                    return result.test_predictions

            methods.append(Method(f"{name} ({LABELS[protocol]})", name, protocol, predict))

    for name, model in models.items():
        add(name, lambda seed, model=model: model, False, inference_max_length(model))
    if cfg.random_init and models:
        template = next(iter(models.values()))
        others = {n for n, m in models.items() if m.config != template.config}
        if others:
            log.warning(
                "random-init uses the architecture of %s; %s differ",
                next(iter(models)),
                ", ".join(sorted(others)),
            )
        add(RANDOM_INIT, lambda seed: random_init(template, seed), True, inference_max_length(template))
    log.info(
        "evaluate: %d model methods (%s) on %d records",
        len(methods),
        ", ".join(sorted({Path(p).as_posix() for p in cfg.checkpoints.values()})),
        len(data),
    )
    return methods
