"""Input patterns: `path: genomes/*.fa.gz` in a prep stage's `inputs:` names every file it matches,
each an input of its own, so a corpus of hundreds of files needs no entry per file."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from biomask.errors import InputError


def pattern_matches(text: str, *, folders: bool = False) -> list[Path] | None:
    """The files (and with `folders`, the folders: 10x matrix directories) a pattern in an input's
    `path:` matches, sorted; None when `text` is no pattern, or names a path that exists as written
    (a file called `sample[1].fa` is that file). `**/` reaches into subfolders. A pattern that matches
    nothing is an error naming it."""
    path = Path(text).expanduser()
    if path.exists() or not glob.has_magic(text):
        return None
    matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
    found = [m for m in matches if m.is_file() or (folders and m.is_dir())]
    if not found:
        raise InputError(
            f"input pattern {text} matches no file"
            + (f" (only the folders {', '.join(map(str, matches[:3]))})" if matches else "")
            + (
                ""
                if path.is_absolute()
                else f"; relative paths are read from the working directory, {os.getcwd()}"
            )
        )
    return found
