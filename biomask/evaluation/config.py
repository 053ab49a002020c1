"""The schema of `biomask evaluate` configs (see configs/evaluate/*.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from biomask.config import Config, Seed, SplitFractions

# The protocols a checkpoint is evaluated under, and what the tables call each. One list: the evaluate
# config, the report's targets and the tables read it; a protocol's method is its branch in
# biomask.evaluation.protocols.model_methods, which refuses a name it has no branch for.
PROTOCOLS = {"linear_probe": "linear probe", "mlp_probe": "MLP probe", "finetune": "fine-tune", "knn": "kNN"}
Protocol = Literal[tuple(PROTOCOLS)]  # type: ignore[valid-type]

Pooling = Literal["cls", "mean", "max", "concat", "mean_layers"]  # biomask.models.model.POOLINGS


class SplitSpec(SplitFractions):
    """How each seed's train / val / test split is made."""

    # resample: a fresh stratified split of all labelled records per seed (variance over splits,
    # like the "5 random 70/30 splits" protocol); store: the prep stage's fixed splits for every seed.
    mode: Literal["resample", "store"] = "resample"
    val: float = Field(0.1, gt=0.0, lt=1.0)
    test: float = Field(0.3, gt=0.0, lt=1.0)
    # records kept on one side of every resampled split (biomask/evaluation/groups.py): none;
    # shared_sequence — DNA records sharing a stretch of min_shared bases on either strand (duplicates,
    # overlapping windows, paralogues); batch — a cells store's batch_column (whole donors or runs held out)
    group: Literal["none", "shared_sequence", "batch"] = "none"
    min_shared: int = Field(32, ge=12, le=100_000)

    @model_validator(mode="after")
    def _group_needs_resample(self) -> SplitSpec:
        if self.group != "none" and self.mode == "store":
            raise ValueError(
                f"group={self.group} regroups resampled splits; the store's own splits (mode=store) are "
                "fixed: use mode=resample, or group=none"
            )
        return self


class BaselineSpec(Config):
    # kmer_lr: the k-mer length, or several: each seed keeps the k with the best validation MCC
    kmer_k: int | list[int] = Field(default_factory=lambda: [3, 4, 5, 6])
    pca_components: int = Field(50, ge=1)  # pca_lr

    @field_validator("kmer_k")
    @classmethod
    def _kmer_k(cls, value: int | list[int]) -> int | list[int]:
        ks = [value] if isinstance(value, int) else value
        if not ks or any(not 1 <= k <= 8 for k in ks):
            raise ValueError("kmer_k: k-mer lengths from 1 to 8 (an integer or a non-empty list)")
        return value


class FinetuneSpec(Config):
    """Linear-probe-then-fine-tune through the DeepSpeed trainer (biomask.evaluation.finetune).

    The head starts as the fitted linear probe on the frozen features (`init_head: probe`), so
    fine-tuning starts where the probe ends; each learning rate of the grid trains for `epochs`,
    keeps its best-on-validation weights, mixes their class probabilities with the probe's (`mix`),
    and the grid point with the best validation score (`select`) wins. When no grid point beats the
    probe on validation by more than the noise (`min_gain_se`), the probe's predictions are the
    result (and the report says so)."""

    # the budget per learning rate: passes over the training split and/or optimizer steps (whichever
    # ends first); neither set: 3 epochs
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)
    # ... and at least this many steps (None: no floor): on a small training split a few epochs are
    # a few dozen steps, too few for a fresh head (1,300 records, 3 epochs = 120 steps: the probe
    # kept in 3 of 3 seeds; 12 epochs: +0.06 MCC over it, docs/dna-models.md). max_steps still caps it
    min_budget_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    # encoder learning rate(s): a list is a grid, chosen on the validation split. [] with
    # fresh_head_lr: fresh-head runs only (the probe still the bar and the fallback)
    lr: float | list[float] = Field(default_factory=lambda: [1.0e-5, 3.0e-5, 1.0e-4])
    head_lr: float | None = Field(None, gt=0)  # None: the encoder's lr (the head starts trained)
    # layer-wise lr decay: block i of n trains at lr * decay^(n - i), the embeddings at lr * decay^n;
    # None: one lr. Kinds without blocks (the MLP kind) use one lr; transformer and cnn blocks decay.
    layer_decay: float | None = Field(None, gt=0, le=1)
    warmup: float = Field(0.1, ge=0, lt=1)  # share of the steps with a linear warm-up; then constant
    weight_decay: float = Field(0.01, ge=0)
    # dropout on the head's input (the standardised pooled features) while training. Off by default:
    # a probe head keeps the probe's own L2 penalty (its C), and dropout on top breaks a probe whose
    # weights cancel between correlated features (E. coli gene starts, mean pooling: training loss
    # 8 nats from the first step, fine-tuning never beat the probe on validation; without it,
    # fine-tuning beat the probe on test for 2 of 3 checkpoints: docs/dna-models.md)
    dropout: float = Field(0.0, ge=0, lt=1)
    eval_every: int | None = Field(None, ge=1)  # steps between validation passes; None: every epoch
    # the validation measure that chooses the step, α and learning rate: the mean log-loss (a proper
    # score: it moves with every record's probability, where MCC on a few hundred records moves by
    # whole records) or MCC
    select: Literal["log_loss", "mcc"] = "log_loss"
    # select: log_loss — fine-tuning replaces the probe only when its validation log-loss is lower by
    # more than this many standard errors of the per-record difference (the one-standard-error rule)
    # and its validation MCC is no lower; 0: any gain
    min_gain_se: float = Field(1.0, ge=0)
    patience: int = Field(3, ge=1)  # early stopping: validation passes without a new best score ...
    min_epochs: float = Field(1.0, ge=0)  # ... counted only after this many epochs
    init_head: Literal["probe", "random"] = "probe"  # random: the plain protocol (no probe start)
    # with init_head: probe, also these learning rates with a fresh (random) head on the raw pooled
    # features, in the same grid: validation chooses between starting from the probe and not, and
    # the probe stays the bar to beat. For probes that lean on features which barely vary between
    # records (mean_layers pooling), where training from the probe diverged at every lr (finetune.py)
    fresh_head_lr: float | list[float] | None = None
    # weights α of the fine-tuned model's class probabilities against the probe's, (1 - α) probe +
    # α fine-tuned, chosen on validation (output-space WiSE-FT); [1.0]: the fine-tuned model alone.
    # Used with init_head: probe, once fine-tuning has beaten the probe on validation.
    mix: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)
    # One rung of successive halving over the lr grid: every lr trains this many epochs (on the whole
    # budget's schedule), then only the best on validation (`select`) carries on, from where it
    # stopped, to the end of the budget. With 3 lrs, 1 of 3 epochs: 5 epochs of work instead of 9.
    # None: every lr trains the whole budget.
    screen_epochs: float | None = Field(None, gt=0)
    zero_stage: int = Field(0, ge=0, le=3)
    # Longest input (specials included) while fine-tuning: longer records follow `long_records` (DNA)
    # or keep their top genes (cells). None: what the checkpoint was pretrained on (a cnn: up to four
    # receptive fields, as its probe reads). Lower it to
    # fine-tune long-record models quickly on a CPU.
    max_length: int | None = Field(None, ge=3)

    @field_validator("mix")
    @classmethod
    def _mix(cls, value: list[float]) -> list[float]:
        if any(not 0.0 <= a <= 1.0 for a in value) or 1.0 not in value:
            raise ValueError("mix: weights in [0, 1], 1.0 (the fine-tuned model alone) among them")
        return value

    @field_validator("lr", "fresh_head_lr")
    @classmethod
    def _lr(cls, value: float | list[float] | None) -> float | list[float] | None:
        if value is None:
            return value
        grid = [value] if isinstance(value, float | int) else value
        if any(v <= 0 for v in grid):
            raise ValueError("lr: positive learning rates")
        return value

    @model_validator(mode="after")
    def _fresh_head_needs_a_probe(self) -> FinetuneSpec:
        if self.lr == [] and not self.fresh_head_lr:
            raise ValueError(
                "lr: [] leaves no run to fine-tune; give a learning rate, or fresh_head_lr for "
                "fresh-head runs only"
            )
        if self.fresh_head_lr == []:
            raise ValueError("fresh_head_lr: a positive learning rate or a non-empty list of them")
        if self.fresh_head_lr is not None and self.init_head == "random":
            raise ValueError(
                "fresh_head_lr adds fresh-head runs beside probe-started ones (init_head: probe); with "
                "init_head: random every run starts fresh at `lr`"
            )
        return self


# Keys that change no result: an evaluation written with other values of these is reused.
NON_SEMANTIC = ("output", "num_workers", "batch_size")


class EvaluateConfig(Config):
    store: str  # a labelled token store (DNA labelled set, or cells with a label column)
    output: str
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    splits: SplitSpec = SplitSpec()
    # kmer_lr, onehot_lr: DNA. pca_lr: PCA of the log-normalised expression + LR; hvg_lr: LR on every gene
    # of the store (its panel or vocabulary: the HVGs when prep selected them) — often the strongest.
    baselines: list[Literal["kmer_lr", "onehot_lr", "pca_lr", "hvg_lr"]] = Field(default_factory=list)
    baseline: BaselineSpec = BaselineSpec()
    # pretrained portable checkpoints to evaluate, by the name they get in the tables
    checkpoints: dict[str, str] = Field(default_factory=dict)
    # knn: a 15-nearest-neighbour vote on the frozen representation, plus Leiden clusters of it
    # scored against the labels (ARI, NMI) — for every model and the expression baselines (cells).
    protocols: list[Protocol] = Field(default_factory=lambda: ["linear_probe"])
    random_init: bool = True  # also evaluate the same architecture randomly initialised
    # one more row, "chosen on val (linear probe)": per seed, the checkpoint whose linear probe has the
    # best validation MCC (e.g. char, k-mer and BPE checkpoints: the tokenizer chosen on validation).
    # DNA checkpoints of another tokenizer than the store's read its sequences in their own tokens.
    select_on_val: bool = False
    # max: each feature's maximum over the content tokens (a motif anywhere; DNA and token-cell models).
    # concat: every content token's vector in order (position-aware; fixed-length DNA records only).
    # mean_layers: every block's mean, concatenated (n_layers × d_model; token models): the lower
    # blocks' short-motif detectors next to the last block's summary.
    # auto, or a list such as [mean, concat]: chosen per model and seed on the validation split (the
    # linear probe's validation MCC; ties: the earlier candidate) among the candidates that apply to
    # the model and the records — auto: mean, max, mean_layers, concat (DNA records of one length),
    # cls (not for the cnn kind, whose first position is no summary), so one config serves motif and position
    # tasks. Every protocol of that model and seed then uses it;
    # metrics.json and report.md say which was chosen.
    pooling: Pooling | Literal["auto"] | list[Pooling] = "mean"
    # DNA records longer than a model's input (what it was trained on; a cnn reads up to four receptive
    # fields whole), for the probes and fine-tuning:
    # window: embedded in windows of the model's length, pooled (mean or max of the window vectors;
    # concat: their concatenation); centre: the middle tokens; refuse: exit 2. Logged and reported.
    long_records: Literal["window", "centre", "refuse"] = "window"
    # Profile cell models (kinds mlp, panel_transformer) standardise each gene by the mean and sd of
    # their pretraining cells (checkpoint). data: by this store's own cells (every record, labels
    # unused, as the PCA baseline is fitted), the random init too: for cells of another experiment
    # than the pretraining corpus (docs/cell-models.md, "Standardising by the cells embedded").
    standardise: Literal["checkpoint", "data"] = "checkpoint"
    finetune: FinetuneSpec = FinetuneSpec()
    # pairs of checkpoint names (as given in `checkpoints`, or random-init) compared with a paired test
    # across evaluation seeds, e.g. [[r2mae, fixed15]]; checkpoints named scheme@seed (r2mae@0) are
    # paired as such, [[r2mae@0, fixed15@0]] (the study's report pools them over pretraining seeds)
    compare: list[list[str]] = Field(default_factory=list)
    # embedding batch size: the vectors agree to float rounding across sizes (~1e-6), not bit for bit,
    # and fine-tuning starts from a probe fitted on them (its losses move by ~1e-4)
    batch_size: int = Field(64, ge=1)
    # torch threads for embedding and fine-tuning, and how many logistic regressions (a C grid) fit
    # side by side. auto: $OMP_NUM_THREADS when set (a pipeline running stages side by side sets it
    # per stage), else every core this process may use — fine-tuning a 6,000-window motif task runs
    # about twice as fast on 2 threads as on 1. Results agree to float rounding, not bit for bit,
    # across thread counts (the regressions: bit for bit).
    num_workers: int | Literal["auto"] = "auto"
    # Where the frozen models embed the records for the probes: auto is the GPU when torch sees one,
    # else the CPU; or cpu, cuda, cuda:1. The probes fit on the CPU either way; fine-tuning trains
    # where pretraining does.
    device: str = "auto"

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        # a repeated seed repeats its split: counted as another replicate, it narrows every interval
        repeated = sorted({seed for seed in value if value.count(seed) > 1})
        if repeated:
            raise ValueError(
                f"seeds: {repeated} given more than once; each seed is one split, give each once"
            )
        return value

    @field_validator("num_workers")
    @classmethod
    def _positive_workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"num_workers: auto or a positive number of threads, not {value}")
        return value

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        if isinstance(self.pooling, list) and (
            not self.pooling or len(set(self.pooling)) != len(self.pooling)
        ):
            raise ValueError(f"pooling: a non-empty list of distinct poolings, not {self.pooling}")
        known = [*self.checkpoints, "random-init", "chosen on val"]
        for pair in self.compare:
            if len(pair) != 2:
                raise ValueError(f"compare entries are pairs of names, got {pair}")
            for name in pair:
                if name not in known:  # such a pair was left out of metrics.json without a word
                    seeded = sorted(k for k in self.checkpoints if k.split("@", 1)[0] == name)
                    hint = (
                        f"; checkpoints named {name}@seed are compared as such, e.g. {seeded[0]}"
                        if seeded
                        else ""
                    )
                    raise ValueError(
                        f"compare: {name!r} names no checkpoint (checkpoints: {', '.join(known)}){hint}"
                    )
        if not self.baselines and not self.checkpoints:
            raise ValueError("nothing to evaluate: list baselines and/or checkpoints")
        if self.checkpoints and not self.protocols:  # the run evaluated none of them, without a word
            raise ValueError(
                "protocols: empty, so none of the checkpoints would be evaluated; give one or more "
                f"({', '.join(PROTOCOLS)}), or leave checkpoints out for baselines only"
            )
        return self
