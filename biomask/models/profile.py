"""The expression-profile masked autoencoder (scMAE-like): a cell is its whole expression vector.

    model = ProfileAutoencoder(EncoderConfig(vocab_size=2005, modality="cells", kind="mlp", ...))
    out = model(masked_batch)                 # {"loss", "n_masked", "n_correct"}: MSE on the masked genes
    vectors = model.embed(batch)              # (B, d_model): the encoder's latent on the full profile

Why this and not the gene-token transformer for cell embeddings: a masked gene's expression bin is
largely predictable from the gene's identity, so token models learn little about the cell, and a mean
over gene tokens mostly says which genes are expressed. Here the masked profile goes through one
bottleneck vector, and every masked gene must be reconstructed from it: the bottleneck has to carry
what makes this cell differ from others (measured: `shared/reference/cell-models.md`).

The input is a dense vector over the vocabulary (gene id = column; the specials' columns stay zero),
built from the collated batch by scatter, so gene order in a record and padding do not matter. Values
are the store's log1p(CP10k) values, standardised per gene with statistics of the training split
(buffers `gene_mean` / `gene_std`, saved in the checkpoint) and clipped to ±10 like `sc.pp.scale`.
A masked gene enters as 0 (the gene's mean) and its mask indicator as 1, so the model knows what is
hidden — the masking schemes (R²MAE, fixed, schedules, discrete sets) choose which genes. With
`config.objective` scmae (scMAE's) a masked gene carries another cell's value instead, unmarked; every
gene is reconstructed and a second head detects the swapped ones (`_scmae`).

With `config.loss` poisson or nb the decoder's outputs are log rates per `target_sum` counts and the
loss is the count likelihood of the masked genes' raw counts given the library size (scVI-style;
`biomask.models.likelihood`); the input stays the standardised log1p profile. The decoder's output
bias starts at each gene's mean rate, so training starts from the reference predictor.

`config.n_layers` counts the encoder's linear layers (the last one projects to the latent,
`d_model`); the hidden ones are `d_ff` wide with GELU. The decoder mirrors it. `layer` in `features`
indexes [standardised input, hidden 1, ..., latent] like a Python list (-1: the latent). With
`config.embed_norm` l2 (pretrain's default for this kind) the latent is returned at unit length:
its norm says mostly how far a cell is from the mean profile, which a kNN graph should not mix
with its type (README, cell models; the table: docs/cell-models.md); the decoder reads the raw latent.
With `config.batches` (pretrain's `model.batch_covariate`) the decoder also reads each cell's batch
as a one-hot code (scVI's covariate): what only tells batches apart need not pass the bottleneck.
The encoder never reads it, so a cell's embedding does not depend on its batch label.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from biomask.cells.tokenize import SCHEMES
from biomask.errors import InputError
from biomask.models import likelihood
from biomask.models.config import EncoderConfig
from biomask.vocab import NUM_SPECIAL

CLIP = 10.0  # standardised values beyond ±10 sd are clipped (scanpy's sc.pp.scale(max_value=10))


def _stack(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


# A gene's standard deviation is never taken below this (a gene constant in training), so no
# standardised value divides by zero.
STD_FLOOR = 1e-3


class ProfileModel(nn.Module):
    """What the cell models over a gene panel share (kinds mlp and panel_transformer): the per-gene
    standardisation, the dense view of a batch, which genes are unmeasured, and the reconstruction
    loss (MSE, or a count likelihood with its reference predictor). A subclass builds its networks
    and names the output bias a count loss starts at the reference rates (`output_bias`)."""

    family = "profile"  # biomask.models.kinds.FAMILIES
    # the least a loaded buffer may hold (load_pretrained refuses less): a profile is divided by gene_std
    floors = {"gene_std": STD_FLOOR}
    poolings = ("mean", "cls")  # one vector per cell: both name it (evaluate's pooling lists skip others)

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        if cfg.modality != "cells":
            raise ValueError(f"model kind {cfg.kind!r} reads expression: cells stores only")
        self.config = cfg
        n_genes = cfg.vocab_size
        self.register_buffer("gene_mean", torch.zeros(n_genes))
        self.register_buffer("gene_std", torch.ones(n_genes))
        if cfg.loss != "mse":  # the reference predictor: each gene's mean rate (and NB dispersion)
            self.register_buffer("reference_log_rate", torch.zeros(n_genes))
            self.register_buffer("reference_log_theta", torch.zeros(n_genes))
        if cfg.loss == "nb":
            self.log_theta = nn.Parameter(torch.zeros(n_genes))

    def output_bias(self) -> torch.Tensor:
        """The (vocab_size,) bias of the predictions (a count loss starts it at the reference rates)."""
        raise NotImplementedError

    def num_parameters(self, *, embeddings: bool = True) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def set_gene_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Per-gene standardisation (of the training split; see `gene_statistics`)."""
        self.gene_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.gene_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp(min=STD_FLOOR))

    @torch.no_grad()
    def init_from_data(self, records) -> None:
        """Statistics of the training split: the standardisation and, for a count loss, the reference
        rates and dispersions (also the starting point of the output bias and the dispersion)."""
        panel = self._complete_profile()
        self.set_gene_stats(*gene_statistics(records, self.config.vocab_size, panel=panel))
        if self.config.loss != "mse":
            p, theta = likelihood.count_statistics(records, self.config.vocab_size, self.config.target_sum)
            log_rate = torch.as_tensor(np.log(p * self.config.target_sum), dtype=torch.float32)
            self.reference_log_rate.copy_(log_rate)
            self.reference_log_theta.copy_(torch.as_tensor(np.log(theta), dtype=torch.float32))
            self.output_bias().copy_(log_rate)
            if self.config.loss == "nb":
                self.log_theta.copy_(self.reference_log_theta)

    # ------------------------------------------------------------------------------------------ input

    def _complete_profile(self) -> bool:
        """Whether a record lists every panel gene its data has (zeros included): the scheme says."""
        scheme = SCHEMES.get(self.config.scheme or "")
        return scheme is not None and scheme.complete_profile

    def _dense(self, batch: dict[str, torch.Tensor], field: torch.Tensor) -> torch.Tensor:
        """A token-aligned field (B, L) scattered to gene columns (B, vocab_size); padding -> column 0."""
        ids = batch["input_ids"]
        keep = batch["attention_mask"]
        out = torch.zeros(ids.shape[0], self.config.vocab_size, dtype=torch.float32, device=ids.device)
        return out.scatter_(1, ids, torch.where(keep, field.float(), 0.0))

    def _missing(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, vocab_size) bool: genes the input did not measure. A panel record lists every panel
        gene its data has, zeros included, so a gene it leaves out is unknown and hidden like a masked
        one; other stores list expressed genes only, so there a gene left out is a zero."""
        if not self._complete_profile():
            return torch.zeros(
                batch["input_ids"].shape[0],
                self.config.vocab_size,
                dtype=torch.bool,
                device=batch["input_ids"].device,
            )
        listed = self._dense(batch, torch.ones_like(batch["values"])) > 0
        listed[:, :NUM_SPECIAL] = True  # the specials' columns are constant zeros, not missing genes
        return ~listed

    def _standardised(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self._dense(batch, batch["values"])
        return ((x - self.gene_mean) / self.gene_std).clamp(-CLIP, CLIP)

    # ------------------------------------------------------------------------------------------- loss

    def reconstruction(
        self, batch: dict[str, torch.Tensor], pred: torch.Tensor, z: torch.Tensor, hidden: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The hidden genes' loss and its reference, from predictions over every gene column (B, V):
        MSE of the standardised values (reference: each gene's training mean, 0 standardised), or the
        count likelihood (predictions are log rates per target_sum counts)."""
        if self.config.loss == "mse":
            loss = F.mse_loss(pred[hidden], z[hidden])
            reference = z[hidden].detach().float().pow(2).mean()
        else:
            loss, reference = self._count_loss(batch, pred, hidden)
        return {
            "loss": loss,
            "reference_loss": reference,
            "n_masked": hidden.sum(),
            "n_correct": torch.zeros((), dtype=torch.long, device=z.device),  # values: no accuracy
        }

    def _count_loss(
        self, batch: dict[str, torch.Tensor], log_rate: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(model NLL, reference NLL) of the hidden genes' counts."""
        size = batch["library_size"].float() / self.config.target_sum
        y = likelihood.counts_of(self._dense(batch, batch["values"]), size)[hidden]
        log_size = torch.log(size)[:, None].expand_as(log_rate)[hidden]
        theta = self.log_theta.expand_as(log_rate)[hidden] if self.config.loss == "nb" else None
        # clamped: an early large rate must not overflow exp() into an infinite loss
        log_mu = (log_rate[hidden] + log_size).clamp(max=likelihood.MAX_LOG_MU)
        loss = likelihood.count_nll(self.config.loss, log_mu, y, theta).mean()
        ref_rate = self.reference_log_rate.expand_as(log_rate)[hidden] + log_size
        ref_theta = self.reference_log_theta.expand_as(log_rate)[hidden]
        reference = likelihood.count_nll(self.config.loss, ref_rate, y, ref_theta).mean()
        return loss, reference.detach()


class ProfileAutoencoder(ProfileModel):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg)
        n_genes = cfg.vocab_size
        hidden = [cfg.d_ff] * (cfg.n_layers - 1)
        self.encoder = _stack([2 * n_genes + int(cfg.ratio_input), *hidden, cfg.d_model])
        self.decoder = _stack([cfg.d_model + len(cfg.batches), *reversed(hidden), n_genes])
        if cfg.objective == "scmae":  # which genes were swapped, from the latent (logits per gene)
            self.swap_head = _stack([cfg.d_model, *reversed(hidden), n_genes])
        self.drop = nn.Dropout(cfg.dropout)

    def output_bias(self) -> torch.Tensor:
        return self.decoder[-1].bias

    def _decode(self, latent: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder's output from the latent, and with `config.batches` each cell's batch (one-hot)."""
        n = len(self.config.batches)
        if n:
            if "batch" not in batch:
                raise ValueError("this model's decoder reads each cell's batch: the records carry none")
            latent = torch.cat([latent, F.one_hot(batch["batch"], n).to(latent.dtype)], dim=1)
        return self.decoder(latent)

    def _encode(self, z: torch.Tensor, hidden: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """States [input, hidden 1, ..., latent]; stops after `upto` linear layers when given."""
        indicator = hidden.to(z.dtype) if self.config.mask_indicator else torch.zeros_like(z)
        seen = z
        if self.config.input_scale == "visible":
            genes = hidden[:, NUM_SPECIAL:]
            visible = (~genes).sum(1, keepdim=True).clamp(min=1)
            seen = z * (genes.shape[1] / visible).to(z.dtype)
        h = torch.cat([torch.where(hidden, 0.0, seen), indicator], dim=1)
        if self.config.ratio_input:  # the share of the panel hidden (specials' columns excluded)
            h = torch.cat([h, hidden[:, NUM_SPECIAL:].float().mean(1, keepdim=True)], dim=1)
        states = [z]
        for module in self.encoder:
            h = module(self.drop(h) if isinstance(module, nn.Linear) else h)
            if isinstance(module, nn.Linear):
                states.append(h)
                if upto is not None and len(states) > upto:
                    break
        return states

    # --------------------------------------------------------------------------------------- training

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The masked genes' (`batch["masked"]`) reconstruction loss and its reference; with objective
        scmae in training, also `objective`, the loss that is minimised."""
        z = self._standardised(batch)
        hidden = self._dense(batch, batch["masked"]) > 0
        if self.config.objective == "scmae":
            return self._scmae(batch, z, hidden)
        latent = self._encode(z, hidden | self._missing(batch))[-1]
        out = self.reconstruction(batch, self._decode(latent, batch), z, hidden)
        return self._decorrelated(out, latent)

    def _decorrelated(self, out: dict[str, torch.Tensor], latent: torch.Tensor) -> dict[str, torch.Tensor]:
        """With `config.decorrelation` in training: the objective plus that weight times the
        variance-covariance penalty of the batch's latents (`loss` stays the reconstruction)."""
        if self.training and self.config.decorrelation > 0:
            objective = out.get("objective", out["loss"])
            out["objective"] = objective + self.config.decorrelation * decorrelation_penalty(latent)
        return out

    def _scmae(
        self, batch: dict[str, torch.Tensor], z: torch.Tensor, hidden: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """scMAE: the masked genes carry another cell's values; reconstruct every measured gene and
        detect the swapped ones. `loss` stays the masked genes' MSE, so held-out losses and their
        gene-mean reference compare with the mae objective's."""
        missing = self._missing(batch)
        swapped = torch.where(hidden, _donor_values(z, hidden), z)
        latent = self._encode(swapped, missing)[-1]  # the indicator shows unmeasured genes only
        pred = self._decode(latent, batch)
        out = self.reconstruction(batch, pred, z, hidden)
        measured = ~missing
        measured[:, :NUM_SPECIAL] = False  # the specials' columns: constant zeros, nothing to learn
        detect = F.binary_cross_entropy_with_logits(
            self.swap_head(latent)[measured], hidden[measured].float()
        )
        out["objective"] = F.mse_loss(pred[measured], z[measured]) + detect
        return self._decorrelated(out, latent)

    # ------------------------------------------------------------------------------------- embeddings

    def features(
        self, batch: dict[str, torch.Tensor], pooling: str = "mean", layer: int = -1
    ) -> torch.Tensor:
        """One vector per cell from the full (unmasked) profile, with gradients (fine-tuning).

        A profile model has one vector per cell already: `pooling` "cls" and "mean" give the same
        vector; "max" and "concat" (over per-token vectors) do not exist here."""
        if pooling not in self.poolings:
            raise ValueError(f"{pooling} pooling needs per-token vectors; a profile model has one per cell")
        n = self.config.n_layers + 1
        if not -n <= layer < n:
            raise ValueError(
                f"layer {layer} out of range for {self.config.n_layers} layers (use -{n}..{n - 1})"
            )
        z = self._standardised(batch)
        index = layer % n
        state = self._encode(z, self._missing(batch), upto=index)[index]
        return F.normalize(state, dim=1) if self.normalises(layer) else state

    def normalises(self, layer: int) -> bool:
        """Whether `features(..., layer)` is scaled to unit length (`config.embed_norm`: the latent only)."""
        return self.config.embed_norm == "l2" and layer % (self.config.n_layers + 1) == self.config.n_layers

    @torch.no_grad()
    def embed(self, batch: dict[str, torch.Tensor], pooling: str = "mean", layer: int = -1) -> torch.Tensor:
        return self.features(batch, pooling, layer)

    def layer_width(self, layer: int) -> int:
        """Width of the state `features(..., layer)` returns: [input genes, hidden..., latent]."""
        cfg = self.config
        widths = [cfg.vocab_size, *[cfg.d_ff] * (cfg.n_layers - 1), cfg.d_model]
        return widths[layer % len(widths)]


def decorrelation_penalty(latent: torch.Tensor) -> torch.Tensor:
    """VICReg's variance and covariance terms (Bardes, Ponce & LeCun 2022) on a batch's latents
    (B, d): the mean shortfall of each dimension's sd below 1, plus the squared off-diagonal
    covariances over d. Zero for a batch whose dimensions are uncorrelated with sd >= 1."""
    n, d = latent.shape
    if n < 2:
        return latent.sum() * 0.0
    centred = latent - latent.mean(0)
    cov = centred.T @ centred / (n - 1)
    var = torch.diagonal(cov)
    off = cov - torch.diag(var)
    return F.relu(1.0 - torch.sqrt(var + 1e-4)).mean() + off.pow(2).sum() / d


def _donor_values(z: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """(B, V): for every cell and gene, that gene's value in another cell of the batch. The donor is
    a hash of the cell, the gene and the mask pattern (random per step), not a draw: no RNG state, so
    held-out losses are fixed and a resumed run continues exactly."""
    n = z.shape[0]
    if n < 2:
        return z
    rows = torch.arange(n, device=z.device)[:, None]
    genes = torch.arange(z.shape[1], device=z.device)[None, :]
    offset = (hidden.long().cumsum(1) * 40_503 + genes * 9_973 + rows * 7_919) % (n - 1)
    return z.gather(0, (rows + 1 + offset) % n)


def gene_statistics(records, vocab_size: int, *, panel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and standard deviation of the values over `records`, streamed one record at a
    time: (vocab_size,) float64 each. `panel`: a gene a record leaves out is unmeasured (else: 0)."""
    total = np.zeros(vocab_size, dtype=np.float64)
    square = np.zeros(vocab_size, dtype=np.float64)
    listed = np.zeros(vocab_size, dtype=np.float64)
    n = 0
    for record in records:
        tokens = np.asarray(record["tokens"], dtype=np.int64)
        values = np.asarray(record["values"], dtype=np.float64)
        np.add.at(total, tokens, values)
        np.add.at(square, tokens, values * values)
        np.add.at(listed, tokens, 1.0)
        n += 1
    # panel records: over the records that measure the gene; others: a gene left out is a zero
    n = np.maximum(listed if panel else float(max(n, 1)), 1.0)
    mean = total / n
    std = np.sqrt(np.maximum(square / n - mean * mean, 0.0))
    std[std == 0] = 1.0
    return mean, std


# Standardising by the embedded cells' own statistics needs enough cells for a per-gene sd.
MIN_CELLS_OWN_STATS = 20
STANDARDISE = ("checkpoint", "data")


def standardised_on(model: ProfileModel, records, where: str) -> ProfileModel:
    """A copy of `model` whose per-gene standardisation is that of `records` (`standardise: data`);
    `model` itself is left as it is. The checkpoint's statistics are its pretraining cells'. Cells of
    another experiment (another chemistry, depth or tissue) differ from those per gene, and a model
    that reads each gene's deviation from the corpus's mean then reads the experiment as well as the
    cell; standardising each dataset by its own statistics is what `sc.pp.scale` does per dataset
    (measured: docs/cell-models.md, "Standardising by the cells embedded"). Streams `records` once.
    Fewer than MIN_CELLS_OWN_STATS records: InputError naming `where`."""
    n = 0

    def counted():
        nonlocal n
        for record in records:
            n += 1
            yield record

    mean, std = gene_statistics(counted(), model.config.vocab_size, panel=model._complete_profile())
    if n < MIN_CELLS_OWN_STATS:
        raise InputError(
            f"{where}: standardise=data takes each gene's mean and sd from the cells embedded, and "
            f"{n} cells are too few for that (at least {MIN_CELLS_OWN_STATS}); embed them with "
            "standardise=checkpoint (the statistics of the model's pretraining cells)"
        )
    out = copy.deepcopy(model)
    out.set_gene_stats(mean, std)
    return out


def check_standardise(model: torch.nn.Module, standardise: str, where: str) -> None:
    """standardise=data applies to profile models only (token models have no per-gene statistics)."""
    if standardise not in STANDARDISE:
        raise InputError(f"standardise must be one of {', '.join(STANDARDISE)}, not {standardise!r}")
    if standardise == "data" and not isinstance(model, ProfileModel):
        raise InputError(
            f"{where}: standardise=data replaces a profile model's per-gene standardisation (kinds mlp, "
            f"panel_transformer), and this is a {model.config.kind} model of {model.config.modality}, "
            "which has none; use standardise=checkpoint"
        )
