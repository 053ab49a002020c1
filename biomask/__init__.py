"""biomask — masked pretraining (R²MAE and its baselines) of DNA and single-cell foundation models.

Real sequences and expression matrices in, a pretrained encoder out, measured on downstream tasks,
with embeddings that drop into scanpy. See README.md for the stages and DEVELOPERS.md for the layout.
"""

__version__ = "0.1.0"


from biomask.lazy import lazy_names

# `biomask.embed`, `biomask.fit_cells` and `biomask.read_cells` are imported on first use, so
# `import biomask` stays light (no torch, no anndata).
__getattr__, __dir__ = lazy_names(
    __name__, {"embed": "embedding.api", "read_cells": "embedding.api", "fit_cells": "embedding.fit"}
)
