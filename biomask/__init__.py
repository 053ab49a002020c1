"""biomask — masked pretraining (R²MAE and its baselines) of DNA and single-cell foundation models.

Real sequences and expression matrices in, a pretrained encoder out, measured on downstream tasks,
with embeddings that drop into scanpy.

The Python API (scanpy-style: AnnData in, results under documented keys):

- `biomask.fit_cells(adata, output)`: pretrain a cell model on these cells and embed them
  (`obsm["X_biomask"]`, its record in `uns["X_biomask"]`);
- `biomask.embed(adata, checkpoint)`: embed cells with a pretrained checkpoint;
- `biomask.read_cells(path)`: a 10x folder or .h5, a .loom or an .h5ad as an AnnData.

Bad input raises `biomask.errors.InputError` (a `biomask.errors.BiomaskError`). The README (in the
repository) documents the stages and commands; DEVELOPERS.md the layout.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["embed", "fit_cells", "read_cells"]

if TYPE_CHECKING:  # what a type checker and an IDE see; at run time they load on first use
    from biomask.embedding.api import embed, read_cells
    from biomask.embedding.fit import fit_cells
else:
    from biomask.lazy import lazy_names

    # imported on first use, so `import biomask` stays light (no torch, no anndata)
    __getattr__, __dir__ = lazy_names(
        __name__, {"embed": "embedding.api", "read_cells": "embedding.api", "fit_cells": "embedding.fit"}
    )
