"""The portable checkpoint: `model.safetensors` + `config.json` + `tokenizer/`, loadable without DeepSpeed.

    model = load_pretrained("runs/pretrain/dna-tiny/model")     # eval mode, on CPU by default
    check_tokenizer(model, "runs/prep/ce2-chrX-char")            # exit 2 if the store's tokenizer differs

`config.json` holds `architecture` (an `EncoderConfig`), the modality and scheme, the masking config,
the tokenizer's sha256, training facts (steps, tokens, seed), the data checksum and the code version.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from biomask.errors import InputError
from biomask.models.checkpoint_config import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CONFIG_SHA256,
    config_digest,
    read_checkpoint_config,
)
from biomask.models.config import EncoderConfig
from biomask.models.kinds import build_model
from biomask.models.model import MaskedEncoder
from biomask.provenance import sha256_file
from biomask.tensor_files import save_tensors

WEIGHTS = "model.safetensors"


def save_pretrained(
    state_dict: dict[str, torch.Tensor],
    architecture: EncoderConfig,
    directory: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike,
    info: dict[str, Any],
) -> Path:
    """Write a portable checkpoint into `directory` (which must not exist yet: write to a temp dir)."""
    directory = Path(directory)
    directory.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    save_tensors(tensors, directory / WEIGHTS, metadata={"format": CHECKPOINT_FORMAT})  # the umask's mode
    # the tokenizer's own files only: regular files at its top level, never a link or a subfolder
    (directory / "tokenizer").mkdir()
    for source in sorted(Path(tokenizer_dir).iterdir()):
        if source.is_file() and not source.is_symlink():
            shutil.copyfile(source, directory / "tokenizer" / source.name)
    tokenizer_json = directory / "tokenizer" / "tokenizer.json"
    config = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "architecture": architecture.to_dict(),
        **info,
        # every file of tokenizer/ (cells: genes.tsv holds the panel's gene order), checked on load
        "tokenizer": {
            **info.get("tokenizer", {}),
            "sha256": sha256_file(tokenizer_json),
            "files": {
                str(f.relative_to(directory / "tokenizer")): sha256_file(f)
                for f in sorted((directory / "tokenizer").rglob("*"))
                if f.is_file()
            },
        },
        "weights_sha256": sha256_file(directory / WEIGHTS),
    }
    config = json.loads(json.dumps(config, default=str))  # as it will read back
    config[CONFIG_SHA256] = config_digest(config)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory


def load_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu") -> MaskedEncoder:
    """The encoder of a portable checkpoint, in eval mode; `model.checkpoint_info` holds config.json.
    `device`: cpu, cuda[:N], or auto (the GPU when there is one); one torch cannot use here is a
    ConfigError naming it, before anything is read."""
    if isinstance(device, str):  # "cuda" on a CPU node was torch's AssertionError, "auto" refused
        from biomask.embedding.inference import pick_device

        device = pick_device(device)
    directory = Path(directory)
    config = read_checkpoint_config(directory)
    tokenizer_json = directory / "tokenizer" / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise InputError(f"{directory}: tokenizer/tokenizer.json is missing; export the checkpoint again")
    recorded = config.get("tokenizer", {})
    if not isinstance(recorded, dict) or not isinstance(recorded.get("files") or {}, dict):
        raise InputError(
            f"{directory / 'config.json'}: its tokenizer record is not as biomask writes it; restore the "
            "checkpoint's own config.json"
        )
    expected = {"tokenizer.json": recorded.get("sha256"), **(recorded.get("files") or {})}
    for name, sha in expected.items():  # checkpoints written before "files" was kept: tokenizer.json
        path = directory / "tokenizer" / str(name)
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise InputError(
                f"{directory / 'config.json'} lists tokenizer file {name!r}, which is not a file of "
                "tokenizer/ (a path elsewhere); restore the checkpoint's own config.json"
            )
        if sha and path.is_symlink():
            raise InputError(f"{path} is a symbolic link, not the tokenizer file this model was saved with")
        if sha and not path.exists():
            raise InputError(
                f"{path} is missing: the checkpoint's tokenizer/ lists it (config.json); restore the "
                "checkpoint's own tokenizer/ (copy the whole model/ folder)"
            )
        if sha and (not path.is_file() or sha256_file(path) != sha):
            raise InputError(
                f"{path} does not match the tokenizer this model was trained with "
                f"(sha256 {sha[:12]}… in config.json); restore the checkpoint's own tokenizer/"
            )
    try:
        architecture = EncoderConfig.from_dict(config["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{directory / 'config.json'}: invalid architecture ({exc})") from None
    _check_modality(directory / "config.json", config, architecture)
    verify_weights(directory, config)
    try:  # the models' own consistency checks (a CNN of cells, an even kernel) name the file too
        _check_shapes(directory / WEIGHTS, architecture)  # before any memory is allocated for it
        # the random initialisation the weights replace draws from torch's RNG: a forked one, so that
        # loading a model (biomask.embed in a notebook) leaves the caller's random stream as it was
        with torch.random.fork_rng(devices=[]):
            model = build_model(architecture)
    except ValueError as exc:
        raise InputError(f"{directory / 'config.json'}: invalid architecture ({exc})") from None
    try:
        state = load_file(str(directory / WEIGHTS), device="cpu")
    except FileNotFoundError:
        raise InputError(f"{directory / WEIGHTS} is missing") from None
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise InputError(
            f"{directory / WEIGHTS} is unreadable ({exc}); export the checkpoint again"
        ) from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape than the architecture says
        first = str(exc).strip().splitlines()[1:2] or [str(exc)]
        raise InputError(
            f"{directory / WEIGHTS} does not fit the architecture in its config.json ({first[0].strip()})"
        ) from None
    if missing or unexpected:
        raise InputError(
            f"{directory / WEIGHTS} does not fit its config.json (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    _check_values(directory / WEIGHTS, state, model)
    model.checkpoint_info = config  # type: ignore[assignment]
    model.checkpoint_dir = directory  # type: ignore[assignment]
    return model.to(device).eval()


def _check_values(weights: Path, state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Each tensor of the model's own dtype, finite, and at or above the floor the model names for it:
    load_state_dict casts silently, so a header relabelling F32 as I32 (digest resealed) gave all-NaN
    embeddings with exit 0, as a gene_std of 0 did."""
    own = model.state_dict()
    floors = getattr(model, "floors", {})  # e.g. a profile model's gene_std, which it divides by
    for name, tensor in state.items():
        if name in floors and bool((tensor < floors[name]).any()):
            raise InputError(
                f"{weights}: {name} holds values below {floors[name]:g}, which training never writes (the "
                "model would divide by them); export the checkpoint again"
            )
        if name in own and tensor.dtype != own[name].dtype:
            raise InputError(
                f"{weights}: {name} is stored as {tensor.dtype}, not the model's {own[name].dtype}; "
                "export the checkpoint again"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{weights}: {name} holds NaN or infinite values; export the checkpoint again")


def _check_modality(path: Path, config: dict[str, Any], architecture: EncoderConfig) -> None:
    """The architecture's modality and cell scheme agree with those config.json records beside it (a
    cells model reads a cell scheme's tokens, a DNA model none): an edited one was read as the other
    modality and refused later by the data, with a message that blamed the data."""
    disagree = [
        f"{key} {getattr(architecture, key)!r} in the architecture, {config[key]!r} beside it"
        for key in ("modality", "scheme")
        if key in config and config[key] != getattr(architecture, key)
    ]
    if (architecture.modality == "cells") != (architecture.scheme is not None):
        disagree.append(f"a {architecture.modality} model with cell scheme {architecture.scheme!r}")
    if disagree:
        raise InputError(
            f"{path}: the checkpoint's record of what it reads does not agree with itself ("
            f"{'; '.join(disagree)}); it was edited or damaged: export the model again"
        )


def _check_shapes(weights: Path, architecture: EncoderConfig) -> None:
    """The architecture, built without memory (torch's meta device), has the tensors the weights
    file holds, name for name and shape for shape: an edited config.json (a width of 65,536) is
    refused before the model it describes is allocated — also when the file leaves out the tensors
    such a width would have (a check of the names the file holds alone let that through)."""
    from safetensors import safe_open

    if not weights.is_file():
        return  # reported as missing by the loader
    with torch.device("meta"):
        skeleton = build_model(architecture)
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise InputError(f"{weights} is unreadable ({exc}); export the checkpoint again") from None
    expected = skeleton.state_dict()
    missing = [name for name in expected if name not in shapes]
    unexpected = [name for name in shapes if name not in expected]
    if missing or unexpected:
        raise InputError(
            f"{weights} does not fit its config.json (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for name, tensor in expected.items():
        if list(tensor.shape) != shapes[name]:
            raise InputError(
                f"{weights} does not fit the architecture in its config.json ({name}: {shapes[name]} in the "
                f"file, {list(tensor.shape)} in the architecture)"
            )


def verify_weights(directory: Path, config: dict[str, Any]) -> None:
    """`model.safetensors` must match the `weights_sha256` in config.json (streamed; InputError naming it)."""
    weights, expected = directory / WEIGHTS, config.get("weights_sha256")
    if not weights.is_file():
        return  # reported as missing by the loader
    if not isinstance(expected, str):
        raise InputError(f"{directory / 'config.json'} records no weights_sha256; export the model again")
    actual = sha256_file(weights)
    if actual != expected:
        raise InputError(
            f"{weights} is corrupt or was changed: its sha256 {actual[:12]}… differs from the weights_sha256 "
            f"{expected[:12]}… in {directory / 'config.json'}; restore the file or export the model again"
        )


def check_tokenizer(model_or_dir: MaskedEncoder | str | os.PathLike, store: str | os.PathLike) -> None:
    """Raise InputError (exit 2) when a token store was tokenized differently from the checkpoint."""
    from biomask.store import TokenStore

    if isinstance(model_or_dir, torch.nn.Module):
        config = getattr(model_or_dir, "checkpoint_info", None)
        where = str(getattr(model_or_dir, "checkpoint_dir", "the model"))
        if config is None:
            raise ValueError("check_tokenizer needs a model from load_pretrained (it carries its config)")
    else:
        config, where = read_checkpoint_config(model_or_dir), str(model_or_dir)
    token_store = TokenStore(store)
    theirs = (token_store.manifest.get("tokenizer") or {}).get("sha256")
    ours = config.get("tokenizer", {}).get("sha256")
    if theirs != ours:
        raise InputError(
            f"token store {store} was tokenized with a different tokenizer (sha256 {str(theirs)[:12]}…) than "
            f"checkpoint {where} ({str(ours)[:12]}…); prepare the data with `tokenizer.path={where}/tokenizer`"
        )
