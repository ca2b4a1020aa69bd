"""Streaming downloads with SHA-256 verification, shared by the dataset loaders.

Every file is streamed into a temporary file next to its destination while its SHA-256
is computed; only when the digest equals the publisher's does ``os.replace`` move it into
place. So a destination path either holds a verified file or nothing: an interrupted or
corrupted transfer never leaves a plausible-looking file behind, and a later run can skip
every file whose digest already matches (that is what makes :func:`fetch_tree` resumable).

No network is the normal case on many clusters. Connections use a short timeout and the
failure is reported as :class:`DownloadError` whose message says what failed (DNS,
refused, timeout) and how to point the loader at a manual download instead.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath

__all__ = [
    "DownloadError",
    "ChecksumError",
    "DEFAULT_TIMEOUT",
    "file_sha256",
    "parse_sha256sums",
    "fetch",
    "fetch_bytes",
    "fetch_tree",
]

#: Seconds allowed for the TCP connect and for each read; short so that a machine without
#: network fails in seconds, not minutes.
DEFAULT_TIMEOUT = 10.0
_CHUNK = 1 << 20
_USER_AGENT = "detjax-downloader/1"


class DownloadError(OSError):
    """A file could not be fetched (no network, DNS failure, HTTP error, timeout)."""


class ChecksumError(ValueError):
    """A fetched file's SHA-256 differs from the published one; nothing was kept."""


def file_sha256(path: str | os.PathLike[str], *, chunk: int = _CHUNK) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk``-sized pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _safe_relpath(name: str, *, source: str) -> str:
    """``name`` as a normalised relative POSIX path; refuses absolute paths and ``..``.

    A checksum list is downloaded data: it must not be able to write outside ``dest_dir``.
    """
    path = PurePosixPath(name.lstrip("*"))  # "*" marks binary mode in sha256sum output
    if path.is_absolute() or not path.parts or ".." in path.parts or "\\" in name:
        raise ValueError(f"{source}: refusing unsafe path {name!r}")
    return path.as_posix()


def parse_sha256sums(text: str, *, source: str = "SHA256SUMS.txt") -> dict[str, str]:
    """Parse ``sha256sum`` output (``<64 hex> <path>`` per line) into ``{path: digest}``.

    Blank lines and ``#`` comments are ignored; anything else that is not a 64-hex digest
    followed by a safe relative path raises ``ValueError`` naming ``source`` and the line.
    """
    sums: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        digest = parts[0].lower()
        if len(parts) != 2 or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{source} line {lineno}: expected '<sha256> <path>', got {raw!r}")
        name = _safe_relpath(parts[1].strip(), source=f"{source} line {lineno}")
        if name in sums and sums[name] != digest:
            raise ValueError(f"{source} line {lineno}: two different digests for {name!r}")
        sums[name] = digest
    return sums


def _describe_failure(url: str, exc: BaseException) -> str:
    """One-phrase cause of a failed request, distinguishing DNS, refusal and timeouts."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) and not isinstance(
        exc, urllib.error.HTTPError) else exc
    host = urllib.parse.urlsplit(url).netloc
    if isinstance(exc, urllib.error.HTTPError):
        return f"the server answered HTTP {exc.code} {exc.reason}"
    if isinstance(reason, socket.gaierror):
        return f"the host name {host!r} could not be resolved (DNS failure: {reason}); no network?"
    if isinstance(reason, ConnectionRefusedError):
        return f"the connection to {host} was refused"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer from {host} within the timeout"
    return f"{type(reason).__name__}: {reason}"


def _open(url: str, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (http(s) only)
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"could not download {url}: {_describe_failure(url, exc)}") from exc


def _check_scheme(url: str) -> None:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"only http(s) URLs can be fetched, got {url!r}")


def fetch_bytes(url: str, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = 64 << 20) -> bytes:
    """The body of ``url`` in memory (for small index files such as ``SHA256SUMS.txt``)."""
    _check_scheme(url)
    with _open(url, timeout) as response:
        try:
            body = response.read(max_bytes + 1)
        except OSError as exc:
            raise DownloadError(f"could not download {url}: {_describe_failure(url, exc)}") from exc
    if len(body) > max_bytes:
        raise DownloadError(f"{url} is larger than {max_bytes} bytes; refusing to read it into memory")
    return body


def fetch(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Stream ``url`` to ``dest``, verifying its SHA-256; atomic (temp file + ``os.replace``).

    With ``sha256=None`` the file is kept unverified (only for the checksum list itself).
    On a digest mismatch raises :class:`ChecksumError` naming the URL and both digests; the
    temporary file is removed and ``dest`` is left untouched (absent if it was absent).
    """
    _check_scheme(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, _open(url, timeout) as response:
            try:
                while block := response.read(_CHUNK):
                    digest.update(block)
                    out.write(block)
            except OSError as exc:
                raise DownloadError(f"could not download {url}: {_describe_failure(url, exc)}") from exc
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if sha256 is not None and got != sha256.lower():
            raise ChecksumError(f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, got {got}; "
                                f"the file was not kept")
        os.replace(tmp_name, dest)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return dest


def fetch_tree(
    base_url: str,
    dest_dir: str | os.PathLike[str],
    sums: Mapping[str, str],
    *,
    select: Callable[[str], bool] = lambda name: True,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = False,
) -> dict[str, list[str]]:
    """Fetch every ``path`` of ``sums`` that ``select`` accepts from ``base_url + path``.

    A file already present with the right SHA-256 is skipped (so an interrupted run resumes
    where it stopped). Returns ``{"downloaded": [...], "skipped": [...]}`` (relative paths).
    """
    if not base_url.endswith("/"):
        base_url += "/"
    dest_dir = Path(dest_dir)
    names: Iterable[str] = sorted(name for name in sums if select(name))
    report: dict[str, list[str]] = {"downloaded": [], "skipped": []}
    if progress:
        from tqdm.auto import tqdm

        names = tqdm(list(names), desc="download", unit="file")
    for name in names:
        target = dest_dir / name
        if target.is_file() and file_sha256(target) == sums[name]:
            report["skipped"].append(name)
            continue
        fetch(base_url + urllib.parse.quote(name), target, sha256=sums[name], timeout=timeout)
        report["downloaded"].append(name)
    return report
