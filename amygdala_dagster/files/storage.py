"""Where artefacts live: a local directory or any fsspec URL, through one path type (``UPath``).

``location(...)`` turns a path or URL into a :class:`upath.UPath` (a plain
``pathlib.Path`` subclass for local paths, an fsspec-backed path for
``s3://``, ``gs://``, ``memory://`` ...). :class:`Store` addresses the files of
one output directory by their relative, ``/``-separated names.

The project's writers (Parquet via polars, safetensors, JSON) write *local*
files; for a remote base the finished file or directory is uploaded, and reads
of a remote file download it to a temporary local copy first
(:meth:`Store.local_for_write`, :meth:`Store.local_for_read`). A local base is
written in place, so nothing is copied twice. Credentials and endpoints come
from each backend's standard environment (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TypeAlias

from upath import UPath
from upath.implementations.local import LocalPath

LOCAL_PROTOCOLS = ("", "file", "local")

#: A local path or an fsspec URL, as a string, a path or a UPath.
Location: TypeAlias = str | os.PathLike[str] | UPath


def location(path: Location) -> UPath:
    """``path`` (a local path or an fsspec URL) as a UPath; local paths are absolute and ``~``-expanded."""
    p = path if isinstance(path, UPath) else UPath(str(path))
    if is_local(p):
        # abspath, not resolve(): a published name is a symlink that must stay one
        return UPath(os.path.abspath(os.path.expanduser(p.path)))
    return p


def is_local(path: Location) -> bool:
    """True for a plain path or a ``file://`` URL (a filesystem with rename and links)."""
    p = path if isinstance(path, UPath) else UPath(str(path))
    return isinstance(p, LocalPath) or p.protocol in LOCAL_PROTOCOLS


def uri(path: UPath) -> str:
    """A local path as a plain path, a remote one as its URL."""
    return path.path if is_local(path) else str(path)


def refresh(path: UPath) -> None:
    """Forget cached listings of ``path``'s filesystem (s3fs caches them) before a read that must be current."""
    if not is_local(path):
        path.fs.invalidate_cache()


def read_whole(path: UPath) -> bytes:
    """All of ``path`` in one read. On object storage that is one GET of the whole object, which a
    concurrent replacement cannot split: a read that takes the size and ETag first and then fetches
    ranges (``UPath.read_bytes`` on s3fs) fails when the object is replaced in between."""
    if is_local(path):
        return Path(path.path).read_bytes()
    return bytes(path.fs.cat_file(path.path))


class Store:
    """Artifact files under ``base`` (a path or an fsspec URL); paths below are relative, ``/``-separated."""

    def __init__(self, base: str | os.PathLike[str]):
        self.base = str(base)
        self.root = location(base)
        self.is_local = is_local(self.root)
        self.fs = self.root.fs

    def path(self, rel: str) -> UPath:
        rel = rel.strip("/")
        return self.root / rel if rel else self.root

    def uri(self, rel: str) -> str:
        """Where ``rel`` lives, as a path (local) or a URL (remote)."""
        return uri(self.path(rel))

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def size(self, rel: str) -> int:
        """Bytes of a file, or the total of the files below a directory."""
        p = self.path(rel)
        if p.is_dir():
            return int(sum(self.fs.du(p.path, total=False).values()))
        return int(p.stat().st_size)

    def read_bytes(self, rel: str) -> bytes:
        return read_whole(self.path(rel))

    @contextlib.contextmanager
    def local_for_write(self, rel: str) -> Iterator[Path]:
        """A local path to write ``rel`` (a file or a directory) to; uploaded on success when remote.

        Local bases yield the final path itself: the project's writers are
        atomic (temporary file + rename), so readers never see a partial file.
        """
        if self.is_local:
            path = Path(self.path(rel).path)
            path.parent.mkdir(parents=True, exist_ok=True)
            yield path
            return
        with tempfile.TemporaryDirectory(prefix="amygdala-upload-") as tmp:
            local = Path(tmp) / Path(rel).name
            yield local
            target = self.path(rel)
            if local.is_dir():
                if target.exists():
                    self.fs.rm(target.path, recursive=True)
                self.fs.put(str(local), target.path, recursive=True)
            elif local.exists():
                self.fs.makedirs(target.parent.path, exist_ok=True)
                self.fs.put_file(str(local), target.path)

    @contextlib.contextmanager
    def local_for_read(self, rel: str) -> Iterator[Path]:
        """A local path holding ``rel`` (downloaded to a temporary copy when remote)."""
        target = self.path(rel)
        if self.is_local:
            yield Path(target.path)
            return
        if not target.exists():
            raise FileNotFoundError(f"{self.uri(rel)} does not exist")
        with tempfile.TemporaryDirectory(prefix="amygdala-download-") as tmp:
            local = Path(tmp) / Path(rel).name
            if target.is_dir():
                self.fs.get(target.path.rstrip("/") + "/", str(local), recursive=True)
            else:
                self.fs.get_file(target.path, str(local))
            yield local
