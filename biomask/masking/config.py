"""The masking config: one switch (`scheme`) picks a published scheme; every key stays overridable.

    masking:
      scheme: r2mae            # r2mae | bert15 | fixed40 | mae75 | dynamic | scgpt | span | custom
      ratio: {low: 0.1, high: 0.75}     # explicit keys win over the scheme's values

A scheme only fills the keys it defines (e.g. `r2mae` sets `ratio.kind: uniform`, `low`, `high`);
keys written in the config or on the command line replace them. So `masking.scheme=fixed40` on the
command line turns any config into the fixed-40 % baseline, and `masking.ratio.high=0.6` tunes R²MAE.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from biomask.config import Config, flatten

# What each scheme sets. Ratios and their sources: see /shared/reference/masking.md and the README.
SCHEMES: dict[str, dict[str, Any]] = {
    # R²MAE (Dong, Wang & Kluger 2025): the ratio itself is random, drawn once per batch.
    "r2mae": {"ratio": {"kind": "uniform", "low": 0.15, "high": 0.45, "granularity": "batch"}},
    # BERT / DNABERT / Nucleotide Transformer / Geneformer: 15 %, 80/10/10.
    "bert15": {"ratio": {"kind": "fixed", "value": 0.15}},
    # Wettig et al. 2022: 40 % beats 15 % for large BERTs; scFormer uses 0.4.
    "fixed40": {"ratio": {"kind": "fixed", "value": 0.4}},
    # MAE: 75 % of the tokens dropped from the encoder, a light decoder reconstructs them.
    "mae75": {"ratio": {"kind": "fixed", "value": 0.75}, "corruption": {"kind": "mae"}},
    # Ankner et al. 2023: dynamic masking rate, linearly 30 % -> 15 % over training.
    "dynamic": {"ratio": {"kind": "linear", "start": 0.3, "end": 0.15}},
    # scGPT: the ratio drawn from {0.25, 0.5, 0.75}.
    "scgpt": {"ratio": {"kind": "discrete", "values": [0.25, 0.5, 0.75]}},
    # SpanBERT-style: 15 % in contiguous spans with geometric lengths (mean 3, at most 10).
    "span": {"ratio": {"kind": "fixed", "value": 0.15}, "positions": {"kind": "span"}},
    "custom": {},
}

# The registry's names, so a config names a scheme SCHEMES holds (and the config reference lists them).
SchemeName = Literal[tuple(SCHEMES)]  # type: ignore[valid-type]


class RatioConfig(Config):
    """How the mask ratio is drawn. Each kind reads only its own keys."""

    kind: Literal["fixed", "uniform", "beta", "discrete", "linear"] = "fixed"
    value: float = Field(0.15, gt=0.0, lt=1.0)  # fixed
    low: float = Field(0.15, gt=0.0, lt=1.0)  # uniform on [low, high]; beta rescaled to [low, high]
    high: float = Field(0.45, gt=0.0, lt=1.0)
    a: float = Field(2.0, gt=0.0)  # beta(a, b)
    b: float = Field(2.0, gt=0.0)
    values: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75], min_length=1)  # discrete
    start: float = Field(0.3, gt=0.0, lt=1.0)  # linear: start -> end over the training steps
    end: float = Field(0.15, gt=0.0, lt=1.0)
    # batch: one ratio per optimizer step, the same on every rank and micro-batch (R²MAE; keeps MAE rectangular);
    # sample: one ratio per record.
    granularity: Literal["batch", "sample"] = "batch"

    @model_validator(mode="after")
    def _check(self) -> RatioConfig:
        if self.low > self.high:
            raise ValueError(f"ratio.low ({self.low}) must not exceed ratio.high ({self.high})")
        if any(not 0.0 < v < 1.0 for v in self.values):
            raise ValueError(f"ratio.values must lie strictly between 0 and 1 (got {self.values})")
        return self


class PositionConfig(Config):
    """Which tokens are masked: uniformly among the maskable ones, or in contiguous spans."""

    kind: Literal["uniform", "span"] = "uniform"
    mean_span: float = Field(3.0, ge=1.0)  # span: geometric lengths with this mean (before clipping)
    max_span: int = Field(10, ge=1)


class CorruptionConfig(Config):
    """What the encoder sees at masked positions."""

    # mlm: the sequence keeps its length; masked tokens are replaced (mask_token / random_token / kept;
    # those two shares are refused where nothing is replaced: mae, and the expression models' values).
    # mae: masked tokens are removed from the encoder input; a light decoder reconstructs them.
    kind: Literal["mlm", "mae"] = "mlm"
    mask_token: float = Field(0.8, ge=0.0, le=1.0)
    random_token: float = Field(0.1, ge=0.0, le=1.0)  # the rest of the masked tokens stay unchanged

    @model_validator(mode="after")
    def _check(self) -> CorruptionConfig:
        if self.mask_token + self.random_token > 1.0 + 1e-9:
            raise ValueError("corruption.mask_token + corruption.random_token must not exceed 1")
        return self


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


class MaskingConfig(Config):
    scheme: SchemeName = "r2mae"
    ratio: RatioConfig = RatioConfig()
    positions: PositionConfig = PositionConfig()
    corruption: CorruptionConfig = CorruptionConfig()
    # What is predicted: token ids (DNA, rank-encoded genes), expression bins (binned cells) with
    # cross-entropy, or continuous values with MSE. auto: tokens for DNA and rank, bins for binned,
    # values for panel.
    target: Literal["auto", "tokens", "bins", "values"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _apply_scheme(cls, data: Any) -> Any:
        """Fill the scheme's keys under the ones given explicitly (explicit keys win)."""
        if not isinstance(data, dict):
            return data
        scheme = data.get("scheme", "r2mae")
        if scheme not in SCHEMES:
            return data  # the Literal check reports it with the allowed values
        return _merge(SCHEMES[scheme], data)


def describe_masking(masking: dict[str, Any]) -> str:
    """A short human-readable name of a masking config: `U(0.15, 0.45)`, `15 %`, `30 %→15 %`, ..."""
    ratio = masking.get("ratio", {})
    kind = ratio.get("kind")
    if kind == "fixed":
        text = f"{ratio['value']:.0%}"
    elif kind == "uniform":
        text = f"U({ratio['low']:g}, {ratio['high']:g})"
    elif kind == "beta":
        text = f"Beta({ratio['a']:g}, {ratio['b']:g}) on [{ratio['low']:g}, {ratio['high']:g}]"
    elif kind == "discrete":
        text = "{" + ", ".join(f"{v:g}" for v in ratio["values"]) + "}"
    elif kind == "linear":
        text = f"{ratio['start']:.0%}→{ratio['end']:.0%}"
    else:
        text = str(kind)
    if masking.get("ratio", {}).get("granularity") == "sample":
        text += " per sample"
    if masking.get("positions", {}).get("kind") == "span":
        text += ", spans"
    if masking.get("corruption", {}).get("kind") == "mae":
        text += ", MAE"
    return text


def masking_text(cfg: MaskingConfig) -> str:
    """The scheme with the masking it resolved to, e.g. `beta_low (Beta(2, 5) on [0.5, 0.9])`: keys written
    in a config win over a scheme's, so a scheme swept over a config that sets R²MAE's range (cells-mlp.yaml:
    ratio low 0.5, high 0.9) takes that range — the run's first lines say which one it trains with, and
    which of the scheme's own values the config replaced (a scheme given on the command line does not
    override keys the config file writes)."""
    resolved = flatten(cfg.model_dump())
    replaced = [
        (key, theirs, resolved[key])
        for key, theirs in flatten(SCHEMES.get(cfg.scheme, {})).items()
        if key in resolved and resolved[key] != theirs
    ]
    text = f"{cfg.scheme} ({describe_masking(cfg.model_dump())})"
    if replaced:
        text += "; the config's " + ", ".join(f"{k}={mine}" for k, _, mine in replaced)
        text += " replace the scheme's " + ", ".join(f"{theirs}" for _, theirs, _ in replaced)
    return text
