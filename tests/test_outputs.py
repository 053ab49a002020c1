"""atomic_file: the one way biomask writes a single file (embed's .h5ad output, fit_cells' input copy,
sbatch scripts, downloads, JSON/YAML beside runs) -- the old file or the whole new one, never part."""

from __future__ import annotations

import pytest

from biomask.outputs import atomic_file, atomic_write_text


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out" / "emb.h5ad"  # the folder is created
    atomic_write_text(target, "first")
    assert target.read_text() == "first"

    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half of the sec")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "first"

    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and not tmp.exists()  # same folder: the rename is atomic
        tmp.write_text("second")
        assert target.read_text() == "first"  # nothing replaced until the block ends
    assert target.read_text() == "second"

    with atomic_file(target) as tmp:
        tmp.write_text("second")
        tmp.unlink()  # the writer decided to keep the old file (e.g. identical content)
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["emb.h5ad"]  # no temporary left
