"""The schema of `biomask pretrain` configs (annotated examples: configs/pretrain/*.yaml)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from biomask.config import Config, Seed
from biomask.masking.config import MaskingConfig
from biomask.models.config import KIND_PRESETS, PRESETS, ModelKind


class DataConfig(Config):
    store: str  # a token store written by `biomask prep dna` or `biomask prep cells`
    train_split: str = "train"
    eval_split: str = "val"
    # Token models (transformer, cnn): longest input, specials included; longer records are cropped.
    # None: the model's max_len. The expression models (mlp, panel_transformer) read every panel gene:
    # refused for them, as is crop.
    max_length: int | None = Field(None, ge=3)
    # Training crops of longer records: a random window (DNA, rank: a random start; binned / panel
    # cells: a random subset of genes) drawn from (seed, epoch, record), or the first tokens.
    crop: Literal["random", "start"] = "random"
    verify: bool = True  # check every shard's sha256 before training (cheap next to training)


class ModelConfig(Config):
    # transformer: tokens through a transformer (DNA; cells as gene tokens). mlp: the expression-profile
    # masked autoencoder (cells only; a panel store: every gene, zeros included) — the cell model whose
    # embeddings carry cell identity (README: "Single-cell models").
    # cnn: a dilated convolutional DNA encoder (biomask.models.cnn; presets tiny, small; MLM only).
    # panel_transformer: a transformer over panel genes whose cell token is the embedding (cells;
    # biomask.models.panel_transformer).
    kind: ModelKind = "transformer"  # biomask.models.config.ModelKind
    preset: Literal["tiny", "small", "base", "large", "1b", "custom"] = "tiny"
    # Sizes; None: the preset's. With preset custom, all four must be given.
    d_model: int | None = Field(None, ge=8)
    n_layers: int | None = Field(None, ge=1)
    n_heads: int | None = Field(None, ge=1)
    d_ff: int | None = Field(None, ge=8)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    max_len: int = Field(1026, ge=3)  # learned positions (DNA, rank cells), [CLS] and [SEP] included
    # Cells: how a gene's value enters the model. auto: bins for binned, mlp for panel, none for rank.
    value_embedding: Literal["auto", "none", "bins", "mlp"] = "auto"
    # kind transformer with masking.corruption.kind mae only (refused otherwise): depth of the light decoder
    decoder_layers: int = Field(1, ge=1)
    # recompute each transformer block in the backward pass (less activation memory, one more forward
    # pass of each block); kinds transformer and panel_transformer (mlp and cnn have no blocks to recompute)
    activation_checkpointing: bool = False
    # kind mlp: show the model which genes are hidden (false: the ablation without that knowledge;
    # refused for other kinds)
    mask_indicator: bool = True
    # kind mlp: also give the encoder the share of the panel that is hidden in this cell (the mask
    # ratio it was trained at, one number; at embedding time the share unmeasured). With
    # mask_indicator the ratio is already a sum of the inputs; the switch matters without it.
    # Whether it helps R²MAE: configs/pipelines/cells-ratio-knowledge.yaml.
    ratio_input: bool = False
    # kind mlp: the cell embedding scaled to unit length (cosine geometry for kNN graphs, Leiden and
    # UMAP; the decoder still reads the raw latent). auto: l2 for kind mlp. Measured on pbmc68k_reduced
    # (README, cell models): Leiden ARI 0.457 -> 0.499 (PCA 0.525); the probe unchanged within noise.
    embed_norm: Literal["auto", "none", "l2"] = "auto"
    # kind mlp: mae (masked genes hidden as 0 with an indicator; MSE on the masked genes) or scmae
    # (masked genes swapped with another cell's values; reconstruct every gene and tell which were
    # swapped: scMAE, Fang et al. 2024). Measured: README, cell models.
    objective: Literal["mae", "scmae"] = "mae"
    # kind mlp / panel_transformer: mse on the standardised log1p values, or the masked genes' raw
    # counts under a Poisson or negative binomial likelihood with the library size (needs a panel
    # store prepared from counts: counts.mode require or from_log1p). Token models: refused.
    loss: Literal["mse", "poisson", "nb"] = "mse"
    # kind panel_transformer: visible genes read per cell in training (a random subset; 0: all).
    max_visible: int = Field(64, ge=0)
    # kind mlp: weight of a variance-covariance penalty on each batch's latents (VICReg's two terms,
    # Bardes et al. 2022: every latent dimension's batch sd pushed to >= 1, their covariances to 0),
    # added to the reconstruction loss. Without it the latent concentrates on a few directions
    # (participation ratio ~3 of 64 on pbmc3k); measured, not adopted: docs/cell-models.md.
    decorrelation: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    # kind mlp: the decoder also reads each cell's batch (one-hot; scVI's covariate), so the latent
    # need not carry what only tells the batches apart; the encoder, and so the embedding, never sees
    # it, and embeds cells of any batch. Needs a store prepared with batch_column.
    batch_covariate: bool = False
    # kind mlp: visible genes' standardised values scaled by (panel genes / visible genes) in the
    # encoder's input, as inverted dropout scales kept units: the encoder trains on 10-50 % of a
    # profile and embeds all of it, and unscaled its first layer sees a signal 2-10x weaker in
    # training than when it embeds. none: unscaled (as before the key existed).
    input_scale: Literal["none", "visible"] = "none"
    # Continue from a portable checkpoint (its architecture is used; the tokenizer must match the store).
    init_from: str | None = None

    def resolved_embed_norm(self) -> str:
        """`embed_norm` with auto resolved: l2 for the profile autoencoder, none otherwise."""
        if self.embed_norm == "auto":
            return "l2" if self.kind == "mlp" else "none"
        return self.embed_norm

    def sizes(self) -> dict[str, int]:
        presets = KIND_PRESETS.get(self.kind, PRESETS)
        base = dict(presets.get(self.preset, {}))
        if self.kind in KIND_PRESETS:
            base.setdefault("n_heads", 1)  # unused by the profile autoencoder and the CNN
        given = {
            k: v
            for k, v in {
                "d_model": self.d_model,
                "n_layers": self.n_layers,
                "n_heads": self.n_heads,
                "d_ff": self.d_ff,
            }.items()
            if v is not None
        }
        return {**base, **given}

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        sizes = self.sizes()
        missing = [k for k in ("d_model", "n_layers", "n_heads", "d_ff") if k not in sizes]
        own = KIND_PRESETS.get(self.kind)
        if own is not None and self.preset not in (*own, "custom"):
            raise ValueError(
                f"model.kind {self.kind} has presets {', '.join(own)} (or custom), not {self.preset}"
            )
        if self.ratio_input and self.kind != "mlp":
            raise ValueError(f"model.ratio_input is for model.kind mlp, not {self.kind}")
        if self.decorrelation and self.kind != "mlp":
            raise ValueError(f"model.decorrelation is for model.kind mlp, not {self.kind}")
        if self.input_scale != "none" and self.kind != "mlp":
            raise ValueError(f"model.input_scale is for model.kind mlp, not {self.kind}")
        if self.batch_covariate and self.kind != "mlp":
            raise ValueError(f"model.batch_covariate is for model.kind mlp, not {self.kind}")
        if self.activation_checkpointing and self.kind in ("mlp", "cnn"):  # ran, changing nothing
            raise ValueError(
                f"model.activation_checkpointing recomputes transformer blocks (kinds transformer, "
                f"panel_transformer); model.kind {self.kind} has none"
            )
        if self.embed_norm == "l2" and self.kind != "mlp":
            raise ValueError(f"model.embed_norm l2 is for model.kind mlp, not {self.kind}")
        if self.objective == "scmae" and (self.kind != "mlp" or self.loss != "mse"):
            raise ValueError(
                f"model.objective scmae is for model.kind mlp with model.loss mse, not {self.kind} with "
                f"{self.loss} (it reconstructs standardised values)"
            )
        if missing:
            raise ValueError(f"model.preset custom needs {', '.join('model.' + k for k in missing)}")
        if sizes["d_model"] % sizes["n_heads"]:
            raise ValueError(f"model.d_model ({sizes['d_model']}) must be a multiple of model.n_heads")
        return self


class OptimConfig(Config):
    lr: float = Field(1e-3, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.01, ge=0.0)
    # Adam's two decay rates, each in [0, 1)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.98], min_length=2, max_length=2)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0: no clipping
    # torch's fused AdamW kernel (one launch for every parameter instead of a few per tensor): auto is
    # fused on a GPU, torch's default (foreach) on CPU. It changes results by float rounding only.
    fused: Literal["auto"] | bool = "auto"

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: list[float]) -> list[float]:
        if not all(0.0 <= b < 1.0 for b in value):  # torch's AdamW refuses others at the first step
            raise ValueError("optim.betas: each in [0, 1), as Adam's decay rates are")
        return value


class TrainConfig(Config):
    steps: int = Field(1000, ge=1)  # optimizer steps
    micro_batch_size: int = Field(16, ge=1)  # per rank and forward pass
    grad_accum: int = Field(1, ge=1)
    seed: Seed = 0
    # auto: bf16 on GPU, fp32 on CPU. bf16: torch autocast over fp32 weights (fastest, measured);
    # bf16-weights: DeepSpeed's bf16 mode, bf16 weights and gradients (less memory; token models only,
    # the profile models read fp32 expression). ds_config.py says more.
    precision: Literal["auto", "fp32", "bf16", "bf16-weights"] = "auto"
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)  # 0: only at the end
    # Held-out masked loss on a grid of ratios and its mean (the R²MAE study's quality score).
    eval_ratios: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9], min_length=1)
    eval_batches: int = Field(8, ge=1)  # per rank and ratio
    checkpoint_every: int = Field(500, ge=1)
    # Resume checkpoints kept (checkpoints/stepNNNNNNNN, the newest): older ones are deleted as new ones
    # land, so a long run's disk stays bounded; two, so a damaged newest falls back to the one before.
    keep_last: int = Field(2, ge=1)
    progress: bool = True  # tqdm bar on rank 0
    # torch.compile the model (DeepSpeed's engine.compile: the module compiled in place, so checkpoints
    # and the portable model are unchanged). Fuses the elementwise work around the matmuls on a GPU;
    # the first steps pay for compilation (tens of seconds), and results change by float rounding only.
    compile: bool = False
    # Where the metrics go besides metrics.jsonl, like the HF Trainer's report_to: tensorboard, wandb,
    # mlflow (the last two are optional: pip install wandb / mlflow). []: metrics.jsonl only.
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"]
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if any(not 0.0 < r < 1.0 for r in self.eval_ratios):
            raise ValueError(f"train.eval_ratios must lie strictly between 0 and 1 (got {self.eval_ratios})")
        return self


class DeepSpeedConfig(Config):
    # Picks configs/deepspeed/zero<stage>.json. auto: 0 for one process (nothing to partition; on one
    # H100 ZeRO-2's gradient buckets cost 13-17 % of the step, README "Throughput"), 2 across processes.
    stage: Literal["auto", 0, 1, 2, 3] = "auto"

    def resolved_stage(self, world_size: int) -> int:
        if self.stage == "auto":
            return 0 if world_size == 1 else 2
        return self.stage

    config: str | None = None  # your own DeepSpeed JSON instead ("auto" values are filled from here)
    # Several processes: how long one waits for the others (a collective, the start-up rendezvous)
    # before it gives up on them. A stopped or hung process otherwise holds every other one this long
    # (torch's default is 30 minutes); signals cannot checkpoint a process blocked in a collective.
    timeout_minutes: float = Field(30.0, gt=0, allow_inf_nan=False)
    offload_optimizer: bool = False  # ZeRO 1-3: optimizer state in CPU memory
    # Deep-merged into the JSON, e.g. deepspeed.overrides.zero_optimization.reduce_bucket_size=1e7
    overrides: dict[str, Any] = Field(default_factory=dict)


class PretrainConfig(Config):
    data: DataConfig
    output: str
    model: ModelConfig = ModelConfig()
    masking: MaskingConfig = MaskingConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()


# Keys that change no weight: they may differ between an interrupted run and its resumption.
NON_SEMANTIC = (
    "output",
    "data.store",  # the store enters the fingerprint by its manifest's sha256, not its path
    "data.verify",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_last",
    "train.progress",
    "train.report_to",
    "deepspeed.timeout_minutes",
)
