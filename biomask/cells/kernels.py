"""numba compilation of the cells stages' kernels, cached where numba can cache.

numba's `cache=True` writes the compiled kernel beside the module (`__pycache__`), else under
`~/.cache/numba`; where neither is writable (a read-only install or container with a read-only
home) it refuses at decoration, and every `prep cells` and `embed` failed with a traceback. The
kernel is then compiled for this process only (a second or so), said once; `NUMBA_CACHE_DIR` names a
writable cache instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numba

log = logging.getLogger(__name__)
_said = False


def njit(func: Callable[..., Any]) -> Any:
    """`numba.njit(cache=True, nogil=True)`, or without the cache where it cannot be written."""
    global _said
    try:
        return numba.njit(cache=True, nogil=True)(func)
    except RuntimeError as exc:  # "cannot cache function ...: no locator available"
        if "cache" not in str(exc):
            raise
        if not _said:
            _said = True
            log.warning(
                "numba cannot write its cache of biomask's kernels (%s); compiling them for this run "
                "only. Set NUMBA_CACHE_DIR to a writable folder to keep them",
                exc,
            )
        return numba.njit(cache=False, nogil=True)(func)
