"""scanpy's kNN graph (`sc.pp.neighbors`), with the one failure of an environment said plainly.

From 8,192 records scanpy builds the graph with pynndescent; pynndescent 0.7 returns scipy's
csr_array, which scanpy 1.11 cannot read (`AttributeError: 'csr_array' object has no attribute
'getnnz'`). biomask requires pynndescent < 0.7, but a scientist's environment upgraded by hand
afterwards met scanpy's bare traceback, after the embedding or the evaluation's models were done.
"""

from __future__ import annotations

from typing import Any

from biomask.errors import BiomaskError


def neighbors(adata: Any, **kwargs: Any) -> None:
    """`sc.pp.neighbors(adata, **kwargs)`; an environment that cannot build the graph is named."""
    import scanpy as sc

    try:
        sc.pp.neighbors(adata, **kwargs)
    except AttributeError as exc:
        if "getnnz" not in str(exc):
            raise
        from importlib.metadata import version

        raise BiomaskError(
            f"scanpy {version('scanpy')} cannot read the kNN graph pynndescent {version('pynndescent')} "
            f"builds from 8,192 records on ({exc}); install the version biomask requires: "
            "pip install 'pynndescent<0.7'"
        ) from None
