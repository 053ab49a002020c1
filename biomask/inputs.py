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


def distinct_names(paths: list[Path]) -> list[str]:
    """Each input's name in a store (its records' `source`, the manifest's entries per input): the
    file name, or where inputs share one -- every Cell Ranger sample is a `filtered_feature_bc_matrix`
    folder -- as many of its last path parts as tell it apart (`sampleA/filtered_feature_bc_matrix`),
    so cells and windows still say which input they came from. One file listed twice keeps one name."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    names = []
    for mine in parts:
        others = [other for other in parts if other != mine]
        depth = 1
        while depth < len(mine) and any(other[-depth:] == mine[-depth:] for other in others):
            depth += 1
        names.append("/".join(mine[-depth:]))
    return names
