"""Embeddings from a portable checkpoint: the batched, padding-masked inference shared by
`biomask evaluate` (frozen features for the probes) and `biomask embed` (AnnData for scanpy).

    import biomask
    biomask.embed(adata, "runs/pretrain/cells-tiny/model")     # fills adata.obsm["X_biomask"]

Modules: `inference` (records -> vectors, batch-independent), `config` (the `biomask embed` schema),
`stage` (the stage command), `anndata_io` (writing into h5ad files), `dna` (sequence inputs),
`api` (the in-memory scanpy API), `plots` (the UMAP PNG).
"""
