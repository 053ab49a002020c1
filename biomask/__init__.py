"""biomask — masked pretraining (R²MAE and its baselines) of DNA and single-cell foundation models.

Real sequences and expression matrices in, a pretrained encoder out, measured on downstream tasks,
with embeddings that drop into scanpy. See README.md for the stages and DEVELOPERS.md for the layout.
"""

__version__ = "0.1.0"
