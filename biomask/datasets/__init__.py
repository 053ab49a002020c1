"""Named real datasets: `biomask datasets list`, `biomask datasets fetch NAME`."""

from biomask.datasets.registry import (
    DatasetEntry,
    cached_path,
    data_dir,
    fetch,
    fetch_input,
    get,
    is_cached,
    registry,
)

__all__ = ["DatasetEntry", "cached_path", "data_dir", "fetch", "fetch_input", "get", "is_cached", "registry"]
