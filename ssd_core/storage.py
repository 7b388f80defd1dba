"""Local paths and ``s3://`` URIs behind one small API (fsspec for Python I/O, pyarrow.fs for Arrow).

S3 endpoint and credentials come from the standard AWS environment: the credential chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, config files,
instance roles) is left to botocore / the AWS C++ SDK; a custom endpoint is read from
``AWS_ENDPOINT_URL_S3`` (wins) or ``AWS_ENDPOINT_URL`` and passed explicitly, because not every
library honours those variables. Nothing here logs or returns credentials.

``storage_options`` (optional everywhere) are s3fs keyword arguments (``key``, ``secret``, ``token``,
``endpoint_url``, ``client_kwargs``, ``profile``...); they override the environment.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import IO, Any
from urllib.parse import urlparse

__all__ = [
    "is_s3",
    "s3_endpoint_from_env",
    "s3_region_from_env",
    "local_path",
    "filesystem_for",
    "pyarrow_filesystem_for",
    "atomic_write_bytes",
    "open_uri",
    "read_bytes",
    "upload_files",
    "join_uri",
    "exists",
    "remove",
]


def is_s3(uri: str) -> bool:
    """True for ``s3://`` (and ``s3a://``) URIs."""
    return urlparse(str(uri)).scheme in ("s3", "s3a")


def s3_endpoint_from_env() -> str | None:
    """The custom S3 endpoint URL from the environment, or None for AWS itself.

    ``AWS_ENDPOINT_URL_S3`` (service-specific) takes precedence over ``AWS_ENDPOINT_URL``, as in
    botocore's own resolution order.
    """
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def s3_region_from_env() -> str | None:
    """``AWS_REGION`` or ``AWS_DEFAULT_REGION`` if set."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _s3fs_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """s3fs keyword arguments: the caller's options plus the endpoint from the environment."""
    options = dict(storage_options or {})
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
    if not endpoint:
        endpoint = s3_endpoint_from_env()
        if endpoint:
            options["endpoint_url"] = endpoint
    region = s3_region_from_env()
    if region and "region_name" not in (options.get("client_kwargs") or {}):
        options["client_kwargs"] = {**(options.get("client_kwargs") or {}), "region_name": region}
    return options


def _strip_scheme(uri: str) -> str:
    parsed = urlparse(uri)
    return f"{parsed.netloc}{parsed.path}".rstrip("/") if parsed.scheme else uri


def local_path(uri: str | os.PathLike) -> str | None:
    """The absolute path of a local path or ``file://`` URL; None for any other scheme (s3://, https://...).
    Local files need no fsspec: a process without it (a GPU node's check) still reads them."""
    uri = os.fspath(uri)
    scheme = urlparse(uri).scheme
    if scheme == "file":
        return os.path.abspath(uri.removeprefix("file://"))
    return os.path.abspath(uri) if scheme == "" else None


def filesystem_for(uri: str | os.PathLike, storage_options: Mapping[str, Any] | None = None):
    """``(fsspec filesystem, path inside it)`` for a local path, ``file://`` URL or ``s3://`` URI.

    S3 paths come back as ``bucket/key`` (no scheme), local paths as absolute paths.
    """
    import fsspec

    uri = os.fspath(uri)
    if is_s3(uri):
        fs = fsspec.filesystem("s3", **_s3fs_options(storage_options))
        return fs, _strip_scheme(uri)
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        path = os.path.abspath(path)
    return fs, path


def pyarrow_filesystem_for(uri: str | os.PathLike, storage_options: Mapping[str, Any] | None = None):
    """``(pyarrow.fs.FileSystem, path inside it)``; S3 uses Arrow's native client with the env endpoint.

    Arrow's S3 client reads credentials from the AWS chain itself; explicit ``key``/``secret``/``token``
    in ``storage_options`` are passed through.
    """
    import pyarrow.fs as pafs

    uri = os.fspath(uri)
    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    options = _s3fs_options(storage_options)
    kwargs: dict[str, Any] = {}
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
    region = (options.get("client_kwargs") or {}).get("region_name") or s3_region_from_env()
    # Without a region Arrow asks AWS to resolve the bucket's region, which a custom endpoint cannot answer.
    kwargs["region"] = region or "us-east-1"
    for ours, theirs in (("key", "access_key"), ("secret", "secret_key"), ("token", "session_token")):
        if options.get(ours):
            kwargs[theirs] = options[ours]
    return pafs.S3FileSystem(**kwargs), _strip_scheme(uri)


def join_uri(base: str | os.PathLike, *parts: str) -> str:
    """Join path segments onto a local path or URI with ``/`` (no normalisation of the scheme)."""
    out = os.fspath(base).rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def open_uri(uri: str | os.PathLike, mode: str = "rb", storage_options: Mapping[str, Any] | None = None) -> IO:
    """Open a local path or URI as a file object (use as a context manager)."""
    fs, path = filesystem_for(uri, storage_options)
    if "w" in mode or "a" in mode:
        parent = path.rsplit("/", 1)[0]
        if parent and not is_s3(os.fspath(uri)):
            fs.makedirs(parent, exist_ok=True)
    return fs.open(path, mode)


def read_bytes(uri: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The whole content of a local file or URI (FileNotFoundError when there is none)."""
    fs, path = filesystem_for(uri, storage_options)
    return fs.cat_file(path)


def upload_files(local_dir: str | os.PathLike, files: Iterable[str], output: str | os.PathLike,
                 storage_options: Mapping[str, Any] | None = None) -> int:
    """Copy ``files`` (paths relative to ``local_dir``) to the same relative paths under ``output``
    (s3:// or a local folder); returns how many. s3fs uploads the list concurrently."""
    files = list(files)
    fs, root = filesystem_for(output, storage_options)
    sources = [os.path.join(os.fspath(local_dir), name) for name in files]
    targets = [f"{root.rstrip('/')}/{name}" for name in files]
    if not is_s3(os.fspath(output)):
        for target in targets:
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    fs.put(sources, targets)
    return len(files)


def exists(uri: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether a file or directory (S3: object or prefix) exists."""
    fs, path = filesystem_for(uri, storage_options)
    return bool(fs.exists(path))


def remove(uri: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Delete a file or a whole directory (S3: object or prefix); False when there was nothing."""
    fs, path = filesystem_for(uri, storage_options)
    if not fs.exists(path):
        return False
    fs.rm(path, recursive=True)
    return True


def atomic_write_bytes(
    uri: str | os.PathLike, data: bytes, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Write ``data`` so readers see either the old file or the complete new one, never a partial one.

    Local: a temporary file in the same directory, fsync, then ``os.replace`` (atomic on POSIX within
    one filesystem). S3: a single PUT, which S3 makes visible only once complete.
    """
    uri = os.fspath(uri)
    if is_s3(uri):
        fs, path = filesystem_for(uri, storage_options)
        fs.pipe_file(path, bytes(data))
        return
    path = os.path.abspath(uri.removeprefix("file://"))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise


def atomic_move(src: str | os.PathLike, dst: str | os.PathLike,
                storage_options: Mapping[str, Any] | None = None) -> None:
    """Move ``src`` to ``dst`` so readers of ``dst`` see the old file or the complete new one (overwriting).

    Local: ``os.replace`` (atomic within one filesystem). S3: a server-side copy, which S3 makes visible
    only once complete, then the source is deleted.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if is_s3(dst):
        fs, source = filesystem_for(src, storage_options)
        _, target = filesystem_for(dst, storage_options)
        fs.copy(source, target)
        fs.rm(source)
        return
    target = os.path.abspath(dst.removeprefix("file://"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(os.path.abspath(src.removeprefix("file://")), target)
