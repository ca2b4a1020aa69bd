"""Streaming downloads with checksum verification, shared by the dataset loaders.

Every file is streamed into a temporary file next to its destination while its digest
(SHA-256, or MD5 where the publisher gives only that, as MedMNIST does) is computed; only
when the digest equals the publisher's does ``os.replace`` move it into place
(:func:`atomic_file`). So a destination path either holds a verified file or nothing: an
interrupted or corrupted transfer never leaves a plausible-looking file behind, and a later
run can skip every file whose digest already matches (so :func:`fetch_tree` resumes).

No network is the normal case on many clusters. Connections use a short timeout and the
failure is reported as :class:`DownloadError` whose message says what failed (DNS,
refused, timeout) and how to point the loader at a manual download instead.
"""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from detjax.manifest import atomic_file

__all__ = ["DownloadError", "ChecksumError", "DEFAULT_TIMEOUT", "atomic_file", "file_digests", "file_sha256",
           "verified", "parse_sha256sums", "fetch", "fetch_bytes", "fetch_tree", "fetch_release"]

#: Seconds allowed for the TCP connect and for each read; short so that a machine without
#: network fails in seconds, not minutes.
DEFAULT_TIMEOUT = 10.0
_CHUNK = 1 << 20
_USER_AGENT = "detjax-downloader/1"


class DownloadError(OSError):
    """A file could not be fetched (no network, DNS failure, HTTP error, timeout)."""


class ChecksumError(ValueError):
    """A file's digest differs from the published one; nothing was kept.

    ``algorithm``, ``expected`` and ``actual`` name the check that failed (``None`` when the
    error was raised with a message only)."""

    def __init__(self, message: str, *, algorithm: str | None = None, expected: str | None = None,
                 actual: str | None = None):
        super().__init__(message)
        self.algorithm, self.expected, self.actual = algorithm, expected, actual


def file_digests(path: str | os.PathLike[str], algorithms: Iterable[str] = ("sha256",), *,
                 chunk: int = _CHUNK) -> dict[str, str]:
    """``{algorithm: hex digest}`` of a file's bytes, every algorithm in ONE read of the file."""
    digests = {name: hashlib.new(name, usedforsecurity=False) for name in algorithms}
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            for digest in digests.values():
                digest.update(block)
    return {name: digest.hexdigest() for name, digest in digests.items()}


def file_sha256(path: str | os.PathLike[str], *, chunk: int = _CHUNK) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk``-sized pieces."""
    return file_digests(path, chunk=chunk)["sha256"]


def _expectation(sha256: str | None, md5: str | None) -> tuple[str, str] | None:
    """``(algorithm, expected hex digest)``, or ``None`` for an unverified fetch."""
    if sha256 is not None and md5 is not None:
        raise ValueError("give one expected digest, sha256= or md5=, not both")
    if sha256 is None and md5 is None:
        return None
    return ("sha256", sha256.lower()) if sha256 is not None else ("md5", md5.lower())


def verified(path: str | os.PathLike[str], *, sha256: str | None = None, md5: str | None = None) -> bool:
    """Whether ``path`` is a file whose digest equals the expected one (``False`` without one)."""
    expected = _expectation(sha256, md5)
    return (expected is not None and Path(path).is_file()
            and file_digests(path, (expected[0],))[expected[0]] == expected[1])


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
    sha256: str | None = None,
    md5: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Stream ``url`` to ``dest``, verifying its SHA-256 or MD5; atomic (temp file + ``os.replace``).

    At most one of ``sha256`` and ``md5`` may be given; with neither the file is kept
    unverified (only for a checksum list itself, or a file without a published digest).
    On a digest mismatch raises :class:`ChecksumError` naming the URL and both digests; the
    temporary file is removed and ``dest`` is left untouched (absent if it was absent).
    """
    _check_scheme(url)
    expected = _expectation(sha256, md5)
    digest = hashlib.new(expected[0] if expected else "sha256", usedforsecurity=False)
    with atomic_file(dest) as out, _open(url, timeout) as response:
        try:
            while block := response.read(_CHUNK):
                digest.update(block)
                out.write(block)
        except OSError as exc:
            raise DownloadError(f"could not download {url}: {_describe_failure(url, exc)}") from exc
        got = digest.hexdigest()
        if expected is not None and got != expected[1]:
            raise ChecksumError(f"checksum mismatch for {url}: expected {expected[0]} {expected[1]}, got {got}; "
                                f"the file was not kept", algorithm=expected[0], expected=expected[1], actual=got)
    return Path(dest)


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
        if verified(target, sha256=sums[name]):
            report["skipped"].append(name)
            continue
        fetch(base_url + urllib.parse.quote(name), target, sha256=sums[name], timeout=timeout)
        report["downloaded"].append(name)
    return report


def fetch_release(
    base_url: str,
    dest_dir: str | os.PathLike[str],
    *,
    select: Callable[[str], bool],
    required: Iterable[str],
    what: str,
    hint: str,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = False,
    finish: Callable[[Mapping[str, str]], Any] = lambda sums: None,
) -> Any:
    """A PhysioNet-style release: ``base_url/SHA256SUMS.txt``, then every listed file that
    ``select`` accepts (:func:`fetch_tree`, resumable), each verified against the list.

    ``required`` names files the list must hold (``ValueError`` otherwise). A failure is a
    :class:`DownloadError` naming ``what`` and ending with ``hint`` (how to download by hand).
    Then ``finish(sums)`` runs (e.g. unpacking), and ``dest_dir/SHA256SUMS.txt`` is written
    last, atomically, so its presence marks a complete download. Returns what ``finish`` returns.
    """
    base = base_url if base_url.endswith("/") else base_url + "/"
    dest = Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        sums_text = fetch_bytes(base + "SHA256SUMS.txt", timeout=timeout).decode("utf-8")
    except DownloadError as exc:
        raise DownloadError(f"{what} could not be downloaded: {exc}. {hint}") from exc
    sums = parse_sha256sums(sums_text, source=base + "SHA256SUMS.txt")
    for name in required:
        if name not in sums:
            raise ValueError(f"{base}SHA256SUMS.txt does not list {name}; is {base} a {what} release?")
    try:
        fetch_tree(base, dest, sums, select=select, timeout=timeout, progress=progress)
    except DownloadError as exc:
        raise DownloadError(f"{what} download stopped: {exc}. Files already verified are kept; run again to "
                            f"resume. {hint}") from exc
    result = finish(sums)
    with atomic_file(dest / "SHA256SUMS.txt") as out:
        out.write(sums_text.encode("utf-8"))
    return result
