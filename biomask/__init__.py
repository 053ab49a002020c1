"""biomask — masked pretraining (R²MAE and its baselines) of DNA and single-cell foundation models.

Real sequences and expression matrices in, a pretrained encoder out, measured on downstream tasks,
with embeddings that drop into scanpy. See README.md for the stages and DEVELOPERS.md for the layout.
"""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """`biomask.embed`, `biomask.fit_cells` and `biomask.read_cells` are imported on first use, so `import biomask` stays light (no torch, no anndata)."""
    if name == "embed":
        from biomask.embedding.api import embed

        return embed
    if name == "read_cells":
        from biomask.embedding.api import read_cells

        return read_cells
    if name == "fit_cells":
        from biomask.embedding.fit import fit_cells

        return fit_cells
    raise AttributeError(f"module 'biomask' has no attribute {name!r}")
