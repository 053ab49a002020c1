"""Single-cell prep: expression matrices (h5ad, 10x, loom) -> a token store of cells (`biomask prep cells`)."""
