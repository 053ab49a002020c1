"""What an expression matrix holds, and turning it into UMI counts -- or refusing to.

Tokenization starts from counts, so the stage first looks at a sample of cells and names what it
finds (`detect`):

| kind             | evidence                                                                      |
|------------------|-------------------------------------------------------------------------------|
| `counts`         | an integer dtype                                                              |
| `integer_floats` | a float dtype whose non-zero values all lie within `integer_tolerance` of one |
| `stray_values`   | integers but for a few values (under 1 %): a damaged or hand-edited count matrix |
| `scaled`         | negative values (centred or z-scored expression, e.g. pbmc68k_reduced's `X`)  |
| `log_normalised` | non-integral, small (max <= 30), e.g. log1p(counts / total * 1e4)             |
| `tpm_like`       | non-integral on a linear scale (TPM, FPKM, library-size normalised)           |
| `mixed`          | some cells all integer counts, others mostly non-integral: samples of two kinds |

The policy (`counts.mode`) then either accepts counts (`require`), or rebuilds them from
log1p(CP10k)-style values with a total-counts column (`from_log1p`: counts = rint(expm1(x) *
total / scale), every value checked to be integral), or takes normalised values as they are
(`log1p`, `normalised`: for files without counts). Anything else is an `InputError` that says what
was found and which option to use. `CountConverter` applies the policy block by block and checks every
value (NaN, infinities, negatives, non-integers) on the way, naming the cell of the first bad one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from biomask.cells.config import CountsConfig
from biomask.cells.readers import MatrixSource
from biomask.errors import InputError

log = logging.getLogger(__name__)

STRAY_SHARE = 0.01  # non-integer values under this share of integer counts: strays, not a transform
_LOG_SCALE_MAX = 30.0  # log1p(1e6) ~ 13.8, log2(1e6) ~ 20: larger values are not log-scale
_CONSTANT_CV = 0.01  # row sums this close to constant mean "normalised to a fixed total"
_SCALE_TOLERANCE = 0.05  # such a total this far from counts.scale is another normalisation (TPM: 1e6)
# a cell with this many non-zero values, all integers with no common factor, holds counts; one with most
# of them non-integral does not: both in one matrix (at least this many cells of each) is samples
# prepared differently, which no counts.mode reads correctly. (A normalised cell can be all integers
# too, when its total divides the scale: CPM of a cell of 1,000 counts is counts x 1,000, a common factor.)
_MIXED_MIN_VALUES = 10
_MIXED_MIN_CELLS = 5
_TOTALS_NAME = re.compile(r"(^n_?counts$|total_?counts|^ncount|n_?umi|^nUMI$|library_?size)", re.I)


@dataclass
class ValueSummary:
    """What a sample of a matrix holds (recorded in the manifest)."""

    kind: str
    dtype: str
    cells: int  # cells looked at
    nonzero: int  # non-zero values looked at
    min: float
    max: float
    integral_fraction: float  # non-zero values within the integer tolerance of an integer
    row_sum_median: float | None = None  # per-cell sums of the values ...
    row_sum_cv: float | None = None  # ... and their coefficient of variation
    expm1_row_sum_median: float | None = None  # the same for expm1(values): constant for log1p(CP10k)
    expm1_row_sum_cv: float | None = None
    stray: tuple[int, int, float] | None = None  # stray_values: the first one's (row, column, value)
    mixed: tuple[int, int, int, int] | None = None  # mixed: (count cells, other cells, a row of each)
    expm1_integral_fraction: float | None = None  # non-zero values whose expm1 is an integer

    @property
    def log1p_of_counts(self) -> bool:
        """log1p of raw counts, never normalised (`sc.pp.log1p` without `normalize_total`)."""
        return (
            self.kind == "log_normalised"
            and self.expm1_integral_fraction is not None
            and self.expm1_integral_fraction >= 1 - STRAY_SHARE
        )

    @property
    def is_counts(self) -> bool:
        return self.kind in ("counts", "integer_floats")

    def describe(self) -> str:
        """The finding in words, for messages and the log."""
        top = f"max {self.max:,.4g}"
        if self.kind == "counts":
            return f"integer counts ({self.dtype}, {top})"
        if self.kind == "integer_floats":
            return (
                f"counts stored as floats ({self.dtype}, every value within tolerance of an integer, {top})"
            )
        if self.kind == "scaled":
            return f"scaled values (negative values down to {self.min:.4g}: centred or z-scored expression)"
        if self.kind == "stray_values":
            n = round((1 - self.integral_fraction) * self.nonzero)
            return (
                f"integer counts but for {n:,} non-integer value{'s' * (n != 1)} among {self.nonzero:,} "
                f"non-zero values in the first {self.cells:,} cells ({top})"
            )
        share = f"{1 - self.integral_fraction:.1%} of non-zero values non-integral"
        if self.kind == "mixed" and self.mixed is not None:
            n_counts, n_other = self.mixed[:2]
            return (
                f"a mix of cells: {n_counts:,} hold integer counts only and {n_other:,} mostly non-integer "
                f"values, among the first {self.cells:,} cells ({share}, {top})"
            )
        if self.log1p_of_counts:
            return (
                f"log1p of raw counts, not normalised (expm1 of {self.expm1_integral_fraction:.1%} of the "
                f"non-zero values is an integer; {top})"
            )
        if self.kind == "log_normalised":
            if self.expm1_row_sum_cv is not None and self.expm1_row_sum_cv < _CONSTANT_CV:
                return (
                    f"log-normalised values: log1p of counts per {self.expm1_row_sum_median:,.0f} "
                    f"(expm1 row sums constant; {share}, {top})"
                )
            spread = (
                f"expm1 row sums vary (CV {self.expm1_row_sum_cv:.2f}), so not every gene is present"
                if self.expm1_row_sum_cv is not None
                else ""
            )
            return f"non-integer values that look log-transformed ({share}, {top}; {spread})"
        if self.row_sum_cv is not None and self.row_sum_cv < _CONSTANT_CV:
            return f"TPM-like values normalised to {self.row_sum_median:,.0f} per cell ({share}, {top})"
        return f"TPM/FPKM-like non-integer values on a linear scale ({share}, {top})"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "description": self.describe()}


# --------------------------------------------------------------------------------------------- checks


def check_numeric(source: MatrixSource) -> None:
    """Refuse matrices whose stored type is not a number (strings, booleans, records)."""
    if source.dtype.kind not in "iuf":
        raise InputError(
            f"{source.where}: the values are not numbers (stored as {source.dtype}); "
            "point `matrix:` at the expression values"
        )


def _row_of(block: sp.csr_matrix, position: int) -> int:
    return int(np.searchsorted(block.indptr, position, side="right") - 1)


def _cell(source: MatrixSource, start: int, block: sp.csr_matrix, position: int) -> str:
    row = start + _row_of(block, position)
    return f"cell {source.obs.index[row]!r} (row {row})"


# NaN in this many genes of one cell is a gene never measured, not a bad value
_NAN_GENES = 10


def check_finite(source: MatrixSource, start: int, block: sp.csr_matrix) -> None:
    bad = ~np.isfinite(block.data)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        row = _row_of(block, first)
        in_cell = int(np.isnan(block.data[block.indptr[row] : block.indptr[row + 1]]).sum())
        # anndata.concat(join="outer") of dense samples writes NaN for every gene a sample lacks: "remove
        # those cells" would remove a whole sample
        joined = (
            f" {in_cell:,} genes of this cell are NaN: that is how anndata.concat(..., join='outer') fills "
            "the genes a sample did not measure -- concatenate on the genes every sample measures "
            "(join='inner')"
            if in_cell >= _NAN_GENES
            else " fix or remove those cells"
        )
        raise InputError(
            f"{source.where}: {_cell(source, start, block, first)} has a value {block.data[first]} "
            f"({int(bad.sum()):,} NaN or infinite values in cells {start}-{start + block.shape[0] - 1});"
            f"{joined}"
        )


# --------------------------------------------------------------------------------------------- detection


def _cv(values: np.ndarray) -> float | None:
    values = values[values > 0]
    if values.size < 2:
        return None
    return float(values.std() / values.mean())


def _cell_integrality(block: sp.csr_matrix, integer_tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Per cell: its non-zero values, and how many of them are integers (within the tolerance)."""
    data = block.data.astype(np.float64)
    rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
    nonzero = data != 0
    integral = nonzero & (np.abs(data - np.rint(data)) <= integer_tolerance)
    return (
        np.bincount(rows[nonzero], minlength=block.shape[0]),
        np.bincount(rows[integral], minlength=block.shape[0]),
    )


def _count_cells(block: sp.csr_matrix, integer_tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows of cells that hold counts (enough values, all integers, no common factor), and rows of
    cells whose values are mostly not integers."""
    values, integral = _cell_integrality(block, integer_tolerance)
    seen = values >= _MIXED_MIN_VALUES
    rows = np.flatnonzero(seen & (integral == values))
    if rows.size:
        whole = block[rows]
        ints = np.abs(np.rint(whole.data)).astype(np.int64)
        rows = rows[np.gcd.reduceat(ints, whole.indptr[:-1]) == 1]
    return rows, np.flatnonzero(seen & (2 * integral < values))


def _mixed_cells(block: sp.csr_matrix, integer_tolerance: float) -> tuple[int, int, int, int] | None:
    """(count cells, other cells, first row of each) when the block holds both kinds, else None."""
    counts, other = _count_cells(block, integer_tolerance)
    if counts.size < _MIXED_MIN_CELLS or other.size < _MIXED_MIN_CELLS:
        return None
    return int(counts.size), int(other.size), int(counts[0]), int(other[0])


def summarise(block: sp.csr_matrix, dtype: np.dtype, integer_tolerance: float) -> ValueSummary:
    """Name what a block of cells holds (see the module docstring for the rules)."""
    data = block.data[block.data != 0].astype(np.float64)
    cells = block.shape[0]
    if data.size == 0:
        return ValueSummary("empty", str(dtype), cells, 0, 0.0, 0.0, 1.0)
    integral = float(np.mean(np.abs(data - np.rint(data)) <= integer_tolerance))
    common = dict(
        dtype=str(dtype),
        cells=cells,
        nonzero=int(data.size),
        min=float(data.min()),
        max=float(data.max()),
        integral_fraction=integral,
    )
    if common["min"] < 0:
        return ValueSummary("scaled", **common)
    if integral == 1.0:
        return ValueSummary("counts" if dtype.kind in "iu" else "integer_floats", **common)
    mixed = _mixed_cells(
        block, integer_tolerance
    )  # before strays: a few cells of another kind are not strays
    if mixed is not None:
        return ValueSummary("mixed", **common, mixed=mixed)
    if integral >= 1 - STRAY_SHARE:  # counts with a few odd values: name one, don't call it log data
        values = block.data.astype(np.float64)  # as `integral` was measured (float32 would round tol)
        odd = np.flatnonzero((values != 0) & (np.abs(values - np.rint(values)) > integer_tolerance))
        stray = (_row_of(block, int(odd[0])), int(block.indices[odd[0]]), float(values[odd[0]]))
        return ValueSummary("stray_values", **common, stray=stray)
    values = sp.csr_matrix(block, dtype=np.float64)
    sums = np.asarray(values.sum(axis=1)).ravel()
    # TPM-scale values overflow expm1's sums to inf: expected (they are not log values), not worth a warning
    with np.errstate(over="ignore", invalid="ignore"):
        values.data = np.expm1(np.minimum(values.data, 700))
        expm1_sums = np.asarray(values.sum(axis=1)).ravel()
        # float32 log values give expm1 an error that grows with the count (1.2e-6 x count at most)
        linear = values.data[values.data != 0]
        off = np.abs(linear - np.rint(linear))
        common["expm1_integral_fraction"] = float(
            np.mean(off <= np.maximum(integer_tolerance, 1e-5 * linear))
        )
        common.update(
            row_sum_median=float(np.median(sums[sums > 0])),
            row_sum_cv=_cv(sums),
            expm1_row_sum_median=float(np.median(expm1_sums[expm1_sums > 0])),
            expm1_row_sum_cv=_cv(expm1_sums),
        )
    if common["max"] <= _LOG_SCALE_MAX and not (
        common["row_sum_cv"] is not None and common["row_sum_cv"] < _CONSTANT_CV
    ):
        return ValueSummary("log_normalised", **common)
    return ValueSummary("tpm_like", **common)


def detect(source: MatrixSource, cfg: CountsConfig, block_size: int) -> ValueSummary:
    """Read the first `cfg.detect_cells` cells (more while all are zero) and name what they hold."""
    check_numeric(source)
    if source.n_obs == 0 or source.n_vars == 0:
        raise InputError(
            f"{source.where}: the matrix is empty ({source.n_obs} cells x {source.n_vars} genes)"
        )
    blocks = []
    read = 0
    for start, block in source.blocks(block_size):
        check_finite(source, start, block)
        blocks.append(block)
        read += block.shape[0]
        if read >= cfg.detect_cells and any(b.count_nonzero() for b in blocks):
            break
    sample = sp.vstack(blocks, format="csr")[: max(cfg.detect_cells, 1)]
    if sample.count_nonzero() == 0:
        sample = sp.vstack(blocks, format="csr")
    summary = summarise(sample, source.dtype, cfg.integer_tolerance)
    if summary.kind == "empty":
        raise InputError(f"{source.where}: every value of the matrix is zero ({source.n_obs:,} cells)")
    return summary


# --------------------------------------------------------------------------------------------- policy


def _totals_candidates(obs: pd.DataFrame) -> list[str]:
    return [c for c in obs.columns if _TOTALS_NAME.search(str(c)) and pd.api.types.is_numeric_dtype(obs[c])]


# the same settings from Python, where these messages also reach users of biomask.embed / fit_cells
PYTHON_KEYS = " (biomask.embed, biomask.fit_cells: the `matrix=` and `counts={...}` arguments.)"


def _separating_column(obs: pd.DataFrame, count_rows: np.ndarray, other_rows: np.ndarray) -> str:
    """An obs column (a sample or batch label) whose values tell the count cells from the others, in words."""
    for column in obs.columns:
        values = obs[column].astype(str)  # any column (categorical, object of mixed types) compares as text
        if pd.api.types.is_float_dtype(obs[column]) or values.nunique() > 100:
            continue
        counts = set(values.iloc[count_rows])
        other = set(values.iloc[other_rows])
        if counts and other and not counts & other:
            return f"; obs column {column!r} tells them apart (counts: {_few(counts)}; the others: {_few(other)})"
    return ""


def _few(values: set[str]) -> str:
    return ", ".join(sorted(values)[:5]) + (", ..." if len(values) > 5 else "")


# what to do about a matrix of cells of two kinds (detected in the first cells or met while streaming)
_MIXED_HINT = (
    "Samples concatenated after different preprocessing? No counts.mode reads such a matrix correctly: give "
    "every cell raw counts (each sample's counts layer or .raw, before concatenating), or normalise the count "
    "samples as the others were (e.g. sc.pp.normalize_total(target_sum=1e4) and sc.pp.log1p, then "
    f"counts.mode: log1p).{PYTHON_KEYS}"
)


def _refuse_mixed(source: MatrixSource, block: sp.csr_matrix, start: int, found: str, tol: float) -> None:
    count_rows, other_rows = (start + rows for rows in _count_cells(block, tol))
    names = source.obs.index
    raise InputError(
        f"{source.where}: the cells do not all hold the same kind of values: {found}, e.g. cell "
        f"{names[count_rows[0]]!r} (row {count_rows[0]}) holds counts and cell {names[other_rows[0]]!r} "
        f"(row {other_rows[0]}) does not{_separating_column(source.obs, count_rows, other_rows)}. {_MIXED_HINT}"
    )


def check_policy(source: MatrixSource, summary: ValueSummary, cfg: CountsConfig) -> None:
    """Refuse a matrix the configured policy cannot use, saying what was found and what to set."""
    found = summary.describe()
    if summary.kind == "mixed":  # whatever the mode: it would read one kind of cell wrongly, silently
        block = source.rows(0, min(summary.cells, source.n_obs))
        _refuse_mixed(source, block, 0, found, cfg.integer_tolerance)
    others = [m for m in source.alternatives if m != source.key]
    look_elsewhere = (
        f" It also has {', '.join(others)}: if one holds counts, point `matrix` at it (the input's "
        "`matrix:`, fit-cells' --matrix, Python's matrix=)."
        if others
        else ""
    )
    if summary.kind == "stray_values" and summary.stray is not None and cfg.mode != "normalised":
        row, column, value = summary.stray
        expected = (
            "expected raw counts" if cfg.mode == "require" else f"counts.mode={cfg.mode} expects log1p values"
        )
        raise InputError(
            f"{source.where}: {expected}, found {found}: e.g. cell {source.obs.index[row]!r} (row "
            f"{row}), gene {source.var.index[column]!r}: {value:g}. Fix or round those values (corrected "
            "counts, e.g. ambient-RNA removal, are rounded before use), point `matrix` at the raw counts, "
            "or take the values as linear-scale expression with `counts.mode: normalised`."
            f"{look_elsewhere}{PYTHON_KEYS}"
        )
    if summary.log1p_of_counts:  # every mode reads them wrongly: log1p / normalised as normalised values,
        # from_log1p (rebuilding from a total) into non-integers -- and expm1 gives the counts back exactly
        raise InputError(
            f"{source.where}: found {found}. No counts mode reads these as they are (counts.mode log1p and "
            "normalised take them as normalised per cell, from_log1p needs normalised values); expm1 of them "
            "is the counts: keep those as a layer and point `matrix` at it -- in Python "
            "adata.layers['counts'] = np.expm1(adata.X), then matrix='layers/counts' (a file: write it "
            f"again with that layer, and matrix: layers/counts).{look_elsewhere}{PYTHON_KEYS}"
        )
    if cfg.mode == "require":
        if summary.is_counts:
            return
        if summary.kind == "log_normalised":
            candidates = _totals_candidates(source.obs)
            column = candidates[0] if candidates else "<obs column with total counts>"
            hint = (
                " If the values are log1p(counts / total * 10,000), rebuild the counts with "
                f"`counts.mode: from_log1p` and `counts.total_counts_column: {column}`"
                + (f" (obs columns that look like totals: {', '.join(candidates)})." if candidates else ".")
                + " Without totals, `counts.mode: log1p` takes the values as they are (no counts are rebuilt)."
                + (
                    " If they are not log values but corrected or rescaled counts (expm1 row sums vary, as "
                    "they would), `counts.mode: normalised` takes them as linear-scale expression."
                    if summary.expm1_row_sum_cv is None or summary.expm1_row_sum_cv >= _CONSTANT_CV
                    else ""
                )
            )
        elif summary.kind == "tpm_like":
            constant = summary.row_sum_cv is not None and summary.row_sum_cv < _CONSTANT_CV
            scale = (
                f" and `counts.scale: {float(f'{summary.row_sum_median:.3g}'):g}` (every cell sums to that)"
                if constant and summary.row_sum_median
                else " (values are read as normalised to `counts.scale` per cell, 10,000 by default)"
            )
            hint = (
                " TPM-like values cannot be turned back into counts: use the raw count matrix, or take them as "
                f"normalised expression with `counts.mode: normalised`{scale}; log1p is applied."
            )
        else:
            hint = (
                " Scaled values cannot be turned back into counts or expression: set `matrix:` to the raw "
                "counts, or to log-normalised values with `counts.mode: log1p`."
            )
        raise InputError(
            f"{source.where}: expected raw counts, found {found}.{look_elsewhere}{hint}{PYTHON_KEYS}"
        )
    if cfg.mode in ("log1p", "normalised"):  # taken as they are; only what contradicts the mode is refused
        if summary.is_counts:
            raise InputError(
                f"{source.where}: counts.mode={cfg.mode}, but the matrix holds {found}; "
                "set counts.mode: require (biomask normalises counts itself)"
            )
        if summary.kind == "scaled":
            raise InputError(
                f"{source.where}: counts.mode={cfg.mode} needs non-negative normalised values, found {found}."
                f"{look_elsewhere}"
            )
        if cfg.mode == "log1p" and summary.kind == "tpm_like":
            raise InputError(
                f"{source.where}: counts.mode=log1p, but the values look linear-scale ({found}); "
                "for TPM / FPKM / CP10k values set counts.mode: normalised"
            )
        _check_scale(source, summary, cfg)
        return
    # from_log1p
    if summary.is_counts:
        raise InputError(
            f"{source.where}: counts.mode=from_log1p, but the matrix already holds {found}; "
            "set counts.mode: require"
        )
    if summary.kind != "log_normalised":
        raise InputError(
            f"{source.where}: counts.mode=from_log1p needs log1p-normalised values, found {found}.{look_elsewhere}"
        )


def _check_scale(source: MatrixSource, summary: ValueSummary, cfg: CountsConfig) -> None:
    """log1p / normalised values are read as normalised to `counts.scale` per cell. When every cell
    sums to one other total (TPM and CPM: 1e6), reading them at 10,000 would put each value 100x
    off on the linear scale, silently: refused, saying what to set (a `scale` the user chose is
    kept, with a warning). Rows that do not sum to one total (FPKM, a subset of genes) tell nothing."""
    total, cv = (
        (summary.expm1_row_sum_median, summary.expm1_row_sum_cv)
        if cfg.mode == "log1p"
        else (summary.row_sum_median, summary.row_sum_cv)
    )
    if cv is None or cv >= _CONSTANT_CV or not total or abs(total / cfg.scale - 1) <= _SCALE_TOLERANCE:
        return
    what = "expm1 of every cell's values sums" if cfg.mode == "log1p" else "every cell's values sum"
    message = (
        f"{source.where}: counts.mode={cfg.mode} reads the values as normalised to counts.scale="
        f"{cfg.scale:,.0f} per cell, but {what} to {total:,.0f}"
    )
    if "scale" in cfg.model_fields_set:
        log.warning("%s; using counts.scale=%g as set", message, cfg.scale)
        return
    raise InputError(
        f"{message}: set counts.scale: {float(f'{total:.3g}'):g} (1e6 for TPM or CPM), or every value would "
        f"be read {total / cfg.scale:,.3g}x off. (To embed more such cells with a model trained on them "
        f"read at {cfg.scale:g}, before biomask checked this, set counts.scale: {cfg.scale:g} explicitly: "
        f"kept, with a warning.){PYTHON_KEYS}"
    )


# --------------------------------------------------------------------------------------------- conversion


class CountConverter:
    """Turns each block of a source into float32 counts (explicit zeros removed), checking every value.

    The first pass over a source checks everything; later passes (`check=False`) read the same file
    through the same handle, so they skip the checks and, when every value was an exact integer, the
    rounding too."""

    def __init__(self, source: MatrixSource, cfg: CountsConfig) -> None:
        self.source = source
        self.cfg = cfg
        self.totals: np.ndarray | None = None
        self.exact = True  # every float value checked so far was an exact integer
        if cfg.total_counts_column is not None:
            self.totals = total_counts(source, cfg.total_counts_column, cfg.mode)
        if cfg.mode in ("log1p", "normalised"):  # already normalised to `scale`: the library is `scale`
            self.totals = np.full(source.n_obs, cfg.scale, dtype=np.float64)

    def __call__(self, start: int, block: sp.csr_matrix, check: bool = True) -> sp.csr_matrix:
        src = self.source
        data = block.data
        # min and max find NaN (it propagates), infinities and negatives in two cheap passes; the
        # detailed checks only run to name the culprit
        low, high = (data.min(), data.max()) if check and data.size else (0, 0)
        if data.dtype.kind == "f" and not (np.isfinite(low) and np.isfinite(high)):
            check_finite(src, start, block)
        if data.dtype.kind != "u" and low < 0:
            first = int(np.argmin(data))
            raise InputError(
                f"{src.where}: {_cell(src, start, block, first)} has a negative value ({data[first]:.4g}); "
                "counts cannot be negative — is this scaled data? Use the raw counts"
            )
        if check and self.cfg.mode != "require" and data.dtype.kind == "f":
            self._no_count_cells(start, block)
        if self.cfg.mode == "from_log1p":
            counts = self._from_log1p(start, block)
        elif self.cfg.mode == "log1p":  # expression on the normalised scale, not counts
            counts = np.expm1(data.astype(np.float64)).astype(np.float32)
        elif self.cfg.mode == "normalised":
            counts = data.astype(np.float32, copy=False)
        elif data.dtype.kind == "f" and (check or not self.exact):
            counts = self._integral(start, block)
        else:
            counts = data.astype(np.float32, copy=False)
        out = sp.csr_matrix((counts, block.indices, block.indptr), shape=block.shape)
        if not counts.all():  # explicit zeros (stored, or rounded to): gone, so every entry is expressed
            out = out.copy()  # the block's arrays may be read-only views of the file
            out.eliminate_zeros()
        return out

    def _no_count_cells(self, start: int, block: sp.csr_matrix) -> None:
        """Normalised values throughout: a cell of integer counts among them (the first cells, which
        decided the mode, may be one sample of several) would be read as normalised, silently wrong."""
        # only a cell whose first value is an integer can be one (a few of normalised cells): cheap per block
        tol = self.cfg.integer_tolerance
        rows = np.flatnonzero(np.diff(block.indptr) >= _MIXED_MIN_VALUES)
        first = block.data[block.indptr[rows]].astype(np.float64)
        rows = rows[np.abs(first - np.rint(first)) <= tol]
        if rows.size == 0:
            return
        candidates = block[rows]
        hits, _ = _count_cells(candidates, tol)
        if hits.size >= _MIXED_MIN_CELLS:
            row = int(rows[hits[0]])
            raise InputError(
                f"{self.source.where}: cell {self.source.obs.index[start + row]!r} (row {start + row}) holds "
                f"integer counts only ({candidates[hits[0]].nnz:,} values; {hits.size:,} such cells in "
                f"cells {start}-{start + block.shape[0] - 1}), but counts.mode={self.cfg.mode} reads the "
                f"matrix as the normalised values its first cells hold. {_MIXED_HINT}"
            )

    def _integral(self, start: int, block: sp.csr_matrix) -> np.ndarray:
        """Float values that must be integers: exact ones pass untouched (the common case, checked fast)."""
        data = block.data
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            self.exact = False
            bad = np.abs(data - rounded) > self.cfg.integer_tolerance
            if bad.any():
                row = _row_of(block, int(np.flatnonzero(bad)[0]))
                values, integral = _cell_integrality(block, self.cfg.integer_tolerance)
                if values[row] >= _MIXED_MIN_VALUES and 2 * integral[row] < values[row]:
                    raise InputError(  # not a stray value: a cell of another kind than the first ones
                        f"{self.source.where}: cell {self.source.obs.index[start + row]!r} (row {start + row}) "
                        f"holds non-integer values ({values[row] - integral[row]:,} of its {values[row]:,} "
                        "non-zero values), but the first cells hold counts. "
                        f"{_MIXED_HINT}"
                    )
                self._non_integral(
                    start,
                    block,
                    bad,
                    data,
                    "value",
                    "biomask needs UMI counts (integers); use the raw count matrix",
                )
        return rounded.astype(np.float32, copy=False)

    def _from_log1p(self, start: int, block: sp.csr_matrix) -> np.ndarray:
        """counts = rint(expm1(x) * total / scale), each checked to be an integer up to the stored precision."""
        assert self.totals is not None
        rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
        values = np.expm1(block.data.astype(np.float64)) * self.totals[start + rows] / self.cfg.scale
        rounded = np.rint(values)
        bad = np.abs(values - rounded) > self.cfg.reconstruct_rtol * np.maximum(rounded, 1.0)
        if bad.any():
            self._non_integral(
                start,
                block,
                bad,
                values,
                "rebuilt count",
                # a totals column is often older than the matrix (10x PBMC subsets in scvi-tools: n_counts of
                # every gene, X of the genes kept), and then nothing can rebuild the counts: say what still works
                f"check that `{self.cfg.total_counts_column}` holds the totals the values were normalised by, "
                f"and counts.scale ({self.cfg.scale:g}). A totals column computed before genes were removed "
                "holds more than the values were normalised by; without the right totals, `counts.mode: log1p` "
                "takes the values as they are (no counts are rebuilt)",
            )
        return rounded.astype(np.float32)

    def _non_integral(
        self, start: int, block: sp.csr_matrix, bad: np.ndarray, values: np.ndarray, what: str, hint: str
    ) -> None:
        first = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{self.source.where}: {_cell(self.source, start, block, first)} has the non-integral {what} "
            f"{values[first]:.6g} ({int(bad.sum()):,} such values in cells {start}-{start + block.shape[0] - 1}); "
            f"{hint}"
        )


def total_counts(source: MatrixSource, column: str, mode: str) -> np.ndarray:
    """A per-cell total-counts column of obs, checked to be finite and positive."""
    if column not in source.obs.columns:
        # counts in the matrix need no column: their sums are the library sizes
        instead = "; null sums each cell's counts (None in Python)" if mode == "require" else ""
        raise InputError(
            f"{source.where}: obs has no column {column!r} (counts.total_counts_column: each cell's "
            f"library size{instead}); obs columns: {', '.join(map(str, source.obs.columns)) or 'none'}"
        )
    try:
        totals = source.obs[column].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{source.where}: obs column {column!r} is not numeric") from None
    bad = ~np.isfinite(totals) | (totals <= 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{source.where}: obs column {column!r} is {totals[first]} for cell {source.obs.index[first]!r}; "
            "total counts must be positive"
        )
    return totals


# --------------------------------------------------------------------------------------------- stores


def require_counts(manifest: dict[str, Any], where: str, key: str, instead: str | None = None) -> None:
    """Refuse a token store whose raw counts cannot be rebuilt (a count likelihood needs them): only
    panel stores prepared from counts keep each cell's `library_size`. `key` names the setting,
    `instead` the other way out (default: that setting at mse)."""
    if "library_size" in (manifest.get("record_fields") or {}):
        return
    inputs = manifest.get("counts") or {}
    found = "; ".join(
        f"input {name}: counts.mode={c.get('mode')} ({c.get('description', c.get('kind'))})"
        for name, c in inputs.items()
    )
    normalised = [name for name, c in inputs.items() if c.get("mode") not in ("require", "from_log1p")]
    why = (
        f"its values are normalised expression, not counts ({found})"
        if normalised
        else f"it keeps no per-cell library size (scheme {manifest.get('scheme')}; {found or 'no inputs'}; "
        "panel stores written before the count likelihoods existed lack it: prepare the store again)"
    )
    raise InputError(
        f"{where}/manifest.json: {key} needs raw counts and each cell's library size, but {why}. "
        f"{instead or 'Set ' + key.rsplit('=', 1)[0] + '=mse'}, or prepare the store from counts (counts.mode require, or "
        "from_log1p with counts.total_counts_column) with tokenizer.scheme=panel"
    )
