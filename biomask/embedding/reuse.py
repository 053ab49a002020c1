"""What `biomask embed` checks before it embeds, and whether its output already holds the result:
decided without the stage's own imports (torch, anndata, scanpy, matplotlib). A pipeline rerun starts
an embed process of its own, and most of its time went to imports when it had nothing to do; the
stage runs the same checks from here, so both decide alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from biomask.embedding.config import EmbedConfig, non_semantic
from biomask.errors import BiomaskError, InputError
from biomask.outputs import check_inputs_outside
from biomask.provenance import input_entry, sha256_file
from biomask.stage import CONFIG_SHA256, StageOutput, has_run_record

OUTPUT_NAME = "embeddings.h5ad"  # inside a directory output
CELL_FORMATS = ("h5ad",)
TOKEN_FORMATS = ("fasta", "table", "store")  # embedded by embed_tokens


def input_kind(path: Path, fmt: str) -> str:
    """h5ad | fasta | table | store."""
    from biomask.dna.formats import guess_format

    if fmt != "auto":
        return fmt
    if path.name.lower().endswith(".h5ad"):
        return "h5ad"
    if path.is_dir() and (path / "manifest.json").is_file():
        return "store"
    guessed = guess_format(path)
    if guessed in TOKEN_FORMATS:
        return guessed
    if guessed is not None:
        raise InputError(
            f"{path} is {guessed} by its name: `biomask embed` reads an .h5ad (cells), FASTA, a CSV/TSV table "
            "or a token store; convert it to FASTA (or set `format:` if the name misleads)"
        )
    name = path.name.lower()
    cells = (
        "a 10x folder" if path.is_dir() and any(path.glob("matrix.mtx*"))
        else "a loom file" if name.endswith(".loom")
        else "a 10x .h5 file" if name.endswith((".h5", ".hdf5"))
        else None
    )  # fmt: skip
    if cells is not None:  # embed adds obsm to a copy of an .h5ad: these have none to copy
        raise InputError(
            f"{path} is {cells}: `biomask embed` writes the embedding into a copy of an .h5ad. Write it as "
            f"one first: python -c \"import biomask; biomask.read_cells('{path}').write_h5ad('cells.h5ad')\" "
            "(or call biomask.embed(biomask.read_cells(path), checkpoint) in Python)"
        )
    raise InputError(
        f"cannot tell what {path} holds from its name: give an .h5ad (cells), a FASTA (.fa/.fasta[.gz]), "
        "a CSV/TSV table, or a DNA token store — or set `format:`"
    )


def input_modality(path: Path, kind: str) -> str:
    if kind in CELL_FORMATS:
        return "cells"
    if kind == "store":
        from biomask.store import TokenStore

        return TokenStore(path).modality
    return "dna"


def check_modality(checkpoint: str, modality: str, path: Path, kind: str) -> None:
    """A DNA checkpoint given an h5ad, or a cells checkpoint given sequences: a clear error."""
    theirs = input_modality(path, kind)
    if modality == theirs:
        return
    what = {
        "h5ad": "an expression matrix (h5ad)",
        "store": f"a {theirs} token store",
        # a table's content is not read to tell: it is named by what biomask embed takes it for
        "table": "a table, which `biomask embed` reads as DNA sequences",
    }.get(kind, f"DNA sequences ({kind})")
    wanted = (
        "an .h5ad of cells"
        if modality == "cells"
        else "DNA sequences (FASTA, CSV/TSV table, DNA token store)"
    )
    from biomask.cells.formats import table_hint

    # a CSV of counts is read here as DNA sequences: say how a table of cells becomes an .h5ad
    hint = table_hint(path) if modality == "cells" else None
    raise InputError(
        f"checkpoint {checkpoint} is a {modality} model, but {path} is {what}; give it {wanted}, "
        f"or use a {theirs} checkpoint" + (f". If it is a table of cells, {hint}" if hint else "")
    )


def checkpoint_inputs(cfg: EmbedConfig, path: Path) -> list[dict[str, Any]]:
    from biomask.cells.formats import input_checksum

    weights, config = Path(cfg.checkpoint) / "model.safetensors", Path(cfg.checkpoint) / "config.json"
    digest = sha256_file(weights) if weights.is_file() else None
    if path.is_dir():  # a token store: its manifest holds every shard's checksum
        source = input_entry("input", path)
    else:
        source = {"name": "input", "path": str(path), "sha256": input_checksum(path)}
    checkpoint = {
        "name": "checkpoint",
        "path": str(cfg.checkpoint),
        "sha256": digest,
        CONFIG_SHA256: sha256_file(config) if config.is_file() else None,
    }
    return [checkpoint, source]


def _targets(cfg: EmbedConfig) -> tuple[Path, bool]:
    """(the output path, whether it is a directory output)."""
    output = Path(cfg.output).expanduser()
    return output, not output.name.lower().endswith(".h5ad")


def resolve_input(value: str) -> Path:
    """A file or directory, or the name of a registered dataset (fetched and verified)."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    from biomask import datasets

    if value in datasets.registry():
        return datasets.fetch(value)
    raise InputError(
        f"input {path} does not exist, and it is not a registered dataset name (see `biomask datasets list`)"
    )


# The dna.* keys each DNA input reads; a cells input reads none of them.
DNA_KEYS_READ = {
    "fasta": ("window", "stride", "long_records", "strands"),
    "table": ("sequence_column", "label_column", "id_column", "long_records", "strands"),
    "store": ("long_records",),  # tokens already: only how long records are handled applies
}


def _check_dna_keys(cfg: EmbedConfig, path: Path, kind: str, modality: str) -> None:
    """dna.* settings this input does not read are refused, not ignored while `uns` records them (a
    user who set dna.window on a table or an h5ad believes the sequences or cells were windowed)."""
    from biomask.embedding.config import DNASpec

    read = DNA_KEYS_READ.get(kind, ()) if modality == "dna" else ()
    unused = [
        k for k, f in DNASpec.model_fields.items() if getattr(cfg.dna, k) != f.default and k not in read
    ]
    if unused:
        what = {"store": "a token store", "fasta": "a FASTA", "table": "a table", "h5ad": "an h5ad"}.get(
            kind, f"a {kind}"
        )
        raise InputError(
            f"{', '.join('dna.' + k for k in unused)}: not read for {path}, {what} for a {modality} model "
            f"(it reads {', '.join('dna.' + k for k in read) or 'no dna.* key'}); leave "
            f"{'it' if len(unused) == 1 else 'them'} at the default"
        )


def _check_cells_keys(cfg: EmbedConfig, path: Path, modality: str) -> None:
    """The expression keys (matrix, counts.*, genes.*, standardise) on DNA input are refused like unread
    dna.* keys (standardise=data was ignored and recorded)."""
    if modality != "dna":
        return
    fields = EmbedConfig.model_fields
    unused = [
        k
        for k in ("matrix", "counts", "genes", "standardise")
        if getattr(cfg, k) != fields[k].get_default(call_default_factory=True)
    ]
    if unused:
        raise InputError(
            f"{', '.join(unused)}: not read for {path}, DNA sequences for a DNA model (they say how a "
            f"cells .h5ad's expression is read); leave {'it' if len(unused) == 1 else 'them'} at the default"
        )


def check_input_key(path: Path, key: str) -> None:
    """The output is the input with obsm[key]: never over an entry of the input biomask did not write."""
    import h5py

    from biomask.embedding.anndata_io import check_key

    try:
        with h5py.File(path, "r") as handle:
            obsm = handle.get("obsm")
            if isinstance(obsm, h5py.Group):
                keys = set(obsm.keys())
            elif isinstance(obsm, h5py.Dataset):  # anndata < 0.8: one compound dataset, a field per key
                keys = set(obsm.dtype.names or ())
            else:
                keys = set()
            uns = handle["uns"] if isinstance(handle.get("uns"), h5py.Group) else {}
            check_key(key, keys, uns, str(path))
    except OSError:
        return  # not an HDF5 file: the reader names what is wrong with it


def checked(cfg: EmbedConfig) -> tuple[Path, str, str, Path, bool, StageOutput]:
    """Every check on the checkpoint, the input and the output before anything is read or written:
    (the input, its kind, the checkpoint's modality, the .h5ad written, whether the output is a
    directory, the stage's output)."""
    from biomask.models.checkpoint_config import read_checkpoint_config

    path = resolve_input(cfg.input)
    info = read_checkpoint_config(cfg.checkpoint)
    kind = input_kind(path, cfg.format)
    modality = info.get("modality") or (info.get("architecture") or {}).get("modality")
    check_modality(cfg.checkpoint, str(modality), path, kind)
    _check_dna_keys(cfg, path, kind, str(modality))
    _check_cells_keys(cfg, path, str(modality))
    if kind == "h5ad":
        check_input_key(path, cfg.key)
    output, directory = _targets(cfg)
    h5ad = output / OUTPUT_NAME if directory else output
    if not directory:  # a folder output is checked by the stage; a file inside the checkpoint was not
        check_inputs_outside(h5ad, [cfg.checkpoint])
    if h5ad.resolve() == path.resolve() and not cfg.overwrite_input:
        raise InputError(
            f"output {h5ad} is the input file; choose another output, or set overwrite_input: true to add the "
            "embedding to the input itself"
        )
    stage = StageOutput(
        "embed",
        cfg,
        output,
        inputs=checkpoint_inputs(cfg, path),
        non_semantic=non_semantic(cfg, str(modality)),
    )
    return path, kind, str(modality), h5ad, directory, stage


def current(cfg: EmbedConfig) -> Path | None:
    """The embeddings when a directory output holds this config's result on this checkpoint and
    input; None when the stage must decide (no output, another result, a failed check, or an .h5ad
    output, whose record is in the file the stage reads)."""
    output, directory = _targets(cfg)
    if not directory or not has_run_record(output):
        return None
    try:
        from biomask.embedding.anndata_io import changed_embedding  # h5py and numpy only

        _, _, _, h5ad, _, stage = checked(cfg)
        return h5ad if stage.is_current() and not changed_embedding(h5ad, cfg.key) else None
    except (BiomaskError, OSError):
        return None
