"""The protein-labelled PBMC set (data_prep/cite_pbmc_labels.py): the labels a user gets from the
surface proteins must be the cell types the RNA says they are, or every figure measured on them
is measured against noise."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

# each type's RNA marker: highest, on average, in the cells its protein gate took
RNA_MARKERS = {"B": "MS4A1", "CD14 Mono": "LYZ", "CD8 T": "CD8A", "NK": "GNLY", "CD4 T": "IL7R"}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, repo):
    import anndata as ad

    out = tmp_path_factory.mktemp("cite") / "cite.h5ad"
    run = subprocess.run(
        [sys.executable, repo / "data_prep/cite_pbmc_labels.py", out],
        capture_output=True,
        text=True,
        cwd=repo,
    )
    assert run.returncode == 0, run.stderr
    assert not list(out.parent.glob(".*.tmp*")), "a temporary file was left beside the output"
    return ad.read_h5ad(out)


def test_the_script_replaces_only_its_own_output(labelled, tmp_path, repo):
    """It wrote over any file given (a user's notes became a 24 MB h5ad) and took `--help` for a file
    name; like biomask's stages it now refuses, exit 2, before any work."""
    script = repo / "data_prep/cite_pbmc_labels.py"
    mine = tmp_path / "mine.h5ad"
    mine.write_text("my notes")
    for target, said in (
        (mine, "exists and was not written by cite_pbmc_labels.py"),
        (tmp_path / "x.csv", "must be an .h5ad"),
    ):
        run = subprocess.run([sys.executable, script, target], capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 2 and said in run.stderr, run.stderr
    assert mine.read_text() == "my notes" and not (tmp_path / "x.csv").exists()
    import anndata as ad  # an h5ad of someone else's, and one another of these scripts wrote

    for name, uns in (("other.h5ad", {}), ("pbmc3k.h5ad", {"biomask_data_prep": "pbmc3k_labels.py"})):
        ad.AnnData(np.zeros((2, 2), dtype=np.float32), uns=uns).write_h5ad(tmp_path / name)
        before = (tmp_path / name).read_bytes()
        run = subprocess.run(
            [sys.executable, script, tmp_path / name], capture_output=True, text=True, cwd=tmp_path
        )
        assert run.returncode == 2 and "was not written by cite_pbmc_labels.py" in run.stderr, run.stderr
        assert (tmp_path / name).read_bytes() == before and "cell_type" not in run.stdout  # before the work
    run = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0 and "usage:" in run.stdout and not (tmp_path / "--help").exists()
    assert labelled.uns["biomask_data_prep"] == "cite_pbmc_labels.py"  # what lets a rerun replace it


def test_protein_gates_give_the_types_their_rna_says(labelled):
    import scanpy as sc

    a = labelled.copy()
    assert set(a.obs["cell_type"]) == set(RNA_MARKERS)
    assert set(a.obs["donor"]) == {"pbmc5k", "pbmc10k"}
    assert a.obs["cell_type"].value_counts().min() >= 10  # every type can sit in every split
    x = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
    assert np.array_equal(x, np.round(x)) and x.min() >= 0  # raw counts, as prep cells wants them
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    for cell_type, gene in RNA_MARKERS.items():
        means = {t: float(a[a.obs["cell_type"] == t, gene].X.mean()) for t in RNA_MARKERS}
        assert max(means, key=means.get) == cell_type, (gene, means)


def test_gates_follow_flow_cytometry():
    import pandas as pd

    from biomask.cells.protein_gates import MARKERS, gate

    def cell(*positive):
        return {m: m in positive for m in MARKERS}

    calls = pd.DataFrame(
        [
            cell("CD3", "CD4"),
            cell("CD3", "CD8a"),
            cell("CD3", "CD4", "CD8a"),  # double positive: no T gate takes it
            cell("CD19"),
            cell("CD14", "CD4"),  # monocytes carry some CD4
            cell("CD56", "CD16"),
            cell("CD16"),
            cell("CD3", "CD19"),  # two lineages: a doublet
            cell(),
        ]
    )
    assert gate(calls) == ["CD4 T", "CD8 T", "", "B", "CD14 Mono", "NK", "FCGR3A Mono", "", ""]


def test_prep_cells_types_cells_by_their_proteins(tmp_path, repo, cli):
    """`task: protein-gates` as the shipped config runs it: the store's labels are the gates' types,
    the cells no gate takes and the rare type left out, both runs read."""
    from biomask.store import TokenStore

    out = tmp_path / "cite"
    code, _, err = cli("prep", "cells", "-c", repo / "configs/cells/pbmc-cite.yaml", f"output={out}")
    assert code == 0, err
    store = TokenStore(out)
    assert store.manifest["label_names"] == sorted(RNA_MARKERS)
    assert "'FCGR3A Mono' (5)" in err  # labels.min_cells says what it left out
    dropped = store.manifest["stats"]
    assert (dropped["cells_dropped_missing_label"], dropped["cells_dropped_rare_label"]) == (25, 5)
    counts = {name: 0 for name in RNA_MARKERS}
    for split in store.manifest["class_counts"].values():
        for name, n in split.items():
            counts[name] += n
    assert counts["CD4 T"] > counts["CD14 Mono"] > counts["CD8 T"] >= 10 and sum(counts.values()) == 370
    assert {s["name"] for s in store.manifest["sources"]} == {"pbmc5k-cite-200", "pbmc10k-cite-200"}


@pytest.mark.parametrize(
    "overrides, says",
    [
        # the labels need a column to go to
        (["labels.column=null"], "set labels.column"),
        # a file without antibody counts: named, with what it has
        (
            ["inputs=[{dataset: pbmc68k_reduced, matrix: raw, task: protein-gates}]"],
            "obsm keys: X_pca, X_umap",
        ),
        # cells no gate takes are missing labels: refused unless dropped, saying why they have none
        (["labels.missing=error"], "no gate takes"),
    ],
)
def test_prep_cells_protein_gates_refusals(tmp_path, repo, cli, overrides, says):
    out = tmp_path / "cite"
    code, _, err = cli(
        "prep", "cells", "-c", repo / "configs/cells/pbmc-cite.yaml", f"output={out}", *overrides
    )
    assert code == 2 and says in err, err
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_prep_cells_never_overwrites_a_label_column(tmp_path, repo, cli):
    import anndata as ad

    from biomask.datasets import fetch

    adata = ad.read_h5ad(fetch("pbmc5k-cite-200"))
    adata.obs["cell_type"] = "mine"
    path = tmp_path / "mine.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "cite"
    code, _, err = cli(
        "prep", "cells", "-c", repo / "configs/cells/pbmc-cite.yaml", f"output={out}",
        f"inputs=[{{path: {path}, task: protein-gates}}]",
    )  # fmt: skip
    assert code == 2 and "already has a 'cell_type' column" in err, err
    assert not out.exists()
    assert set(ad.read_h5ad(path).obs["cell_type"]) == {"mine"}  # the user's file as it was


def _cell_ranger_outputs(adata, folder, with_antibodies=True):
    """The h5ad's cells as Cell Ranger writes them: a filtered_feature_bc_matrix folder and an .h5,
    genes then (optionally) the antibodies as "Antibody Capture" features."""
    import gzip

    import h5py
    import scipy.io
    import scipy.sparse as sp

    names = [str(n) for n in adata.uns["protein_names"]] if with_antibodies else []
    matrix = sp.csr_matrix(adata.X)
    if names:
        matrix = sp.hstack([matrix, sp.csr_matrix(np.asarray(adata.obsm["protein_expression"]))]).tocsr()
    features = [(g, g, "Gene Expression") for g in adata.var_names] + [
        (n.split("_")[0], n, "Antibody Capture") for n in names
    ]
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as sink:
        scipy.io.mmwrite(sink, matrix.T.tocoo())
    with gzip.open(folder / "features.tsv.gz", "wt") as sink:
        sink.writelines("\t".join(f) + "\n" for f in features)
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as sink:
        sink.writelines(f"{b}\n" for b in adata.obs_names)
    csc = matrix.T.tocsc()  # features x barcodes, one column per barcode
    with h5py.File(folder.with_suffix(".h5"), "w") as h5:
        group = h5.create_group("matrix")
        group["barcodes"] = np.array(adata.obs_names, dtype="S")
        group["data"], group["indices"], group["indptr"] = csc.data.astype(np.int32), csc.indices, csc.indptr
        group["shape"] = np.array(csc.shape, dtype=np.int32)
        for key, column in (("id", 0), ("name", 1), ("feature_type", 2)):
            group[f"features/{key}"] = np.array([f[column] for f in features], dtype="S")
        group["features/genome"] = np.array([b"GRCh38"] * len(features))
    return folder, folder.with_suffix(".h5")


def test_prep_cells_protein_gates_read_cell_rangers_antibodies(tmp_path, repo, cli):
    """The same cells as an h5ad (obsm), a Cell Ranger folder and a Cell Ranger .h5 (antibodies as
    features) get the same type, cell by cell; a 10x input without antibodies is refused, naming it."""
    import anndata as ad

    from biomask.datasets import fetch
    from biomask.store import TokenStore

    adata = ad.read_h5ad(fetch("pbmc10k-cite-200"))
    folder, h5 = _cell_ranger_outputs(adata, tmp_path / "filtered_feature_bc_matrix")
    h5ad = tmp_path / "cells.h5ad"
    adata.write_h5ad(h5ad)
    found = {}
    for name, path in (("h5ad", h5ad), ("mtx", folder), ("h5", h5)):
        out = tmp_path / f"store-{name}"
        code, _, err = cli(
            "prep", "cells", "-c", repo / "configs/cells/pbmc-cite.yaml", f"output={out}", "labels.min_cells=0",
            f"inputs=[{{path: {path}, task: protein-gates}}]",
        )  # fmt: skip
        assert code == 0, err
        store = TokenStore(out)
        labels = {}
        for split in ("train", "val", "test"):
            part = store.split(split)
            names = [store.manifest["label_names"][i] for i in part.record_field("labels")]
            labels.update(zip(part.meta()["id"], names))
        found[name] = labels
    assert len(found["h5ad"]) > 150 and found["mtx"] == found["h5ad"] == found["h5"]

    bare, _ = _cell_ranger_outputs(adata, tmp_path / "no_antibodies", with_antibodies=False)
    out = tmp_path / "refused"
    code, _, err = cli(
        "prep", "cells", "-c", repo / "configs/cells/pbmc-cite.yaml", f"output={out}",
        f"inputs=[{{path: {bare}, task: protein-gates}}]",
    )  # fmt: skip
    assert code == 2 and "no 'Antibody Capture' features" in err and str(bare) in err, err
    assert not out.exists()


def test_marker_names_are_matched_as_panels_spell_them():
    import pandas as pd

    from biomask.cells.protein_gates import MARKERS, _named
    from biomask.errors import InputError

    spelled = ["cd3_TotalSeqC", "CD4", "CD8", "Cd14", "CD16_x", "CD19", "cd56", "IgG1_control"]
    adt = _named(pd.DataFrame([[1.0] * len(spelled)], columns=spelled), "cells.h5ad")
    assert set(MARKERS) <= set(adt.columns)
    with pytest.raises(InputError, match="lack CD19"):
        _named(
            pd.DataFrame([[1.0] * 6], columns=["CD3", "CD4", "CD8a", "CD14", "CD16", "CD56"]), "cells.h5ad"
        )


def test_proteins_that_cannot_be_gated_are_refused():
    import pandas as pd

    from biomask.cells.protein_gates import MARKERS, positive
    from biomask.errors import InputError

    rng = np.random.default_rng(0)
    adt = pd.DataFrame(rng.poisson(5, size=(50, len(MARKERS))), columns=list(MARKERS))
    assert positive(adt).shape == (50, len(MARKERS))
    with pytest.raises(InputError, match="cells.h5ad: 10 cells are too few"):
        positive(adt.head(10), where="cells.h5ad")
    stained_nothing = adt.assign(CD19=0)
    with pytest.raises(InputError, match="CD19 has the same count in every cell"):
        positive(stained_nothing, where="cells.h5ad")
