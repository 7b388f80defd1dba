"""COCO 2017 images and instance annotations into the project's dataset layout (`ssd data download coco`,
and the `download-coco` flow).

Result (local folder or ``s3://``)::

    OUTPUT/annotations/instances_train.json   <- annotations_trainval2017.zip: annotations/instances_train2017.json
    OUTPUT/annotations/instances_val.json     <- annotations_trainval2017.zip: annotations/instances_val2017.json
    OUTPUT/train/*.jpg                        <- train2017.zip: train2017/*.jpg
    OUTPUT/val/*.jpg                          <- val2017.zip: val2017/*.jpg
    OUTPUT/_download/<archive>.json           one marker per archive: url, size, md5, sha256, files

`download_coco` runs the steps (fetch, extract, upload) it is given: plain functions with a retry loop
here, Prefect tasks with retries in the flow.
A download streams into ``<archive>.part`` and continues it with an HTTP Range request after an
interruption; the finished file is checked against the expected size (the known COCO size, else the
server's Content-Length) and MD5 (known for the COCO archives), and its SHA-256 is recorded in the
marker. An archive whose marker exists is neither fetched nor extracted again. Extraction validates
every entry first and rejects the whole archive if any entry is absolute, climbs out with ``..``, or is
a symlink (zip-slip).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import stat
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ssd_core import storage

log = logging.getLogger(__name__)

COCO_BASE_URL = "http://images.cocodataset.org"
MARKER_DIR = "_download"
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class RemoteArchive:
    """One archive under a base URL; ``size``/``md5`` are checked when known (the official files)."""

    path: str  # relative to the base URL
    size: int | None = None
    md5: str | None = None

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


# Official sizes and MD5s (the S3 ETags of images.cocodataset.org, published by many mirrors).
COCO_ARCHIVES = {
    "train": RemoteArchive("zips/train2017.zip", 19_336_861_798, "cced6f7f71b7629ddf16f17bbcfab6b2"),
    "val": RemoteArchive("zips/val2017.zip", 815_585_330, "442b8da7639aecaf257c1dceb8ba8c80"),
    "annotations": RemoteArchive("annotations/annotations_trainval2017.zip", 252_907_541,
                                 "f4bbac642086de4f52a3fdda2de5fa2c"),
}


class DownloadError(RuntimeError):
    """A transfer that did not produce the expected bytes (retrying may help)."""


class ChecksumError(DownloadError):
    """Size or digest differs from the expected value; the partial file has been removed."""


class UnsafeArchiveError(ValueError):
    """An archive entry would land outside the target folder (absolute path, '..', symlink)."""


# --------------------------------------------------------------------------- download


def _digests_of_prefix(path: Path) -> tuple[Any, Any]:
    """md5 and sha256 objects fed with the bytes already in ``path`` (a resumed .part)."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            md5.update(chunk)
            sha256.update(chunk)
    return md5, sha256


def _total_size(response, offset: int) -> int | None:
    """Full object size from a 206 Content-Range or a 200 Content-Length."""
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")  # bytes START-END/TOTAL
        total = content_range.rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def download_file(url: str, dest: str | os.PathLike, *, expected_size: int | None = None,
                  expected_md5: str | None = None, timeout: float = 60.0, progress: bool = True) -> dict[str, Any]:
    """Stream ``url`` to ``dest`` through ``dest.part``, resuming a previous partial transfer.

    Returns ``{"url", "size", "md5", "sha256"}``. Raises DownloadError when the connection ends early
    (the ``.part`` file is kept so the next call resumes) and ChecksumError when the complete file has
    the wrong size or MD5 (the ``.part`` file is removed so the next call starts over).
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()  # longer than the object: not a prefix of it
        offset = 0

    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset and offset == expected_size:
            response = None  # the .part file is already complete
        else:
            raise DownloadError(f"GET {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"GET {url}: {exc}") from None

    if response is None:
        total = offset
    else:
        with response:
            if offset and response.status != 206:
                offset = 0  # the server ignored the Range header: start over
            total = _total_size(response, offset)
            if expected_size is not None and total is not None and total != expected_size:
                raise ChecksumError(f"{url}: server reports {total} bytes, expected {expected_size}")
            total = expected_size if expected_size is not None else total
            md5, sha256 = _digests_of_prefix(part) if offset else (hashlib.md5(usedforsecurity=False),
                                                                    hashlib.sha256())
            with part.open("ab" if offset else "wb") as out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name, disable=not progress,
                mininterval=5,
            ) as bar:
                try:
                    while chunk := response.read(CHUNK_BYTES):
                        out.write(chunk)
                        md5.update(chunk)
                        sha256.update(chunk)
                        bar.update(len(chunk))
                except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
                    raise DownloadError(f"GET {url}: connection lost after {out.tell()} bytes ({exc}); "
                                        "the next attempt resumes") from None
    size = part.stat().st_size
    if total is None:
        raise DownloadError(f"GET {url}: the server sent no Content-Length; cannot verify the size")
    if size < total:
        raise DownloadError(f"GET {url}: got {size} of {total} bytes; the next attempt resumes")
    if response is None:
        md5, sha256 = _digests_of_prefix(part)
    if size != total or (expected_md5 is not None and md5.hexdigest() != expected_md5):
        part.unlink()
        raise ChecksumError(f"{url}: got {size} bytes with MD5 {md5.hexdigest()}, expected {total} bytes"
                            + (f" with MD5 {expected_md5}" if expected_md5 else ""))
    os.replace(part, dest)
    return {"url": url, "size": size, "md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


# --------------------------------------------------------------------------- extraction


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _check_member(info: zipfile.ZipInfo) -> None:
    """Raise UnsafeArchiveError unless the entry is a plain relative path inside the archive root."""
    name = info.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"archive entry {name!r} is an absolute path")
    if ".." in parts:
        raise UnsafeArchiveError(f"archive entry {name!r} climbs out of the target folder ('..')")
    if _is_symlink(info):
        raise UnsafeArchiveError(f"archive entry {name!r} is a symbolic link")


def safe_members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The archive's file entries, after checking every entry (any unsafe one rejects the archive)."""
    members = archive.infolist()
    for info in members:
        _check_member(info)
    return [info for info in members if not info.is_dir()]


def extract_zip(archive_path: str | os.PathLike, target: str | os.PathLike,
                rename: Callable[[str], str | None] = lambda name: name) -> list[str]:
    """Extract the files of a zip into ``target``; returns the written paths relative to ``target``.

    ``rename(entry_name)`` maps an entry to its relative destination, or None to skip it. Each file is
    written to a temporary name and renamed into place, so an interrupted extraction leaves no
    truncated file under its final name.
    """
    target = Path(target).resolve()
    written = []
    with zipfile.ZipFile(archive_path) as archive:
        for info in safe_members(archive):
            relative = rename(info.filename)
            if relative is None:
                continue
            destination = (target / relative).resolve()
            if not destination.is_relative_to(target):  # rename() must not undo the checks either
                raise UnsafeArchiveError(f"archive entry {info.filename!r} maps outside {target}")
            destination.parent.mkdir(parents=True, exist_ok=True)
            temporary = destination.with_name(f".{destination.name}.tmp")
            with archive.open(info) as source, temporary.open("wb") as sink:
                shutil.copyfileobj(source, sink, CHUNK_BYTES)
            os.replace(temporary, destination)
            written.append(destination.relative_to(target).as_posix())
    return written


def coco_layout(entry: str) -> str | None:
    """COCO archive entry -> path in the project layout, or None for entries the project does not use.

    ``train2017/x.jpg`` -> ``train/x.jpg``; ``annotations/instances_val2017.json`` ->
    ``annotations/instances_val.json``; captions, keypoints and other annotation files are skipped.
    """
    top, _, rest = entry.partition("/")
    if top in ("train2017", "val2017") and rest:
        return f"{top.removesuffix('2017')}/{rest}"
    if top == "annotations" and rest in ("instances_train2017.json", "instances_val2017.json"):
        return f"annotations/{rest.replace('2017', '')}"
    return None


# --------------------------------------------------------------------------- markers and upload


def marker_uri(output: str, archive: RemoteArchive) -> str:
    return storage.join_uri(output, MARKER_DIR, archive.name + ".json")


def read_marker(output: str, archive: RemoteArchive) -> dict[str, Any] | None:
    """The completion marker of ``archive`` under ``output``, or None if it was not finished there."""
    uri = marker_uri(output, archive)
    if not storage.exists(uri):
        return None
    with storage.open_uri(uri, "rb") as handle:
        return json.loads(handle.read())


def write_marker(output: str, archive: RemoteArchive, record: dict[str, Any]) -> str:
    uri = marker_uri(output, archive)
    storage.atomic_write_bytes(uri, json.dumps(record, indent=1).encode())
    return uri


# --------------------------------------------------------------------------- the job


def is_transient(exc: BaseException) -> bool:
    """Network and storage errors are worth retrying; bugs and unsafe archives are not."""
    return isinstance(exc, DownloadError | OSError | http.client.HTTPException)


def retrying(step: Callable[..., Any], attempts: int = 7, first_delay_s: float = 5.0) -> Callable[..., Any]:
    """``step`` retried on transient errors with exponential backoff (a download resumes its .part)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(attempts):
            try:
                return step(*args, **kwargs)
            except Exception as exc:
                if attempt == attempts - 1 or not is_transient(exc):
                    raise
                delay = first_delay_s * 2**attempt
                log.warning("%s; retrying in %.0f s (%d of %d)", exc, delay, attempt + 1, attempts - 1)
                time.sleep(delay)
        raise AssertionError("unreachable")

    return run


def fetch_archive(url: str, archive: RemoteArchive, folder: str) -> dict[str, Any]:
    """Download one archive into ``folder`` (resumes its .part file when called again)."""
    return download_file(url, Path(folder) / archive.name, expected_size=archive.size, expected_md5=archive.md5)


def extract_coco_archive(archive_path: str, target: str) -> list[str]:
    return extract_zip(archive_path, target, rename=coco_layout)


def download_coco(
    output: str = "data/coco", splits: Iterable[str] = ("train", "val"), *, base_url: str = COCO_BASE_URL,
    staging_dir: str | None = None, keep_archives: bool = False,
    fetch: Callable[[str, RemoteArchive, str], dict[str, Any]] = retrying(fetch_archive),
    extract: Callable[[str, str], list[str]] = extract_coco_archive,
    upload: Callable[[str, list[str], str], int] = retrying(storage.upload_files),
    info: Callable[..., None] = log.info,
) -> str:
    """Download COCO 2017 ``splits`` and the instance annotations into ``output`` (folder or s3://).

    Archives are staged in ``OUTPUT/_download/`` (local output) or ``staging_dir`` (default: a folder
    under the system temp dir, for s3:// output) and deleted after extraction unless ``keep_archives``.
    With a ``base_url`` other than the official one (a mirror, a test server) the known COCO sizes and
    MD5s are not applied: the size comes from Content-Length and the SHA-256 is recorded.
    """
    splits = list(splits)
    unknown = set(splits) - {"train", "val"}
    if unknown or not splits:
        raise ValueError(f"splits {splits!r}: choose from 'train' and 'val'")
    official = base_url.rstrip("/") == COCO_BASE_URL
    remote = storage.is_s3(output)
    staging = Path(staging_dir or Path(tempfile.gettempdir()) / "ssd-coco-staging") if remote else Path(output)
    archive_dir = staging / MARKER_DIR

    for key in ["annotations", *splits]:
        archive = COCO_ARCHIVES[key] if official else RemoteArchive(COCO_ARCHIVES[key].path)
        done = read_marker(output, archive)
        if done is not None:
            info("%s: already downloaded and extracted (%d files, sha256 %s)", archive.name, done["files"],
                 done["sha256"])
            continue
        url = f"{base_url.rstrip('/')}/{archive.path}"
        record = fetch(url, archive, str(archive_dir))
        archive_path = archive_dir / archive.name
        files = extract(str(archive_path), str(staging))
        if remote:
            upload(str(staging), files, output)
            for name in files:
                (staging / name).unlink()
        record["files"] = len(files)
        write_marker(output, archive, record)
        if not keep_archives:
            archive_path.unlink()
        info("%s: %d files into %s (sha256 %s)", archive.name, len(files), output, record["sha256"])
    return output
