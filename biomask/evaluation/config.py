"""The schema of `biomask evaluate` configs (see configs/evaluate/*.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from biomask.config import Config

BASELINES = ("kmer_lr", "onehot_lr", "pca_lr")
MODEL_PROTOCOLS = ("linear_probe", "mlp_probe", "finetune")


class SplitSpec(Config):
    """How each seed's train / val / test split is made."""

    # resample: a fresh stratified split of all labelled records per seed (variance over splits,
    # like the "5 random 70/30 splits" protocol); store: the prep stage's fixed splits for every seed.
    mode: Literal["resample", "store"] = "resample"
    val: float = Field(0.1, gt=0.0, lt=1.0)
    test: float = Field(0.3, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _fractions(self) -> SplitSpec:
        if self.val + self.test >= 1.0:
            raise ValueError("val + test must leave something for train")
        return self


class BaselineSpec(Config):
    kmer_k: int = Field(6, ge=1, le=8)  # kmer_lr: k-mer length
    pca_components: int = Field(50, ge=1)  # pca_lr


class FinetuneSpec(Config):
    """Full fine-tuning with a classification head (through the DeepSpeed trainer)."""

    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    head_lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    eval_every: int = Field(25, ge=1)
    patience: int = Field(4, ge=1)  # early stopping: evaluations without validation improvement
    zero_stage: int = Field(0, ge=0, le=3)
    # Longest input (specials included) while fine-tuning: longer records are cut as for embeddings
    # (cells: their top genes). None: what the checkpoint was pretrained on. Lower it to fine-tune
    # long-record models quickly on a CPU.
    max_length: int | None = Field(None, ge=3)


class EvaluateConfig(Config):
    store: str  # a labelled token store (DNA labelled set, or cells with a label column)
    output: str
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    splits: SplitSpec = SplitSpec()
    baselines: list[Literal["kmer_lr", "onehot_lr", "pca_lr"]] = Field(default_factory=list)
    baseline: BaselineSpec = BaselineSpec()
    # pretrained portable checkpoints to evaluate, by the name they get in the tables
    checkpoints: dict[str, str] = Field(default_factory=dict)
    protocols: list[Literal["linear_probe", "mlp_probe", "finetune"]] = Field(
        default_factory=lambda: ["linear_probe"]
    )
    random_init: bool = True  # also evaluate the same architecture randomly initialised
    # concat: every content token's vector in order (position-aware; fixed-length records only)
    pooling: Literal["cls", "mean", "concat"] = "mean"
    finetune: FinetuneSpec = FinetuneSpec()
    # pairs of checkpoint names compared with a paired test across seeds, e.g. [[r2mae, fixed15]]
    compare: list[list[str]] = Field(default_factory=list)
    batch_size: int = Field(64, ge=1)  # embedding batch size (results do not depend on it)
    num_workers: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        for pair in self.compare:
            if len(pair) != 2:
                raise ValueError(f"compare entries are pairs of names, got {pair}")
        if not self.baselines and not self.checkpoints:
            raise ValueError("nothing to evaluate: list baselines and/or checkpoints")
        return self
