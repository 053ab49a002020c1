"""A multi-sample AnnData whose samples hold different kinds of values (counts in one, log-normalised
values in another: concatenated after different preprocessing) is refused under every counts mode,
naming a cell of each kind and the obs column that tells them apart, before anything is written —
whether the first cells (which decide the mode) hold both kinds or only one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import biomask
from biomask.errors import InputError


def _two_samples(log_first: bool = False, cells: int = 60):
    import anndata as ad

    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, (2 * cells, 200)).astype(np.float32)
    values = counts.copy()
    logged = slice(0, cells) if log_first else slice(cells, 2 * cells)
    block = counts[logged]
    values[logged] = np.log1p(block / block.sum(axis=1, keepdims=True) * 1e4)
    sample = np.array(["s1"] * cells + ["s2"] * cells)
    obs = pd.DataFrame(
        {"batch": pd.Categorical(sample), "n_counts": counts.sum(axis=1)},
        index=[f"{s}-cell{i}" for i, s in enumerate(sample)],
    )
    return ad.AnnData(sp.csr_matrix(values), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(200)]))


@pytest.mark.parametrize("counts", [None, {"mode": "normalised"}, {"mode": "log1p"}])
def test_counts_and_log_normalised_samples_in_one_matrix_are_refused(tmp_path, counts):
    adata = _two_samples()
    out = tmp_path / "fit"
    with pytest.raises(InputError) as err:
        biomask.fit_cells(adata, out, counts=counts)
    message = str(err.value)
    assert "do not all hold the same kind of values" in message
    assert (
        "cell 's1-cell0' (row 0) holds counts" in message and "cell 's2-cell60' (row 60) does not" in message
    )
    assert "obs column 'batch' tells them apart (counts: s1; the others: s2)" in message
    assert (
        "TPM" not in message
    )  # the old diagnosis, whose advice (counts.mode: normalised) read the mix wrongly
    assert not out.exists() and not adata.obsm and "X_biomask" not in adata.uns


def test_a_sample_of_another_kind_past_the_detected_cells_is_refused_while_streaming(tmp_path):
    # detection reads only the first cells (here one sample); the other sample is met block by block
    adata = _two_samples()
    with pytest.raises(
        InputError, match=r"cell 's2-cell60' \(row 60\) holds non-integer values .* first cells hold counts"
    ):
        biomask.fit_cells(adata, tmp_path / "a", counts={"detect_cells": 30})
    adata = _two_samples(log_first=True)
    for mode in ("log1p", "normalised", "from_log1p"):
        totals = "n_counts" if mode == "from_log1p" else None
        counts = {"mode": mode, "detect_cells": 30, "total_counts_column": totals}
        with pytest.raises(InputError, match=r"cell 's2-cell60' \(row 60\) holds integer counts only"):
            biomask.fit_cells(adata, tmp_path / mode, counts=counts)
    assert not any(tmp_path.iterdir()) and not adata.obsm


def test_one_kind_throughout_is_still_read():
    """Counts, and log-normalised values, each alone: the check does not misfire on either."""
    from biomask.cells.config import CountsConfig
    from biomask.cells.counts import CountConverter, check_policy, detect
    from biomask.cells.readers import from_anndata

    adata = _two_samples()
    for rows, mode, kind in [
        (slice(0, 60), "require", "integer_floats"),
        (slice(60, 120), "log1p", "log_normalised"),
    ]:
        source = from_anndata(adata[rows].copy())
        cfg = CountsConfig(mode=mode)
        summary = detect(source, cfg, 16)
        assert summary.kind == kind
        check_policy(source, summary, cfg)
        converter = CountConverter(source, cfg)
        for start, block in source.blocks(16):
            converter(start, block)


def test_a_key_filled_by_hand_is_refused_with_a_key_that_is_free():
    """Per-sample vectors copied into obsm["X_biomask"] by hand (no record in uns): the refusal's
    suggestion is a key that would be accepted, not the one refused."""
    from biomask.embedding.anndata_io import check_key

    for keys, refused in [({"X_biomask"}, "X_biomask"), ({"X_pca", "X_biomask"}, "X_pca")]:
        with pytest.raises(InputError) as err:
            check_key(refused, keys, {}, "the AnnData")
        suggested = str(err.value).split("(e.g. ")[1].split(")")[0]
        assert suggested not in keys
        check_key(suggested, keys, {}, "the AnnData")


def test_normalised_cells_whose_total_divides_the_scale_are_not_taken_for_counts():
    """CPM of a cell with 1,000 counts is its counts x 1,000: all integers, but with a common factor;
    such cells among the others (here 20 of 120) are normalised values, read as they are."""
    import anndata as ad

    from biomask.cells.config import CountsConfig
    from biomask.cells.counts import CountConverter, check_policy, detect
    from biomask.cells.readers import from_anndata

    rng = np.random.default_rng(1)
    counts = rng.poisson(2.0, (120, 200)).astype(np.float64)
    for row in range(0, 120, 6):  # every sixth cell: exactly 500 or 1,000 counts
        target = 500 if row % 12 else 1000
        while counts[row].sum() != target:
            gene = rng.integers(200)
            counts[row, gene] = max(counts[row, gene] + (1 if counts[row].sum() < target else -1), 0)
    cpm = counts / counts.sum(axis=1, keepdims=True) * 1e6
    adata = ad.AnnData(sp.csr_matrix(cpm.astype(np.float32)))
    assert (cpm[::6] == np.rint(cpm[::6])).all()  # those cells are all integers
    source = from_anndata(adata)
    cfg = CountsConfig(mode="normalised", scale=1e6)
    summary = detect(source, cfg, 32)
    assert summary.kind == "tpm_like"
    check_policy(source, summary, cfg)
    converter = CountConverter(source, cfg)
    for start, block in source.blocks(32):
        converter(start, block)
