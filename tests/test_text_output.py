"""What biomask writes and prints outside a UTF-8 terminal: its text files are UTF-8 whatever the
locale, and a closed or ASCII-only stdout/stderr fails no command."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# a locale whose encoding is ASCII, with Python's own escapes from it (UTF-8 mode, C-locale coercion) off
ASCII_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}


def _biomask(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "biomask", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        cwd=REPO,
        timeout=300,
        **kwargs,
    )


def test_every_text_read_and_write_in_biomask_names_its_encoding():
    """Python opens text in the locale's encoding: under a latin-1 locale evaluate, report, theory and
    export-hf crashed after all their work on 'Δ' or '–', and under GB18030 they wrote files that were
    not UTF-8 (exit 0). Every text file biomask reads or writes says encoding= (this walks the source)."""
    missing = []
    for path in sorted((REPO / "biomask").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            encoding = next((k.value for k in node.keywords if k.arg == "encoding"), None)
            if isinstance(encoding, ast.Constant) and isinstance(encoding.value, str):
                continue  # named (encoding=None would be the locale's again)
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            # the mode: open(path, mode), os.fdopen(fd, mode), path.open(mode)
            method = name == "open" and isinstance(func, ast.Attribute) and not _module(func)
            at = 0 if method else 1
            mode = next((a.value for a in node.args[at : at + 1] if isinstance(a, ast.Constant)), None)
            for keyword in node.keywords:
                if keyword.arg == "mode" and isinstance(keyword.value, ast.Constant):
                    mode = keyword.value.value
            # a method named open is a path's only with a mode given (zip members, encoders have their own)
            opens = (
                name == "open" and not _module(func) and (not method or mode is not None)
            ) or name == "fdopen"
            text_open = opens and (mode is None or "b" not in str(mode))
            reads = name == "read_text" and not node.args
            writes = name == "write_text" and len(node.args) == 1
            if reads or writes or text_open:
                missing.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    assert missing == []


def _module(func: ast.expr) -> bool:
    """`os.open`, `gzip.open` and the like: a module's open, not a text open of a path."""
    modules = ("os", "gzip", "bz2", "lzma", "tarfile", "zipfile", "h5py", "io", "mmap")
    return isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in modules


def test_under_an_ascii_locale_files_are_utf8_and_a_closed_or_ascii_stream_fails_nothing(tmp_path):
    out = tmp_path / "reference.md"
    run = _biomask("config-reference", "--output", str(out), env=ASCII_LOCALE)
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    assert "≥" in out.read_text(encoding="utf-8")  # written as UTF-8, not refused or mangled
    run = _biomask("--help", env={"PYTHONIOENCODING": "ascii"})  # names R²MAE
    assert run.returncode == 0 and b"R\\xb2MAE" in run.stdout, run.stderr[-2000:]
    script = "import os, sys; from biomask.cli import main; os.close(1); sys.stdout = None; sys.exit(main(['datasets', 'list']))"
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=False, stderr=subprocess.PIPE, cwd=REPO, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]  # `>&-`: was an AttributeError at the last flush, exit 1
    script = "import sys; from biomask.cli import main; sys.stderr = None; sys.exit(main(['datasets', 'list', '--json']))"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=REPO, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith(b"{")  # `2>&-`: every command did nothing, exit 1


def test_deepspeeds_op_probe_prints_nothing_into_a_notebook_cell(capfd):
    """Reading DeepSpeed's op table compiles test programs; their linker errors ("cannot find
    -laio") reached a Jupyter cell's output, whose captured descriptor is not the one DeepSpeed
    silences. The block points every output descriptor at /dev/null, and gives them back."""
    import os
    import subprocess
    import sys

    from biomask.training.distributed import _silenced_descriptors

    print("before", flush=True)
    with _silenced_descriptors():
        os.write(2, b"linker noise\n")
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('child noise')"], check=True)
    print("after", flush=True)
    out, err = capfd.readouterr()
    assert out == "before\nafter\n" and "noise" not in err


def test_the_silenced_block_covers_a_kernels_own_stdout_and_gives_every_descriptor_back(
    tmp_path, capfd, monkeypatch
):
    """A Jupyter kernel's sys.stdout is not fd 1: its descriptor is silenced too. Whatever the block
    does — raise included — each descriptor comes back as it was (close-on-exec flag too: a kernel's
    copy made inheritable reached every child), and none is left open."""
    import os
    import sys

    import deepspeed
    import pytest
    import torch

    from biomask.training import distributed
    from biomask.training.distributed import _silenced_descriptors

    own = open(tmp_path / "kernel-stdout", "w")
    monkeypatch.setattr(sys, "stdout", own)
    assert own.fileno() not in (1, 2) and not os.get_inheritable(own.fileno())
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(RuntimeError), _silenced_descriptors():
        os.write(own.fileno(), b"noise in the cell")
        raise RuntimeError("the probe failed")
    assert set(os.listdir("/proc/self/fd")) == before and not os.get_inheritable(own.fileno())
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"

    # and DeepSpeed's op probe (reading its table) runs inside it: what it writes reaches no descriptor
    class Probed(dict):
        def __setitem__(self, key, value):
            os.write(2, b"linker noise")
            os.write(own.fileno(), b"cell noise")

    monkeypatch.setattr(deepspeed.ops, "__compatible_ops__", Probed())
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # the group: not the subject
    distributed.init_process_group(distributed.setup_env(None))
    own.close()
    assert "noise" not in capfd.readouterr().err and (tmp_path / "kernel-stdout").read_text() == ""


def test_two_threads_silencing_at_once_leave_the_descriptors_as_they_were():
    """A second thread's block, entered while the first's held fd 1 on /dev/null, took /dev/null for
    the original and put it back last: the process's output was lost for good. One at a time."""
    import os
    import threading
    import time

    from biomask.training.distributed import _silenced_descriptors

    before = [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)]
    inside = threading.Event()

    def first():
        with _silenced_descriptors():
            inside.set()
            time.sleep(0.3)

    def second():  # in while the first is, out after it
        inside.wait()
        with _silenced_descriptors():
            time.sleep(0.5)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)] == before
