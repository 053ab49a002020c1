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
2. `pretrain`: the profile autoencoder (`configs/pretrain/cells-mlp.yaml`'s settings, or with
   `{"model.kind": "panel_transformer"}` `cells-panel-transformer.yaml`'s; `overrides` change any
   pretrain key, e.g. `{"train.steps": 3000}`), the masking scheme of your choice;
3. embedding: `adata.obsm[key]` in place (Python), or `<output>/embeddings.h5ad` (the CLI).

Pretraining on the cells you then embed is transductive but label-free (as scVI is): the model never
sees a label. Nothing of the AnnData is modified except `obsm[key]` and `uns[key]`. Unlike scVI there is
no `batch_key`: samples keep their technical differences in the embedding (README, "Several samples,
donors or batches": concatenate on shared genes, correct afterwards with Harmony or BBKNN).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from biomask.cells.tokenize import complete_profile
from biomask.errors import BiomaskError, InputError, OutputBusyError, OutputExistsError, StaleOutputError

if TYPE_CHECKING:
    from anndata import AnnData

log = logging.getLogger(__name__)

# Each profile kind's shipped settings (the recipe the README measures), read from its config file so
# that there is one description of them; their paths are replaced, and their logging made quieter.
PRETRAIN_CONFIGS = {
    "mlp": "configs/pretrain/cells-mlp.yaml",
    "panel_transformer": "configs/pretrain/cells-panel-transformer.yaml",
}


def pretrain_defaults(kind: str = "mlp") -> dict[str, Any]:
    import yaml

    from biomask.resources import shipped_config

    data = yaml.safe_load(
        shipped_config(PRETRAIN_CONFIGS.get(kind, PRETRAIN_CONFIGS["mlp"])).read_text(encoding="utf-8")
    )
    data.pop("data", None)
    data.pop("output", None)
    # progress: a bar on a terminal, else a line per 100 steps (a notebook sees its run move)
    data["train"].update({"log_every": 100, "checkpoint_every": 500, "progress": True})
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
    strip_version: bool = False,
    batch_key: str | None = None,
    duplicates: str = "sum",
    memory: dict[str, Any] | None = None,
):
    from biomask.cells.config import CellsPrepConfig
    from biomask.config import validate_config

    memory = memory or {}
    return validate_config(
        CellsPrepConfig,
        {
            **({"block_size": memory["block_size"]} if "block_size" in memory else {}),
            "inputs": [{"path": str(source), "matrix": matrix}],
            "output": str(store),
            "counts": counts or {},
            "genes": {"column": gene_column, "strip_version": strip_version, "duplicates": duplicates},
            # the user's own QC stands: keep every cell that has counts, every gene seen once
            "qc": {"min_genes": 0, "min_cells": 1, "zero_count_cells": "drop"},
            "hvg": {
                "n_top_genes": None if init_from else n_top_genes,
                **({"max_cells": memory["hvg.max_cells"]} if "hvg.max_cells" in memory else {}),
            },
            "tokenizer": {"scheme": "panel", "path": str(init_from / "tokenizer") if init_from else None},
            "split": {"seed": 0, "val": 0.05, "test": 0.0},
            "batch_column": batch_key,
        },
        "fit_cells (prep settings)",
    )


def _pretrain_config(
    store: Path,
    output: Path,
    *,
    init_from: Path | None,
    overrides: dict[str, Any] | None,
    n_train: int | None = None,
):
    """The pretrain config; `n_train` (the store's training cells) caps the batch. Without it (before
    the store exists) the settings are only validated, so a typo fails before anything is written."""
    from biomask.config import apply_overrides, validate_config
    from biomask.training.config import PretrainConfig

    # a continued checkpoint's weights fix its kind and loss (said in the config, so the checks see
    # them); the recipe is that kind's, else the one asked for
    fixed = (
        {k: v for k, v in _checkpoint_model(init_from).items() if k in ("kind", "loss")} if init_from else {}
    )
    parsed = _parsed(overrides)
    data = pretrain_defaults(str(fixed.get("kind") or parsed.get("model.kind") or "mlp"))
    data["model"].update(fixed)
    if n_train is not None:
        data["train"]["micro_batch_size"] = min(data["train"]["micro_batch_size"], n_train)
    # key by key, so that a section given whole (`model={dropout: 0.1}`) adds to the recipe's rather
    # than replacing it and what fit_cells sets within it (model.init_from)
    touched = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in parsed.items()])
    # what fit_cells decides itself comes last (an override of it is refused before this)
    data.update({"data": {"store": str(store)}, "output": str(output)})
    if init_from is not None:
        data["model"]["init_from"] = str(init_from)
    return validate_config(
        PretrainConfig,
        data,
        "fit_cells (pretrain settings)",
        touched,
        "by overrides=, or a fit-cells KEY=VALUE",
    )


PANEL_GENES = 2000  # fit_cells' panel without init_from: the n most variable genes
# prep settings an override may lower on a small machine (the HVG sample scanpy holds, the cells read
# at a time); every other override is a pretrain key
PREP_MEMORY_KEYS = ("hvg.max_cells", "block_size")


def _prep_key(key: str) -> bool:
    """Whether an override key (dotted, or a section) is the prep's, not pretrain's."""
    return key == "block_size" or key.split(".", 1)[0] == "hvg"


@contextlib.contextmanager
def _as_a_library() -> Iterator[None]:
    """Pretraining inside the caller's process leaves it as it found it: torch's distributed
    excepthook, the warnings filters and the DeepSpeed logger level the trainer sets. The torch
    process group a one-process run starts is destroyed by the run itself (`release_group`), inside
    its turn; a group the host started first is adopted and left to it."""
    import logging as _logging
    import sys
    import warnings

    hook = sys.excepthook
    speed = _logging.getLogger("DeepSpeed")
    level = speed.level
    try:
        with warnings.catch_warnings():
            yield
    finally:
        speed.setLevel(level)
        sys.excepthook = hook


def _parsed(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The overrides as the pretrain config reads them, flat: `model.kind='mlp'` (the CLI's text) is
    `mlp` and `model={kind: mlp}` is `model.kind`, so fit_cells decides on what will be trained, not on
    how it was written."""
    from biomask.config import apply_overrides, flatten

    data: dict[str, Any] = {}
    apply_overrides(data, [f"{k}={v}" for k, v in (overrides or {}).items()])
    return flatten(data)


def fit_cells(
    adata: AnnData | str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    matrix: str = "X",
    layer: str | None = None,
    counts: dict[str, Any] | None = None,
    gene_column: str | None = None,
    strip_version: bool = False,
    batch_key: str | None = None,
    duplicates: Literal["sum", "first", "error"] = "sum",
    n_top_genes: int | None = None,
    masking: str = "r2mae",
    seed: int = 0,
    init_from: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    key: str = "X_biomask",
    overwrite: bool = False,
    copy: bool = False,
) -> Path | AnnData:
    """Pretrain the profile autoencoder on `adata`'s cells and put their embedding in
    `adata.obsm[key]` (in place). Returns the portable checkpoint (`<output>/pretrain/model`), which
    embeds further data in the same space with `biomask.embed`; with `copy=True`, `adata` is left as
    it is and a copy holding the embedding is returned (the checkpoint: its `uns[key]["checkpoint"]`).

    `adata`: an AnnData, or the path of an .h5ad / 10x / loom file (then only pretrained: embed it
    with `biomask.embed`). `matrix`, `counts`, `gene_column`:
    where the expression is and what it holds, as for `biomask.embed` (log-normalised only:
    `counts={"mode": "log1p"}`); `layer`: scanpy's and scvi-tools' way to name an AnnData layer
    (`layer="counts"` is `matrix="layers/counts"`); `strip_version`: Ensembl IDs' `.N` suffixes dropped (ENSG….4 →
    ENSG…), to match a checkpoint of unversioned IDs. `batch_key`: an obs column naming each cell's
    sample or batch; the decoder reads it (scVI's covariate, `model.batch_covariate`) so that the
    embedding need not separate the batches; the encoder does not, so the checkpoint embeds cells of
    any batch. `duplicates`: columns of one gene name are summed ("sum"), reduced to the first
    ("first") or refused ("error"). `init_from`: continue a corpus checkpoint on these cells (its
    gene panel is kept). `n_top_genes`: the panel, this many most variable genes (default 2,000; not
    with `init_from`, whose panel is kept). `masking`: any scheme of `biomask.masking`. `seed`: the
    pretraining seed. `overrides`: any pretrain config key (`{"train.steps": 3000}`; docs/config-
    reference.md), but not those fit_cells sets itself (output, data, model.init_from);
    `{"train.progress": False}` silences the progress lines. On a small machine, also the prep's
    `hvg.max_cells` (the cells scanpy's HVG selection holds, 50,000: about 40 bytes per stored value
    of them; not with `init_from`, which selects no genes) and `block_size` (cells read at a time).
    `key`: the obsm key (its record of checkpoint, pooling and settings goes to `uns[key]`). `overwrite`: replace what an earlier call
    of other settings wrote under `output`.

    On disk, under `output`: `cells.h5ad` (an in-memory AnnData's copy, which prep reads), `store/`
    (the token store) and `pretrain/` (the run, with the checkpoint in `pretrain/model`). The same
    call again reuses them.

    Raises `biomask.errors.InputError` for bad input, naming the argument. Ctrl-C during training
    (Jupyter's "Interrupt kernel") checkpoints and raises `biomask.errors.Interrupted`, a
    KeyboardInterrupt: a loop over samples with `except Exception` stops there; the same call
    resumes. A SIGTERM checkpoints and raises `biomask.errors.Requeue`. The torch process group a one-process run starts is
    destroyed when the call returns, so other torch code in the session (Lightning, scvi-tools) does
    not see a distributed run; a host that needs its own group starts it before calling, and biomask
    uses that one and leaves it."""
    if layer is not None:  # scvi-tools' setup_anndata(layer=...): one spelling of matrix=
        if not isinstance(layer, str) or not layer:
            raise InputError(
                f"fit_cells: layer names an AnnData layer (a string, e.g. 'counts'), not {layer!r}"
            )
        if matrix != "X":
            raise InputError(
                f"fit_cells: layer={layer!r} and matrix={matrix!r} both say where the counts are: give one "
                f"(layer={layer!r} is matrix='layers/{layer}')"
            )
        matrix, layer = f"layers/{layer}", None
    if isinstance(adata, (str, os.PathLike)):
        adata = Path(adata).expanduser()
    if copy:  # scanpy's convention: the caller's object untouched, the result returned
        if isinstance(adata, (str, os.PathLike)):
            raise InputError(
                "fit_cells: copy=True returns an AnnData with the embedding, so give an AnnData (a path is "
                "pretrained only: embed it with biomask.embed)"
            )
        settings = dict(locals())
        del settings["copy"]
        own = adata.to_memory() if getattr(adata, "isbacked", False) else adata.copy()
        fit_cells(**{**settings, "adata": own})
        return own
    from biomask.cells.prep import prep_cells
    from biomask.embedding.api import DUPLICATES, embed, renamed_in_logs
    from biomask.outputs import hold_output
    from biomask.stage import RECOMPUTE_HINT
    from biomask.store import TokenStore
    from biomask.training.trainer import pretrain

    # what fit_cells decides itself: overridden, the model would train on other cells or land elsewhere
    own = {
        "output": "output",
        "data.store": "the cells given",
        "model.init_from": "init_from",
        "data": "the cells given",
    }
    parsed = _parsed(overrides)  # a typo's message comes later, from the pretrain config's checks
    owner = {key: own[k] for key in parsed for k in own if key == k or key.startswith(f"{k}.")}
    taken = sorted(owner)
    if taken:
        raise InputError(
            f"fit_cells: {', '.join(taken)} cannot be overridden (fit_cells sets "
            f"{', '.join(sorted(set(owner.values())))}); "
            "to pretrain on another store use `biomask pretrain`, to continue a checkpoint pass init_from="
        )
    out = Path(output).expanduser()
    out_existed = out.exists()
    init = Path(init_from).expanduser() if init_from is not None else None
    if init is not None:  # before anything is written: only an intact cells panel checkpoint continues here
        if n_top_genes is not None:  # it would be ignored: the weights are of the checkpoint's panel
            raise InputError(
                f"n_top_genes={n_top_genes} with init_from {init}: a continued model keeps its checkpoint's "
                "gene panel (its weights are of those genes). Leave n_top_genes out, or train a new model "
                "without init_from"
            )
        _check_init_from(init)
        kind = _checkpoint_model(init).get("kind")
        asked = parsed.get("model.kind")
        if asked is not None and asked != kind:
            raise InputError(
                f"init_from {init} is a {kind} model, and its weights fix the kind: model.kind={asked} "
                "cannot continue it. Leave model.kind out (the checkpoint's own recipe is used), or train "
                "a new model without init_from"
            )
    # a backed AnnData is read from its file, as a path is, and still gets its embedding in place
    backed = bool(getattr(adata, "isbacked", False))
    if backed and getattr(adata, "is_view", False):  # its file holds every cell, the view some
        raise InputError(
            "fit_cells: a view of a backed AnnData (adata[...] of read_h5ad(..., backed='r')); the cells "
            "are read from its file, which holds them all. Load the subset (view.to_memory()) or write "
            "it as its own .h5ad"
        )
    in_memory = not isinstance(adata, (str, os.PathLike)) and not backed
    from biomask.masking.config import SCHEMES

    if duplicates not in DUPLICATES:  # named as the argument it is, not as genes.duplicates
        raise InputError(
            f"duplicates={duplicates!r} (fit-cells: --duplicates) is not one of {', '.join(DUPLICATES)}"
        )
    if masking not in SCHEMES:  # named as the argument it is, not as a pretrain key
        raise InputError(
            f"masking={masking!r} (fit-cells: --masking) is not a masking scheme; schemes: {', '.join(SCHEMES)}"
        )
    source = out / COPY_NAME if in_memory else Path(adata.filename if backed else adata)
    from biomask.cells.readers import check_matrix_name

    # named as the argument, not as the prep config's inputs.0.matrix
    check_matrix_name(matrix, None if isinstance(adata, (str, os.PathLike)) else list(adata.layers))
    if not isinstance(adata, (str, os.PathLike)):  # before training: the key the embedding will take
        from biomask.embedding.anndata_io import check_key

        check_key(key, adata.obsm.keys(), adata.uns, "the AnnData")
    store = out / "store"
    refuse_foreign(out, ["store", "pretrain"])
    # the prep's memory keys however written (hvg.max_cells=..., hvg={max_cells: ...}); the rest is
    # pretrain's
    memory = {k: parsed[k] for k in PREP_MEMORY_KEYS if k in parsed}
    other_prep = sorted(k for k in parsed if _prep_key(k) and k not in PREP_MEMORY_KEYS)
    if other_prep:
        raise InputError(
            f"fit_cells: {', '.join(other_prep)} is not a setting fit_cells takes; of the prep's it takes "
            f"{' and '.join(PREP_MEMORY_KEYS)} (memory), and n_top_genes= (fit-cells: --n-top-genes) for the panel"
        )
    if init is not None and "hvg.max_cells" in memory:  # no HVG selection runs: it would change nothing
        raise InputError(
            f"hvg.max_cells={memory['hvg.max_cells']} with init_from {init}: a continued model keeps its "
            "checkpoint's gene panel, so no genes are selected and no sample is held. Leave it out"
        )
    settings = {
        "masking.scheme": masking,
        "train.seed": seed,
        **{k: v for k, v in (overrides or {}).items() if not _prep_key(k)},
    }
    if batch_key is not None:  # the key is why a batch column is given: the decoder reads it
        settings.setdefault("model.batch_covariate", True)
    # every setting checked before anything is written: a typo costs nothing
    panel = PANEL_GENES if n_top_genes is None else n_top_genes
    prep_config = functools.partial(
        _prep_config, source, store, matrix=matrix, counts=counts, n_top_genes=panel, init_from=init,
        strip_version=strip_version, batch_key=batch_key, duplicates=duplicates, memory=memory,
    )  # fmt: skip
    prep_cfg = prep_config(gene_column=gene_column)
    try:
        first = _pretrain_config(store, out / "pretrain", init_from=init, overrides=settings)
    except BiomaskError as exc:  # a near miss of the prep keys reads as an unknown pretrain key
        if "unknown key" in str(exc):
            exc.args = (f"{exc} (fit_cells also takes the prep's {' and '.join(PREP_MEMORY_KEYS)})",)
        raise
    if first.model.loss != "mse" and prep_cfg.counts.mode in ("log1p", "normalised"):
        raise InputError(
            f"fit_cells: model.loss={first.model.loss} needs raw counts and each cell's library size, but "
            f"counts.mode={prep_cfg.counts.mode} takes normalised values as they are. Give counts "
            "(counts mode require), or rebuild them (counts={'mode': 'from_log1p', 'total_counts_column': "
            "...}), or keep model.loss=mse"
        )
    if not in_memory:  # a file: too few cells said before prep writes a store (and warns of its splits)
        from biomask.cells.readers import open_matrix

        opened = open_matrix(source, matrix=matrix)
        n_obs = opened.n_obs
        opened.close()
        if n_obs < MIN_CELLS:
            raise InputError(f"fit_cells: {source} has {n_obs} cells; at least {MIN_CELLS} are needed")
    if in_memory and init is not None and gene_column is None:
        # the copy prep reads holds the gene column only, so the search prep and embed make among
        # the var columns is made here, on the user's AnnData
        found = _matching_column(adata, prep_cfg, matrix)
        if found is not None:
            gene_column = found
            prep_cfg = prep_config(gene_column=gene_column)
    if in_memory:
        _check_anndata(adata, prep_cfg, matrix, gene_column)
        if source.exists() and not _is_our_copy(source, store):
            raise OutputExistsError(
                f"{source} exists and is not fit_cells' copy of the cells, and would be replaced. Choose "
                "another output"
            )
    # one call at a time into `out`: a second (another kernel, a script, a thread) would prepare and
    # train over this one's files, and its clean-up after a refusal would remove the store this one
    # trains from. Refused here, before it writes anything
    from biomask.cells.genes import DUPLICATE_GENES

    held = hold_output(out, "fit_cells")
    # prep and embed each read the cells' genes: their duplicate-gene warning is said once a call
    genes_log = logging.getLogger("biomask.cells.genes")
    said_once = _SaidOnce(DUPLICATE_GENES)
    genes_log.addFilter(said_once)
    import torch

    from biomask.resources import honour_omp_threads

    # the caller's torch thread count, given back at the end; prep's numba sets every core in between,
    # and pretraining and the embedding run on $OMP_NUM_THREADS's
    threads = torch.get_num_threads()
    try:
        store_existed = store.exists()
        copy_existed = source.exists()

        def undo() -> None:
            """Remove what this call wrote (never a folder or file it found), for a retry to start clean."""
            if not out_existed:
                shutil.rmtree(out, ignore_errors=True)
                return
            if not store_existed:
                shutil.rmtree(store, ignore_errors=True)
                if in_memory and not copy_existed:
                    source.unlink(missing_ok=True)

        def rename(message: str) -> str:
            # fit_cells' overwrite replaces only an output of other settings, not one of the same settings
            # that other code wrote (reused with a warning): starting afresh recomputes that
            message = message.replace(
                RECOMPUTE_HINT,
                f"to recompute it with this code, remove {out} (or choose another output) and run again",
            )
            if in_memory:  # name the user's AnnData, not the copy made for the prep stage
                message = message.replace(f"{source} ", "AnnData ").replace(str(source), "AnnData")
            return fit_cells_names(message)

        # the copy a refused call replaced comes back (else the store beside it no longer matches its input)
        previous = source.with_name(f".{source.name}.previous")
        try:
            if in_memory:
                out.mkdir(parents=True, exist_ok=True)
                if copy_existed:
                    previous.unlink(missing_ok=True)
                    os.link(source, previous)  # the old file stays reachable when the copy is replaced
                _write_copy(adata, source, prep_cfg, matrix, gene_column)
            with renamed_in_logs(rename):  # its warnings too (duplicate genes, duplicate cell ids)
                _stage(prep_cells, prep_cfg, overwrite)
            prepared = TokenStore(store)
            n_cells = len(prepared.split("train"))
            # the 20 counts the cells kept (train and validation alike), as the check before prep does
            n_kept = sum(len(prepared.split(name)) for name in prepared.splits)
            if n_kept < MIN_CELLS:
                raise InputError(
                    f"{'the AnnData' if in_memory else source}: {n_kept} cells kept (cells whose values are "
                    f"all zero are dropped); fit_cells needs at least {MIN_CELLS}: give it more cells"
                )
        except BiomaskError as exc:
            if in_memory and copy_existed and previous.exists():
                os.replace(previous, source)
            undo()  # bad input: nothing half-done is left (interrupts keep what they wrote, to resume)
            message = rename(str(exc))
            if isinstance(exc, StaleOutputError) and "overwrite=True" not in message:
                message += " (biomask.fit_cells: overwrite=True; biomask fit-cells: --overwrite)"
            exc.args = (message,)
            raise
        finally:
            if in_memory and copy_existed:  # the link this call made (a refusal has put it back already)
                previous.unlink(missing_ok=True)
        cfg = _pretrain_config(store, out / "pretrain", init_from=init, overrides=settings, n_train=n_cells)
        pretrain_existed = (out / "pretrain").exists()
        from biomask.training.finite import DivergedError  # torch: imported when training

        try:
            with renamed_in_logs(rename), _as_a_library():
                checkpoint = _stage(functools.partial(pretrain, release_group=True), cfg, overwrite) / "model"
        except OutputBusyError:  # another run's files, not this call's: nothing to undo
            raise
        except DivergedError as exc:
            # not bad input: a run that went wrong late keeps its checkpoints (its message says so),
            # and the way on is said as a Python caller takes it
            exc.args = (
                str(exc).replace(
                    "then rerun with --overwrite",
                    "then call again with overwrite=True (overrides={'optim.lr': ...}; biomask fit-cells: "
                    "--overwrite)",
                ),
            )
            raise
        except (
            InputError
        ) as exc:  # bad input found by pretraining's own checks: as above, a retry starts clean
            if not pretrain_existed:
                shutil.rmtree(out / "pretrain", ignore_errors=True)
            undo()
            if isinstance(exc, StaleOutputError) and "overwrite=True" not in str(exc):
                exc.args = (f"{exc} (biomask.fit_cells: overwrite=True; biomask fit-cells: --overwrite)",)
            raise
        if in_memory or backed:
            honour_omp_threads()  # pretraining gave back the count it found, prep's numba's
            embed(
                adata, checkpoint, matrix=matrix, counts=counts,
                gene_column=gene_column if gene_column is not None else column_prep_chose(store),
                strip_version=strip_version, duplicates=duplicates, key=key,
            )  # fmt: skip
        log.info("fit_cells: checkpoint %s", checkpoint)
        return checkpoint
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        genes_log.removeFilter(said_once)
        if held is not None:
            held.release()


class _SaidOnce(logging.Filter):
    """Lets through the first record whose message holds `phrase`, and no later one."""

    def __init__(self, phrase: str) -> None:
        super().__init__()
        self.phrase, self.said = phrase, False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.phrase not in record.getMessage():
            return True
        said, self.said = self.said, True
        return not said


def fit_cells_names(message: str) -> str:
    """A prep or embed message with the settings named as fit_cells has them (a prep key would be
    refused as unknown there)."""
    message = message.replace("genes.column", "the gene column (gene_column=; fit-cells: --gene-column)")
    message = message.replace("genes.strip_version", "strip_version=True (fit-cells: --strip-version)")
    message = message.replace("batch_column", "batch_key= (fit-cells: --batch-key)")
    # fit_cells' only QC is dropping cells with no values (nothing to embed): no threshold to change
    message = message.replace(" by qc.zero_count_cells drop", " whose values are all zero")
    message = message.replace(
        "Check these thresholds suit these cells (a config's are set for its own data); null turns a filter "
        "off (e.g. qc.max_genes=null)",
        "fit_cells drops only cells whose values are all zero (they have no profile to learn from or embed)",
    )
    return message.replace("genes.duplicates", "duplicates= (fit-cells: --duplicates)")


def refuse_foreign(out: Path, parts: list[str]) -> None:
    """Before anything is written: each folder this call writes under `out` is absent, empty or
    biomask's own. Found later, a folder of the user's would stop the call after preparing and
    training, with their outputs left beside it (and --overwrite never replaces what biomask did not
    write, so it is no way out)."""
    from biomask.provenance import read_run_info, written_by_biomask
    from biomask.training.rundir import IN_PROGRESS

    for part in parts:
        path = out / part
        if not path.exists():
            continue
        ours = path.is_dir() and (
            not any(path.iterdir())
            or written_by_biomask(read_run_info(path))
            or (path / IN_PROGRESS).is_file()
        )
        if not ours:
            raise OutputExistsError(
                f"{path} exists and was not written by biomask: fit_cells writes {', '.join(p + '/' for p in parts)} "
                f"in {out}. Choose another output folder, or move {path} away"
            )


def _stage(run: Any, cfg: Any, overwrite: bool) -> Path:
    """One stage of the call: its output reused when it holds this very result, replaced (with
    `overwrite`) only when it does not — a changed training setting does not prepare the cells
    again, and a changed embedding setting neither prepares nor trains again."""
    try:
        return run(cfg, overwrite=False)
    except StaleOutputError:  # its own output of other settings (anything else is never replaced)
        if not overwrite:
            raise
        return run(cfg, overwrite=True)


COPY_NAME = "cells.h5ad"
COPY_MARK = "biomask_fit_cells"  # uns key of the copy: what marks the file as fit_cells' own


def _checkpoint_model(init: Path) -> dict[str, Any]:
    from biomask.models.pretrained import read_checkpoint_config

    return dict(read_checkpoint_config(init).get("architecture") or {})


def _check_init_from(init: Path) -> None:
    from biomask.models.pretrained import load_pretrained, read_checkpoint_config

    info = read_checkpoint_config(init)
    # fit_cells prepares the cells with the panel scheme itself: a scheme built on the panel (other
    # values) would be continued on the panel's log1p values and refuse its own output afterwards
    if info.get("modality") != "cells" or info.get("scheme") != "panel":
        what = f"a {info.get('modality')} checkpoint"
        if info.get("modality") == "cells":
            what += f" of the {info.get('scheme')} scheme"
        other = (
            ": continue it with `biomask prep cells` (tokenizer.path=<checkpoint>/tokenizer, its scheme) and "
            "`biomask pretrain model.init_from=<checkpoint>`"
            if info.get("modality") == "cells" and complete_profile(info.get("scheme"))
            else ""
        )
        raise InputError(
            f"init_from {init}: {what}; fit_cells continues a cells checkpoint trained on a gene "
            f"panel (the panel scheme; a profile model, e.g. configs/pretrain/cells-mlp.yaml's `<run>/model`){other}"
        )
    # weights, tokenizer and panel checked against their digests now, not after the prep they would waste
    load_pretrained(init)


def column_prep_chose(store: Path) -> str | None:
    """The var column prep read the cells' genes from where it chose one itself (a frozen vocabulary
    the var index covers too little of: `coverage.gene_column` in its manifest), for the embedding
    to read the same: trained on the column, the cells were embedded from the index (3 of 765 genes,
    exit 0)."""
    try:
        manifest = json.loads((store / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    chosen = {
        found.get("gene_column")
        for found in (manifest.get("coverage") or {}).values()
        if isinstance(found, dict)
    }
    chosen.discard(None)
    return chosen.pop() if len(chosen) == 1 and "var index" not in chosen else None


def _matching_column(adata: Any, prep_cfg: Any, matrix: str) -> str | None:
    """With init_from and no gene_column: the var column whose identifiers the checkpoint's
    vocabulary matches, where the var index covers less than min_coverage of it (None: the index),
    chosen and said as `biomask.embed` does. An AnnData of Ensembl IDs with symbols in a column was
    refused here and embedded by `biomask.embed`."""
    import pandas as pd

    from biomask.cells.genes import (
        GeneVocabulary,
        check_orientation,
        identifier_hint,
        match_genes,
        no_overlap_reason,
    )
    from biomask.cells.readers import from_anndata
    from biomask.embedding.api import renamed_in_logs

    source = from_anndata(adata, matrix, name="AnnData")
    check_orientation(source)
    vocab = GeneVocabulary.load(prep_cfg.tokenizer.path)
    strip = prep_cfg.genes.strip_version
    with renamed_in_logs(fit_cells_names):
        match = match_genes(
            source, vocab, None, strip, search=True, min_coverage=prep_cfg.tokenizer.min_coverage
        )
    if match.found["vocab_genes_present"] == 0:
        # said here, where the user's var columns are: prep reads a copy that holds the gene column
        # only, so its message listed none
        ours = ", ".join(str(n) for n in pd.unique(match.names[match.names != ""])[:3])
        raise InputError(
            fit_cells_names(
                f"AnnData: none of its {match.found['dataset_genes']:,} genes (e.g. {ours}) is in the "
                f"checkpoint's gene vocabulary (e.g. {', '.join(vocab.genes[:3])}); "
                + no_overlap_reason(
                    source,
                    vocab,
                    match,
                    identifier_hint(source, vocab, match, strip),
                    instead="train a model on these cells (fit_cells without init_from)",
                )
            )
        )
    return match.column


def _check_anndata(adata: Any, prep_cfg: Any, matrix: str, gene_column: str | None) -> None:
    """What prep would refuse, found on the AnnData itself (named as such) before a copy is written:
    too few cells, a missing matrix or gene column, values the counts policy cannot use."""
    import pandas as pd

    from biomask.cells.counts import check_policy, detect, total_counts
    from biomask.cells.genes import check_orientation, gene_names
    from biomask.cells.readers import from_anndata

    if adata.n_obs < MIN_CELLS:
        raise InputError(f"fit_cells: the AnnData has {adata.n_obs} cells; at least {MIN_CELLS} are needed")
    source = from_anndata(adata, matrix, name="AnnData")
    check_orientation(source)
    try:
        gene_names(source, gene_column, prep_cfg.genes.strip_version)
    except InputError as exc:
        raise InputError(f"{exc} (fit_cells: the `gene_column=` argument)") from None
    # named here, on the user's obs: prep reads a copy holding only the columns it needs, so its own
    # message listed the copy's ("obs columns: none")
    batch = prep_cfg.batch_column
    if batch is not None and batch not in adata.obs.columns:
        raise InputError(
            f"AnnData: obs has no column {batch!r} (batch_key=); obs columns: "
            f"{', '.join(map(str, adata.obs.columns)) or 'none'}"
        )
    totals = prep_cfg.counts.total_counts_column
    if totals is not None and totals in adata.obs and not pd.api.types.is_numeric_dtype(adata.obs[totals]):
        raise InputError(
            f"AnnData: obs column {totals!r} (counts.total_counts_column) is not numeric "
            f"({adata.obs[totals].dtype}); it must hold each cell's total counts"
        )
    check_policy(source, detect(source, prep_cfg.counts, prep_cfg.block_size), prep_cfg.counts)
    if totals is not None:  # after the policy: a mode copied from other data is the first thing to say
        total_counts(source, totals, prep_cfg.counts.mode)


def _is_marked(path: Path) -> bool | None:
    """Whether an .h5ad carries fit_cells' mark (None: not HDF5 at all, so not ours)."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return f"uns/{COPY_MARK}" in handle
    except OSError:
        return None


def _is_our_copy(path: Path, store: Path) -> bool:
    """fit_cells' copy carries its mark in uns (copies written before the mark: a store beside it)."""
    marked = _is_marked(path)
    return marked is not None and (marked or (store / "manifest.json").exists())


def _as_csr(values: Any, rows: int = 4096) -> Any:
    """A dense matrix as CSR, converted in row blocks: most counts are zeros, so a dense AnnData (read
    from a CSV, say) costs a tenth of the disk, and the conversion never holds a second dense copy."""
    import numpy as np
    import scipy.sparse as sp

    if not isinstance(values, np.ndarray) or values.ndim != 2:
        return values  # sparse already (or backed / something anndata writes as it is)
    blocks = [sp.csr_matrix(values[i : i + rows]) for i in range(0, values.shape[0], rows)]
    return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix(values.shape, dtype=values.dtype)


def _stored_dense(path: Path) -> bool:
    """Whether fit_cells' copy at `path` holds its matrix dense, as copies written before 2026-12-06 did
    for a dense AnnData: kept so, the same call still reuses the stages that read it."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            mark = handle.get(f"uns/{COPY_MARK}")
            if mark is None:
                return False
            for name in ("X", "raw/X", *(f"layers/{key}" for key in handle.get("layers", {}))):
                if name in handle:
                    return isinstance(handle[name], h5py.Dataset)
    except OSError:
        return False
    return False


def _write_copy(adata: Any, path: Path, prep_cfg: Any, matrix: str, gene_column: str | None) -> None:
    """What the prep stage reads of the AnnData — the one matrix, the gene identifiers, the totals
    column the counts policy names — as an .h5ad, under a temporary name then renamed. Nothing else
    (other layers, obsm, uns, obs columns) is copied: a large atlas costs one matrix of disk, and an
    obs column h5py cannot store does not matter. An unchanged copy is not rewritten (a rerun reuses
    every stage)."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from biomask.cells.genes import gene_names
    from biomask.cells.readers import from_anndata
    from biomask.outputs import atomic_file
    from biomask.provenance import sha256_file

    if path.exists() and not _is_marked(path):
        # fit_cells of before 2026-12-05 copied the whole AnnData: keep doing so for such an output, so
        # that the same call still reuses every stage it wrote (a slim copy would be new input to prep)
        with atomic_file(path) as tmp:
            adata.write_h5ad(tmp)
            if sha256_file(path) == sha256_file(tmp):
                tmp.unlink()
        return
    source = from_anndata(adata, matrix, name="AnnData")
    keep = [c for c in [prep_cfg.counts.total_counts_column] if c is not None and c in adata.obs]
    obs = pd.DataFrame(adata.obs[keep].to_numpy(), index=adata.obs_names.astype(str), columns=keep)
    obs = obs.astype({c: "float64" for c in keep})
    batch = prep_cfg.batch_column
    if batch is not None and batch in adata.obs and batch not in keep:  # as text: any dtype stores
        values = adata.obs[batch]
        obs[batch] = np.where(values.isna().to_numpy(), "", values.astype(str).to_numpy())
    var_keep = [gene_column] if gene_column is not None else []
    # the identifiers as prep reads them (gene_names: a missing one is "", not "None")
    var = pd.DataFrame(
        {c: list(gene_names(source, c, False)) for c in var_keep}, index=source.var.index.astype(str)
    )
    values = {"X": adata.X, "raw": adata.raw.X if adata.raw is not None else None}.get(matrix)
    if matrix not in ("X", "raw"):
        values = adata.layers[matrix.split("/", 1)[1]]
    if not (path.exists() and _stored_dense(path)):  # a dense copy of an earlier version stays as it was
        values = _as_csr(values)
    if matrix == "raw":
        copy = ad.AnnData(obs=obs, var=pd.DataFrame(index=adata.var_names.astype(str)))
        copy.raw = ad.AnnData(X=values, obs=obs, var=var)
    elif matrix == "X":
        copy = ad.AnnData(X=values, obs=obs, var=var)
    else:
        layer = matrix.split("/", 1)[1]
        copy = ad.AnnData(obs=obs, var=var, layers={layer: values})
    copy.uns[COPY_MARK] = {"matrix": matrix, "note": "the cells fit_cells trained on (prep's input)"}
    with atomic_file(path) as tmp:
        copy.write_h5ad(tmp)
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
    from biomask.cells.formats import table_hint
    from biomask.cells.readers import open_matrix
    from biomask.config import validate_config
    from biomask.embedding.api import renamed_in_logs
    from biomask.embedding.config import EmbedConfig
    from biomask.embedding.reuse import check_input_key
    from biomask.embedding.stage import run_embed

    source = Path(path).expanduser()
    if not source.is_file() or not source.name.lower().endswith(".h5ad"):
        what = "no such file" if not source.exists() else "not an .h5ad file"
        hint = table_hint(source) if source.exists() else None
        raise InputError(
            f"{source}: {what}; `biomask fit-cells` reads the .h5ad of the cells to pretrain on and embed. "
            + (
                f"For a CSV/TSV: {hint}"
                if hint
                else 'For a 10x folder or .h5 or a .loom file, write it as .h5ad first: python -c "import biomask; '
                f"biomask.read_cells('{source}').write_h5ad('cells.h5ad')\" (or call biomask.fit_cells on it in Python)"
            )
        )
    out = Path(output).expanduser()
    column = settings.get("gene_column")
    embed_cfg = validate_config(  # checked before anything is written: a typo costs no training
        EmbedConfig,
        {
            "checkpoint": str(out / "pretrain" / "model"),
            "input": str(source),
            "output": str(out / "embed"),
            "matrix": settings.get("matrix", "X"),
            "counts": settings.get("counts") or {},
            "genes": {
                "column": column,
                "strip_version": settings.get("strip_version", False),
                "duplicates": settings.get("duplicates", "sum"),
            },
            "key": settings.get("key", "X_biomask"),
            "umap": {"color": umap_color},
        },
        "fit-cells (embed settings)",
    )
    if umap_color is not None:
        matrix = open_matrix(source, "h5ad", embed_cfg.matrix)
        try:
            columns = [str(c) for c in matrix.obs.columns]
        finally:
            matrix.close()
        if umap_color not in columns:
            raise InputError(
                f"{source}: obs has no column {umap_color!r} to colour the UMAP by (--umap-color); "
                f"obs columns: {', '.join(columns) or 'none'}"
            )
    check_input_key(source, embed_cfg.key)  # the embedding's key in the output copy, before training
    refuse_foreign(out, ["store", "pretrain", "embed"])
    fit_cells(source, out, overwrite=overwrite, **settings)
    chosen = column_prep_chose(out / "store") if column is None else None
    if chosen is not None:  # read by prep from the column it found: embedded from the same
        embed_cfg = embed_cfg.model_copy(
            update={"genes": embed_cfg.genes.model_copy(update={"column": chosen})}
        )
    # the embedding is derived from the checkpoint and the file alone, and fit-cells' own: another
    # --umap-color or key embeds again, without --overwrite and without training again
    with renamed_in_logs(fit_cells_names):
        return _stage(run_embed, embed_cfg, True)
