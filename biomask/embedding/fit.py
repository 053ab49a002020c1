"""Pretraining on the user's own cells, then embedding them: the scvi-tools pattern in one call.

    import biomask, scanpy as sc
    adata = sc.read_h5ad("my_cells.h5ad")                      # counts in X (or say where they are)
    biomask.fit_cells(adata, "runs/my-cells")                  # minutes on a CPU; labels are not used
    sc.pp.neighbors(adata, use_rep="X_biomask")

    biomask fit-cells --input my_cells.h5ad --output runs/my-cells      # the same from the shell

What it runs, each as the ordinary stage (so every output has its config, checksums and run.json,
and a rerun with the same settings reuses them):
1. `prep cells`: a panel store of these cells — the N most variable genes (`n_top_genes`), zeros
   included; with `init_from`, the checkpoint's frozen panel instead (continued pretraining);
2. `pretrain`: the profile autoencoder (`configs/pretrain/cells-mlp.yaml`'s settings; `overrides`
   change any pretrain key, e.g. `{"train.steps": 3000}`), the masking scheme of your choice;
3. embedding: `adata.obsm[key]` in place (Python), or `<output>/embeddings.h5ad` (the CLI).

Pretraining on the cells you then embed is transductive but label-free (as scVI is): the model never
sees a label. Nothing of the AnnData is modified except `obsm[key]` and `uns[key]`.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from biomask.errors import InputError, OutputExistsError

log = logging.getLogger(__name__)

# The profile autoencoder's shipped settings (what the quick study measures), read from the config file
# so that there is one description of them; its paths are replaced, and its logging made quieter.
PRETRAIN_CONFIG = "configs/pretrain/cells-mlp.yaml"


def pretrain_defaults() -> dict[str, Any]:
    import yaml

    from biomask.resources import shipped_config

    data = yaml.safe_load(shipped_config(PRETRAIN_CONFIG).read_text())
    data.pop("data", None)
    data.pop("output", None)
    data["train"].update({"log_every": 100, "checkpoint_every": 500, "progress": False})
    return data


MIN_CELLS = 20  # fewer cells than this cannot train or validate a model


def _prep_config(
    source: Path,
    store: Path,
    *,
    matrix: str,
    counts: dict[str, Any] | None,
    gene_column: str | None,
    n_top_genes: int,
    init_from: Path | None,
):
    from biomask.cells.config import CellsPrepConfig
    from biomask.config import validate_config

    return validate_config(
        CellsPrepConfig,
        {
            "inputs": [{"path": str(source), "matrix": matrix}],
            "output": str(store),
            "counts": counts or {},
            "genes": {"column": gene_column},
            # the user's own QC stands: keep every cell that has counts, every gene seen once
            "qc": {"min_genes": 0, "min_cells": 1, "zero_count_cells": "drop"},
            "hvg": {"n_top_genes": None if init_from else n_top_genes},
            "tokenizer": {"scheme": "panel", "path": str(init_from / "tokenizer") if init_from else None},
            "split": {"seed": 0, "val": 0.05, "test": 0.0},
        },
        "fit_cells (prep settings)",
    )


def _pretrain_config(store: Path, output: Path, *, init_from: Path | None, overrides: dict[str, Any] | None):
    from biomask.config import apply_overrides, validate_config
    from biomask.store import TokenStore
    from biomask.training.config import PretrainConfig

    data = pretrain_defaults()
    data.update({"data": {"store": str(store)}, "output": str(output)})
    data["train"]["micro_batch_size"] = min(64, len(TokenStore(store).split("train")))
    if init_from is not None:
        data["model"]["init_from"] = str(init_from)
    touched = apply_overrides(data, [f"{k}={v}" for k, v in (overrides or {}).items()])
    return validate_config(PretrainConfig, data, "fit_cells (pretrain settings)", touched)


def fit_cells(
    adata: Any,
    output: str | os.PathLike,
    *,
    matrix: str = "X",
    counts: dict[str, Any] | None = None,
    gene_column: str | None = None,
    n_top_genes: int = 2000,
    masking: str = "r2mae",
    seed: int = 0,
    init_from: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    key: str = "X_biomask",
    overwrite: bool = False,
) -> Path:
    """Pretrain the profile autoencoder on `adata`'s cells and put their embedding in
    `adata.obsm[key]` (in place). Returns the portable checkpoint (`<output>/pretrain/model`), which
    embeds further data in the same space with `biomask.embed`.

    `adata`: an AnnData, or the path of an .h5ad / 10x / loom file. `matrix`, `counts`, `gene_column`:
    where the expression is and what it holds, as for `biomask.embed` (log-normalised only:
    `counts={"mode": "log1p"}`). `init_from`: continue a corpus checkpoint on these cells (its gene
    panel is kept). `masking`: any scheme of `biomask.masking`. Bad input raises `InputError`."""
    from biomask.cells.prep import prep_cells
    from biomask.embedding.api import embed
    from biomask.store import TokenStore
    from biomask.training.trainer import pretrain

    out = Path(output)
    out_existed = out.exists()
    init = Path(init_from) if init_from is not None else None
    if init is not None:  # before anything is written: only a cells panel checkpoint can continue here
        from biomask.models.pretrained import read_checkpoint_config

        info = read_checkpoint_config(init)
        if info.get("modality") != "cells" or info.get("scheme") != "panel":
            what = f"a {info.get('modality')} checkpoint"
            if info.get("modality") == "cells":
                what += f" of the {info.get('scheme')} scheme"
            raise InputError(
                f"init_from {init}: {what}; fit_cells continues a cells checkpoint trained on a gene "
                "panel (a profile model, e.g. configs/pretrain/cells-mlp.yaml's `<run>/model`)"
            )
    if isinstance(adata, (str, os.PathLike)):
        source = Path(adata)
        adata = None
    else:
        if adata.n_obs < MIN_CELLS:
            raise InputError(
                f"fit_cells: the AnnData has {adata.n_obs} cells; at least {MIN_CELLS} are needed"
            )
        source = out / "cells.h5ad"
        if source.exists() and not (out / "store" / "manifest.json").exists():
            raise OutputExistsError(
                f"{source} exists but {out} holds no fit_cells store: it is not fit_cells' copy of the "
                "cells, and would be replaced. Choose another output (or delete the file if an earlier "
                "fit_cells stopped before its store was written)"
            )
        out.mkdir(parents=True, exist_ok=True)
        _write_h5ad(adata, source)
    store = out / "store"
    store_existed = store.exists()
    prep_cells(
        _prep_config(
            source,
            store,
            matrix=matrix,
            counts=counts,
            gene_column=gene_column,
            n_top_genes=n_top_genes,
            init_from=init,
        ),
        overwrite=overwrite,
    )
    n_cells = len(TokenStore(store).split("train"))
    if n_cells < MIN_CELLS:
        # what this call wrote is of no use: nothing is left half-done (nothing else is touched)
        if not out_existed:
            shutil.rmtree(out)
        elif not store_existed:
            shutil.rmtree(store)
        raise InputError(
            f"{source}: {n_cells} cells to train on (cells whose values are all zero are dropped, "
            f"and 5 % are kept for validation); fit_cells needs at least {MIN_CELLS}: give it more cells"
        )
    cfg = _pretrain_config(
        store,
        out / "pretrain",
        init_from=init,
        overrides={"masking.scheme": masking, "train.seed": seed, **(overrides or {})},
    )
    checkpoint = pretrain(cfg, overwrite=overwrite) / "model"
    if adata is not None:
        embed(adata, checkpoint, matrix=matrix, counts=counts, gene_column=gene_column, key=key)
    log.info("fit_cells: checkpoint %s", checkpoint)
    return checkpoint


def _write_h5ad(adata: Any, path: Path) -> None:
    """The AnnData as the prep stage's input, written under a temporary name then renamed; an
    unchanged AnnData is not rewritten (so a rerun reuses every stage)."""
    from biomask.outputs import atomic_file
    from biomask.provenance import sha256_file

    with atomic_file(path) as tmp:
        adata.write_h5ad(tmp)
        if path.exists() and sha256_file(path) == sha256_file(tmp):
            tmp.unlink()  # unchanged: the old file stays


def fit_cells_file(
    path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    umap_color: str | None = None,
    overwrite: bool = False,
    **settings: Any,
) -> Path:
    """`biomask fit-cells`: `fit_cells` on an .h5ad file, then the embed stage streams the file into
    `<output>/embed/embeddings.h5ad` (the input with `obsm["X_biomask"]`; a UMAP PNG when
    `umap_color` names an obs column). Returns that file."""
    from biomask.config import validate_config
    from biomask.embedding.config import EmbedConfig
    from biomask.embedding.stage import run_embed

    source = Path(path)
    if not source.is_file():
        raise InputError(f"{source}: no such file; give the .h5ad of the cells to pretrain on and embed")
    out = Path(output)
    checkpoint = fit_cells(source, out, overwrite=overwrite, **settings)
    column = settings.get("gene_column")
    embed_cfg = validate_config(
        EmbedConfig,
        {
            "checkpoint": str(checkpoint),
            "input": str(source),
            "output": str(out / "embed"),
            "matrix": settings.get("matrix", "X"),
            "counts": settings.get("counts") or {},
            "genes": {"column": column},
            "key": settings.get("key", "X_biomask"),
            "umap": {"color": umap_color},
        },
        "fit-cells (embed settings)",
    )
    return run_embed(embed_cfg, overwrite=overwrite)
