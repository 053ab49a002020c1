"""Package names that load their module on first use (PEP 562), so that importing one light module
of a package (a config) does not import the package's heavy ones (torch)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_names(package: str, where: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's `__getattr__` and `__dir__` for names defined in its submodules: `where` maps each
    name to the submodule (relative to `package`) that defines it."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*import_module(package).__dict__, *where})

    return __getattr__, __dir__
