"""Where biomask's progress bars go: a terminal, or a notebook kernel's output — never a log.

A Jupyter (JupyterLab, VS Code, Colab) kernel's stderr is no terminal, so a rule of "a bar on a
terminal only" showed a notebook user nothing for minutes of embedding or training; yet the notebook
draws a bar in place (tqdm.auto: a widget, or carriage returns it renders). A log file or a
pipeline's captured stderr has neither, and a bar there would be a line per refresh.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def in_kernel() -> bool:
    """Whether this process is an IPython kernel: its shell has a kernel (a terminal IPython has none)."""
    if "ipykernel" not in sys.modules:
        return False
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    try:
        shell = get_ipython() if get_ipython is not None else None
    except Exception:  # an IPython in an odd state is no reason to fail a run
        return False
    return getattr(shell, "kernel", None) is not None


def shows_bar(stream: Any = None) -> bool:
    """Whether a bar on `stream` (default: stderr) is seen as one: a terminal, or a kernel's own output."""
    stream = sys.stderr if stream is None else stream
    if bool(getattr(stream, "isatty", lambda: False)()):
        return True
    return any(stream is s for s in (sys.stdout, sys.stderr)) and in_kernel()


def bar_disabled(stream: Any = None) -> bool:
    """tqdm's `disable` for a bar of biomask's on `stream`: off where no bar is seen, and where
    TQDM_DISABLE asks (the command line sets it for --quiet and for output that is no terminal)."""
    asked = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")
    return asked or not shows_bar(stream)


def bar(total: float | None, desc: str, unit: str = "it") -> Any:
    """biomask's progress bar (tqdm.auto: a widget in a notebook): shown only where `bar_disabled`
    says it is seen, and gone when done (`leave=False`); bytes are scaled (kB, MB)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, unit=unit, unit_scale=unit == "B", desc=desc, leave=False, disable=bar_disabled()
    )
