"""A small cells token store written by hand from a REAL matrix, following the cells-store contract
in DEVELOPERS.md (the `biomask prep cells` stage is being written in parallel; once it lands, the
pretrain tests should also run on its output).

Data: scanpy's `pbmc68k_reduced` (700 PBMCs x 765 genes, shipped inside scanpy, offline); `.raw.X`
holds log1p-normalised expression.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from biomask.provenance import sha256_file
from biomask.store import TokenStoreWriter
from biomask.vocab import NUM_SPECIAL, SPECIAL_TOKENS


def _write_gene_tokenizer(directory: Path, genes: list[str], medians: np.ndarray) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({g: i + NUM_SPECIAL for i, g in enumerate(genes)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "biomask": {"modality": "cells", "kind": "genes"}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    pd.DataFrame({"id": np.arange(len(genes)) + NUM_SPECIAL, "gene": genes, "median": medians}).to_csv(
        directory / "genes.tsv", sep="\t", index=False
    )
    return directory / "tokenizer.json"


def write_pbmc_store(root: Path, scheme: str = "binned", n_bins: int = 51, seed: int = 0) -> Path:
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    X = adata.raw.X.toarray().astype(np.float32)  # log1p-normalised
    genes = list(adata.raw.var_names)
    labels = adata.obs["bulk_labels"].astype(str).to_numpy()
    label_names = sorted(set(labels))
    nz = np.where(X > 0, X, np.nan)
    medians = np.nan_to_num(np.nanmedian(nz, axis=0), nan=1.0)

    fields = {"tokens": np.uint16, "values": np.float32}
    if scheme == "binned":
        fields["bins"] = np.uint8
    writer = TokenStoreWriter(
        root, token_fields=fields, record_fields={"labels": np.int64}, meta_columns=("id", "cell_type")
    )
    order = np.random.default_rng(seed).permutation(X.shape[0])
    splits = {"train": order[:560], "val": order[560:630], "test": order[630:]}
    for name, cells in splits.items():
        part = writer.split(name)
        for c in cells:
            row = X[c]
            if scheme == "panel":
                idx = np.arange(len(genes))
                values = row
            else:
                idx = np.flatnonzero(row > 0)
                values = row[idx]
            record = {"tokens": (idx + NUM_SPECIAL).astype(np.uint16)}
            if scheme == "rank":
                norm = values / medians[idx]
                keep = np.argsort(-norm, kind="stable")
                record = {"tokens": record["tokens"][keep]}
                values = norm[keep]
            record["values"] = values.astype(np.float32)
            if scheme == "binned":
                # scGPT-style: per-cell quantile bins of the expressed genes, 1..n_bins
                edges = np.quantile(values, np.linspace(0, 1, n_bins - 1))
                record["bins"] = np.clip(np.digitize(values, edges), 1, n_bins).astype(np.uint8)
            part.add(
                meta={"id": adata.obs_names[c], "cell_type": labels[c]},
                labels=label_names.index(labels[c]),
                **record,
            )
    tok_json = _write_gene_tokenizer(root / "tokenizer", genes, medians)
    writer.finish(
        modality="cells",
        kind="expression",
        scheme=scheme,
        n_bins=n_bins if scheme == "binned" else None,
        tokenizer={
            "kind": "genes",
            "vocab_size": len(genes) + NUM_SPECIAL,
            "dir": "tokenizer",
            "sha256": sha256_file(tok_json),
        },
        label_names=label_names,
        gene_id_column=None,
        source="scanpy.datasets.pbmc68k_reduced (raw.X, log1p-normalised)",
    )
    return root
