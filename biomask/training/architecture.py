"""The model a pretrain config implies: `model:` (what the user asks for: a kind, a preset, a few
switches) resolved against the token store (vocabulary, modality, cells scheme) and the masking (MAE
needs a decoder; the target) into the complete `EncoderConfig` a checkpoint carries. Every check
that needs both the config and the data lives here, so the trainer only asks for the result."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from biomask.errors import InputError
from biomask.masking.config import SCHEMES
from biomask.models import EncoderConfig, load_pretrained
from biomask.models.kinds import family, rebuilt_on_continuing
from biomask.store import TokenStore
from biomask.training.config import PretrainConfig
from biomask.training.data import DataSpec

log = logging.getLogger(__name__)


def resolve_target(cfg: PretrainConfig, spec: DataSpec) -> str:
    scheme = spec.cell_scheme
    auto = scheme.default_target if scheme is not None else "tokens"
    target = cfg.masking.target if cfg.masking.target != "auto" else auto
    if spec.modality == "dna" and target != "tokens":
        raise InputError(f"masking.target={target} needs a cells store; DNA stores predict tokens")
    if target == "bins" and not spec.has_bins:
        raise InputError(f"masking.target=bins needs a binned cells store; {cfg.data.store} is {spec.scheme}")
    return target


def build_architecture(cfg: PretrainConfig, spec: DataSpec, store: TokenStore | None = None) -> EncoderConfig:
    """The model a pretrain config and a token store imply: each family's own checks
    (`biomask.models.kinds.FAMILIES`), so a new kind of a family needs nothing here."""
    return {"profile": profile_architecture, "sequence": sequence_architecture, "tokens": token_architecture}[
        family(cfg.model.kind)
    ](cfg, spec, store)


def token_architecture(cfg: PretrainConfig, spec: DataSpec, store: TokenStore | None = None) -> EncoderConfig:
    """The tokens family (the transformer): DNA or cells tokens, MLM or MAE, learned positions."""
    scheme = spec.cell_scheme
    value_embedding = cfg.model.value_embedding
    if value_embedding == "auto":
        value_embedding = scheme.value_embedding if scheme is not None else "none"
    if spec.modality == "dna" and value_embedding != "none":
        raise InputError(f"model.value_embedding={value_embedding} needs a cells store")
    if value_embedding == "bins" and not spec.has_bins:
        raise InputError("model.value_embedding=bins needs a binned cells store (use mlp or none)")
    target = resolve_target(cfg, spec)
    if target == "bins" and value_embedding == "mlp":
        raise InputError("masking.target=bins with model.value_embedding=mlp would show the masked values")
    positions = not spec.order_free
    max_length = cfg.data.max_length or cfg.model.max_len
    if positions and max_length > cfg.model.max_len:
        raise InputError(f"data.max_length ({max_length}) exceeds model.max_len ({cfg.model.max_len})")
    return EncoderConfig(
        kind=cfg.model.kind,
        vocab_size=spec.vocab_size,
        modality=spec.modality,  # type: ignore[arg-type]
        **cfg.model.sizes(),
        dropout=cfg.model.dropout,
        max_len=cfg.model.max_len,
        positions=positions,
        value_embedding=value_embedding,  # type: ignore[arg-type]
        n_bins=spec.n_bins,
        scheme=spec.scheme,
        target=target,  # type: ignore[arg-type]
        decoder_layers=cfg.model.decoder_layers if cfg.masking.corruption.kind == "mae" else 0,
        activation_checkpointing=cfg.model.activation_checkpointing,
    )


def sequence_architecture(cfg: PretrainConfig, spec: DataSpec, store: TokenStore | None) -> EncoderConfig:
    """The sequence family (`model.kind: cnn`): DNA tokens read in place, learned by MLM (masked
    positions shown as [MASK]); dropping masked tokens (MAE) would break the spacing it reads."""
    where = store.root if store is not None else cfg.data.store
    kind = cfg.model.kind
    if spec.modality != "dna":
        raise InputError(f"model.kind={kind} is a DNA encoder; {where} is a {spec.modality} store")
    if cfg.masking.corruption.kind != "mlm":
        set_by_scheme = SCHEMES.get(cfg.masking.scheme, {}).get("corruption", {}).get("kind") == "mae"
        scheme = (
            f" (masking.scheme={cfg.masking.scheme} sets it; for its mask ratio with BERT-style "
            "corruption add masking.corruption.kind=mlm)"
            if set_by_scheme
            else ""
        )
        raise InputError(
            f"masking.corruption.kind={cfg.masking.corruption.kind}{scheme} is not possible with model.kind={kind}: "
            "it reads every position in place; use masking.corruption.kind=mlm"
        )
    if cfg.model.value_embedding not in ("auto", "none"):
        raise InputError(f"model.value_embedding={cfg.model.value_embedding} needs a cells store")
    return EncoderConfig(
        vocab_size=spec.vocab_size,
        modality="dna",
        kind=kind,
        **cfg.model.sizes(),
        dropout=cfg.model.dropout,
        max_len=cfg.model.max_len,
        positions=False,  # translation-equivariant: no position embeddings, no length bound
        target=resolve_target(cfg, spec),  # type: ignore[arg-type]
        decoder_layers=0,
    )


def profile_architecture(cfg: PretrainConfig, spec: DataSpec, store: TokenStore | None) -> EncoderConfig:
    """`model.kind: mlp` / `panel_transformer`: a cell's whole profile (never cropped), so the input
    length is the store's longest record; they reconstruct values (or counts: `model.loss`)."""
    where = store.root if store is not None else cfg.data.store
    kind = cfg.model.kind
    if kind == "panel_transformer" and not spec.complete_profile:
        raise InputError(
            f"model.kind=panel_transformer reads panel stores (tokenizer.scheme=panel); {where} is {spec.scheme}"
        )
    if cfg.model.loss != "mse" and store is not None:
        from biomask.cells.counts import require_counts

        require_counts(store.manifest, str(where), f"model.loss={cfg.model.loss}")
    if spec.modality != "cells":
        raise InputError(f"model.kind=mlp reads expression profiles; {where} is a {spec.modality} store")
    if cfg.masking.target not in ("auto", "values"):
        raise InputError(
            f"model.kind=mlp reconstructs values; masking.target={cfg.masking.target} is not possible"
        )
    if not spec.complete_profile:
        log.warning(
            "pretrain: model.kind=mlp on a %s store sees only the genes each record lists (a panel store "
            "— tokenizer.scheme=panel — holds every gene, zeros included)",
            spec.scheme,
        )
    batches: list[str] = []
    if cfg.model.batch_covariate:
        recorded = (store.manifest.get("batch") or {}) if store is not None else {}
        if store is not None and not recorded.get("names"):
            raise InputError(
                f"model.batch_covariate needs each cell's batch in the store; {where} was prepared without "
                "one: prepare it with batch_column=<obs column> (prep cells)"
            )
        batches = [str(n) for n in recorded.get("names", [])]
    longest = int((store.manifest.get("max_length") if store is not None else None) or spec.vocab_size)
    # prep's normalisation (values = log1p(count / library_size * target_sum)): how counts come back
    prep = (store.manifest.get("config") or {}) if store is not None else {}
    target_sum = float((prep.get("normalise") or {}).get("target_sum", 1e4))
    return EncoderConfig(
        vocab_size=spec.vocab_size,
        modality="cells",
        kind=kind,
        **cfg.model.sizes(),
        dropout=cfg.model.dropout,
        max_len=longest + spec.n_specials,
        positions=False,
        value_embedding="none",
        n_bins=spec.n_bins,
        scheme=spec.scheme,
        target="values",
        decoder_layers=0,
        mask_indicator=cfg.model.mask_indicator,
        ratio_input=cfg.model.ratio_input,
        embed_norm=cfg.model.resolved_embed_norm(),
        objective=cfg.model.objective,
        loss=cfg.model.loss,
        target_sum=target_sum,
        max_visible=cfg.model.max_visible if kind == "panel_transformer" else 0,
        decorrelation=cfg.model.decorrelation,
        input_scale=cfg.model.input_scale,
        batches=batches,
    )


# EncoderConfig fields that decide the weights' shapes or meaning: taken from an init_from checkpoint
WEIGHT_SHAPING = (
    "kind",
    "d_model",
    "n_layers",
    "n_heads",
    "d_ff",
    "mask_indicator",
    "ratio_input",
    "input_scale",
    "loss",
)


def init_checkpoint(
    cfg: PretrainConfig, spec: DataSpec, arch: EncoderConfig
) -> tuple[EncoderConfig, dict[str, Any], dict[str, torch.Tensor]]:
    """`model.init_from`: the checkpoint's architecture and weights (its tokenizer must be the store's)."""
    path = Path(str(cfg.model.init_from))
    pretrained = load_pretrained(path)  # a missing or corrupt checkpoint: InputError
    info = pretrained.checkpoint_info
    if pretrained.config.modality != spec.modality:
        raise InputError(
            f"model.init_from={path} is a {pretrained.config.modality} model and {cfg.data.store} holds "
            f"{spec.modality} data; continue a {spec.modality} checkpoint"
        )
    theirs = info.get("tokenizer", {}).get("sha256")
    if theirs != spec.tokenizer_sha256:
        raise InputError(
            f"model.init_from={path}: its tokenizer (sha256 {str(theirs)[:12]}…) does not match the token store's "
            f"({str(spec.tokenizer_sha256)[:12]}…); prepare the data with tokenizer.path={path}/tokenizer"
        )
    theirs_scheme = getattr(pretrained.config, "scheme", None)
    if spec.modality == "cells" and theirs_scheme and theirs_scheme != spec.scheme:
        raise InputError(
            f"model.init_from={path} was trained on {theirs_scheme} records and {cfg.data.store} holds "
            f"{spec.scheme} ones (the same genes, other values); prepare the data with tokenizer.scheme={theirs_scheme}"
        )
    kind = pretrained.config.kind
    if kind != cfg.model.kind:
        # the checkpoint's kind is what trains: what build_architecture refuses for that kind (a cnn's
        # MAE corruption, a profile model's token target) is refused for its continuation too, whatever
        # model.kind says — every kind's checks, not a copy of some of them here
        theirs = cfg.model_copy(update={"model": cfg.model.model_copy(update={"kind": kind})})
        try:
            build_architecture(theirs, spec)
        except InputError as exc:
            raise InputError(f"model.init_from={path} is a {kind} model: {exc}") from None
    # the weights fix the architecture: what this run's config says of it otherwise is not used
    ignored = [
        f"model.{name}={getattr(arch, name)} (the checkpoint's: {getattr(pretrained.config, name)})"
        for name in WEIGHT_SHAPING
        if getattr(arch, name) != getattr(pretrained.config, name)
    ]
    if pretrained.config.batches != arch.batches:  # the decoder's batch inputs are the checkpoint's
        theirs_batches = ", ".join(pretrained.config.batches) or "none"
        raise InputError(
            f"model.init_from={path}: its decoder is conditioned on batches [{theirs_batches}], this run's on "
            f"[{', '.join(arch.batches) or 'none'}] (model.batch_covariate, the store's batch_column); continue "
            "it on cells of the same batches, or train a new model on these"
        )
    if ignored:
        log.warning(
            "pretrain: model.init_from=%s fixes the architecture; not used: %s", path, ", ".join(ignored)
        )
    arch = dataclasses.replace(
        pretrained.config,
        dropout=arch.dropout,
        activation_checkpointing=arch.activation_checkpointing,
        decoder_layers=arch.decoder_layers,
        target=arch.target,
        # how the embedding is scaled and what it trains on are this run's choices, not the
        # weights' (an mlp's only)
        embed_norm=arch.embed_norm if pretrained.config.kind == "mlp" else "none",
        objective=arch.objective if pretrained.config.kind == "mlp" else "mae",
        # training-only settings, this run's too (the checkpoint's were silently kept before 2026-12-06,
        # while the run's resolved config recorded its own)
        decorrelation=arch.decorrelation if pretrained.config.kind == "mlp" else 0.0,
        max_visible=arch.max_visible if pretrained.config.kind == "panel_transformer" else 0,
    )
    # a transformer's MAE decoder is rebuilt for the new run; a profile model's decoder is its objective,
    # its swap detector (scmae) belongs to that objective only: new when it starts, gone when it ends
    drop = rebuilt_on_continuing(arch.kind)
    weights = {k: v for k, v in pretrained.state_dict().items() if not k.startswith(drop)}
    training = info.get("training") or {}
    lineage = {
        "name": "init_from",
        "path": str(path),
        "sha256": info.get("weights_sha256"),
        # the steps behind the weights this run starts from (theirs, and those their start had)
        "steps": int(training.get("steps") or 0) + int((info.get("init_from") or {}).get("steps") or 0),
    }
    return arch, lineage, weights
