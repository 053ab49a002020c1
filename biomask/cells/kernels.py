"""numba compilation of the cells stages' kernels, cached where numba can cache.

numba's `cache=True` writes the compiled kernel beside the module (`__pycache__`), else under
`~/.cache/numba`; where neither is writable (a read-only install or container with a read-only
home) it refuses at decoration, and every `prep cells` and `embed` failed with a traceback. The
kernel is then compiled for this process only (a second or so), said once; `NUMBA_CACHE_DIR` names a
writable cache instead.

scanpy, umap and pynndescent decorate their own functions with `cache=True` when imported, and fail
the same way (a traceback after `embed` had embedded every cell): `use_writable_cache`, called by the
command line before anything imports numba, points numba at a private temporary folder when the
home's cache cannot be written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_said = False
_SET_HERE = "BIOMASK_SET_NUMBA_CACHE_DIR"  # NUMBA_CACHE_DIR is this machine's choice, not the user's


def environment_for_jobs() -> dict[str, str]:
    """This process's environment for jobs that run on other machines (sbatch passes it on): without a
    NUMBA_CACHE_DIR that `use_writable_cache` chose for this machine's home and temporary folder
    (each job's own command line decides for its node)."""
    env = dict(os.environ)
    if env.get(_SET_HERE) and env.get(_SET_HERE) == env.get("NUMBA_CACHE_DIR"):
        del env["NUMBA_CACHE_DIR"]
    env.pop(_SET_HERE, None)
    return env


@contextlib.contextmanager
def _out_of_an_installed_package(numba: Any) -> Any:
    """numba's user-wide cache for the kernels decorated inside, where biomask is an installed copy:
    numba's first choice, `__pycache__` beside the module, wrote into site-packages files pip does
    not record, which `pip uninstall` left behind (a `biomask` that still imports, empty). numba
    picks a function's cache folder when it is decorated, so this touches only biomask's kernels.
    A source checkout keeps the in-tree cache; NUMBA_CACHE_DIR set decides on its own. Where the
    user-wide folder cannot be written, numba would go back to `__pycache__`: no cache then."""
    from biomask.resources import source_checkout

    config = numba.core.config
    if config.CACHE_DIR or source_checkout() is not None:
        yield
        return
    from numba.misc.appdirs import AppDirs

    folder = AppDirs(appname="numba", appauthor=False).user_cache_dir
    try:
        os.makedirs(folder, exist_ok=True)
        writable = os.access(folder, os.W_OK | os.X_OK)
    except OSError:
        writable = False
    if not writable:
        raise RuntimeError(f"cannot cache outside the installed package: {folder} cannot be written")
    previous, config.CACHE_DIR = config.CACHE_DIR, folder
    try:
        yield
    finally:
        config.CACHE_DIR = previous


def njit(func: Callable[..., Any]) -> Any:
    """`numba.njit(cache=True, nogil=True)`, or without the cache where it cannot be written."""
    import numba

    global _said
    try:
        with _out_of_an_installed_package(numba):
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


# A home that is full or over quota passes a permission check, then failed numba's save mid-command
# (ENOSPC after the work, naming no file); biomask's kernels' cache files and umap's take about a MB
_PROBE_BYTES = 1 << 20


def _room_for_a_cache(folder: Path) -> bool:
    """Whether `folder` takes a file of `_PROBE_BYTES` (written, closed, removed). Random bytes: a
    file system that compresses stores zeros as nothing. A unique name: a probe a killed run left
    (its PID is the next container's too) must not make every later run look elsewhere; such
    leftovers over an hour old are removed."""
    for old in folder.glob(".biomask-probe-*"):
        with contextlib.suppress(OSError):
            if time.time() - old.lstat().st_mtime > 3600:
                old.unlink()
    try:
        fd, name = tempfile.mkstemp(prefix=".biomask-probe-", dir=folder)
    except OSError:
        return False
    try:
        try:
            written = os.write(fd, os.urandom(_PROBE_BYTES))
        finally:
            os.close(fd)  # NFS reports a full quota here
        return written == _PROBE_BYTES
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def use_writable_cache() -> Path | None:
    """Where numba's user-wide cache (`$XDG_CACHE_HOME/numba`, else `~/.cache/numba`) cannot be written
    (or has no room) and NUMBA_CACHE_DIR is unset: set it to `$TMPDIR/biomask-numba-UID` (this user's, mode 0700) and
    say so once; returns that folder (None: nothing changed)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()) / "numba"
    try:
        home_cache.mkdir(parents=True, exist_ok=True)
        if os.access(home_cache, os.W_OK | os.X_OK) and _room_for_a_cache(home_cache):
            return None
    except OSError:
        pass
    folder = Path(tempfile.gettempdir()) / f"biomask-numba-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
    except OSError:
        return None  # biomask's own kernels still compile uncached (njit above)
    if folder.is_symlink() or info.st_uid != os.getuid() or not os.access(folder, os.W_OK):
        return None  # another user's folder under that name: not ours to use
    os.environ["NUMBA_CACHE_DIR"] = str(folder)
    os.environ[_SET_HERE] = str(folder)
    if "numba" in sys.modules:  # read when a function is decorated, so it still applies
        sys.modules["numba"].core.config.CACHE_DIR = str(folder)
    log.warning(
        "numba's cache (%s) cannot be written: compiling into %s instead (set NUMBA_CACHE_DIR to choose)",
        home_cache,
        folder,
    )
    return folder
