"""safetensors files that follow the user's umask, like every other output.

safetensors writes through a private temporary file (mode 0600) that it renames into place, so a
checkpoint written on a shared cluster would be unreadable by colleagues; `save_tensors` gives the
file the mode `open()` would have given it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it, even briefly, is process-wide)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file the mode a plain `open(path, "w")` would have: 0666 less the umask."""
    os.chmod(path, 0o666 & ~current_umask())


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, *, metadata: dict[str, str] | None = None
) -> None:
    """`safetensors.torch.save_file`, with the file's mode following the umask. A write the file
    system refused (a full disk, a quota) is the OSError it is, naming the file: safetensors raises
    its own error type, which no handler of file-system errors took (a traceback, the partial
    checkpoint left)."""
    from safetensors import SafetensorError

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        code = re.search(r"\(os error (\d+)\)", str(exc))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from exc
    follow_umask(path)
