"""Count likelihoods for the cell models' reconstruction (scVI-style), and the counts they score.

A panel store holds log1p(CP10k) values and, when it was prepared from counts, each cell's library
size (record field `library_size`). The counts come back exactly enough to round:

    counts = rint(expm1(value) * library_size / target_sum)

A model predicts each masked gene's log rate per `target_sum` counts; the mean count is that rate
times the cell's size factor `library_size / target_sum`. The per-gene "reference" predictor (what
a model must beat) is each gene's mean proportion of the library over the training split, and, for
the negative binomial, its method-of-moments dispersion (`count_statistics`).

Losses are full negative log-likelihoods (the log(y!) term included), averaged over masked genes,
so a model's held-out loss and its reference are on one scale.
"""

from __future__ import annotations

import numpy as np
import torch

MIN_PROPORTION = 1e-7  # a gene never seen in training still gets a finite (tiny) reference rate
MAX_THETA = 1e4  # an under-dispersed gene's moment estimate is capped here: nearly Poisson
MAX_LOG_MU = 20.0  # mean counts above exp(20) ~ 5e8 do not occur; the cap keeps exp() finite


def counts_of(values: torch.Tensor, size_factor: torch.Tensor) -> torch.Tensor:
    """Counts from log1p-normalised values and each cell's size factor (B,) -> (B, G)."""
    return torch.round(torch.expm1(values.float()) * size_factor[:, None])


def poisson_nll(log_mu: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise -log Poisson(y; mu = exp(log_mu))."""
    return torch.exp(log_mu) - y * log_mu + torch.lgamma(y + 1.0)


def nb_nll(log_mu: torch.Tensor, log_theta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise -log NB(y; mean exp(log_mu), inverse dispersion exp(log_theta)), var = mu + mu²/theta
    (scVI's parameterisation, computed in log space for stability)."""
    theta = torch.exp(log_theta)
    log_theta_mu = torch.logaddexp(log_theta, log_mu)  # log(theta + mu)
    log_prob = (
        theta * (log_theta - log_theta_mu)
        + y * (log_mu - log_theta_mu)
        + torch.lgamma(y + theta)
        - torch.lgamma(theta)
        - torch.lgamma(y + 1.0)
    )
    return -log_prob


def count_nll(
    kind: str, log_mu: torch.Tensor, y: torch.Tensor, log_theta: torch.Tensor | None
) -> torch.Tensor:
    if kind == "poisson":
        return poisson_nll(log_mu, y)
    assert log_theta is not None
    return nb_nll(log_mu, log_theta, y)


def count_statistics(records, vocab_size: int, target_sum: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean proportion of the library, p_g, and NB inverse dispersion theta_g by moments,
    over `records` (streamed): (vocab_size,) float64 each.

    With mu = size_factor * target_sum * p_g, NB gives E[(y - mu)² - mu] = E[mu²] / theta, so
    theta_g = Σ mu² / Σ ((y - mu)² - mu), capped at MAX_THETA where the excess is not positive."""
    records = list(records) if not hasattr(records, "__len__") else records
    proportion = np.zeros(vocab_size, dtype=np.float64)
    listed = np.zeros(vocab_size, dtype=np.float64)
    for record in records:
        tokens = np.asarray(record["tokens"], dtype=np.int64)
        np.add.at(proportion, tokens, np.expm1(np.asarray(record["values"], dtype=np.float64)) / target_sum)
        np.add.at(listed, tokens, 1.0)
    proportion = np.maximum(proportion / np.maximum(listed, 1.0), MIN_PROPORTION)
    mu_square = np.zeros(vocab_size, dtype=np.float64)
    excess = np.zeros(vocab_size, dtype=np.float64)
    for record in records:
        tokens = np.asarray(record["tokens"], dtype=np.int64)
        size = float(record["library_size"]) / target_sum
        y = np.rint(np.expm1(np.asarray(record["values"], dtype=np.float64)) * size)
        mu = size * target_sum * proportion[tokens]
        np.add.at(mu_square, tokens, mu * mu)
        np.add.at(excess, tokens, (y - mu) ** 2 - mu)
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = np.where(excess > 0, mu_square / excess, MAX_THETA)
    return proportion, np.clip(theta, 1e-4, MAX_THETA)
