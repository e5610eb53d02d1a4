"""Where the pipeline's files live: a local directory or any fsspec URL.

Every asset writes through the project's own writers (Parquet via polars,
safetensors, JSON) into a *local* path; for a remote base (``s3://``,
``memory://`` ...) the finished file or directory is then uploaded with fsspec,
and reads download to a temporary local copy first. A local base (a plain path
or ``file://``) is written in place, so nothing is copied twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


def _split(base: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(base)
    return fs, root.rstrip("/") or "/"


class Store:
    """Artifact files under ``base`` (a path or an fsspec URL); paths below are relative, ``/``-separated."""

    def __init__(self, base: str):
        self.base = str(base)
        self.fs, self.root = _split(self.base)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self.root = str(Path(self.root).expanduser().resolve())

    def _full(self, rel: str) -> str:
        rel = rel.strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def uri(self, rel: str) -> str:
        """Where ``rel`` lives, as a path (local) or a URL (remote)."""
        full = self._full(rel)
        return full if self.is_local else self.fs.unstrip_protocol(full)

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self._full(rel)))

    def size(self, rel: str) -> int:
        """Bytes of a file, or the total of the files below a directory."""
        full = self._full(rel)
        if self.fs.isdir(full):
            return int(sum(self.fs.du(full, total=False).values()))
        return int(self.fs.size(full))

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(self._full(rel), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self._full(rel), "rb") as fh:
            return fh.read()

    def listdir(self, rel: str) -> list[str]:
        full = self._full(rel)
        if not self.fs.isdir(full):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(full, detail=False))

    @contextlib.contextmanager
    def local_for_write(self, rel: str) -> Iterator[Path]:
        """A local path to write ``rel`` (a file or a directory) to; uploaded on success when remote.

        Local bases yield the final path itself: the project's writers are
        atomic (temporary file + rename), so readers never see a partial file.
        """
        if self.is_local:
            path = Path(self._full(rel))
            path.parent.mkdir(parents=True, exist_ok=True)
            yield path
            return
        with tempfile.TemporaryDirectory(prefix="amygdala-upload-") as tmp:
            local = Path(tmp) / Path(rel).name
            yield local
            target = self._full(rel)
            if local.is_dir():
                if self.fs.exists(target):
                    self.fs.rm(target, recursive=True)
                self.fs.put(str(local), target, recursive=True)
            elif local.exists():
                self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(local), target)

    @contextlib.contextmanager
    def local_for_read(self, rel: str) -> Iterator[Path]:
        """A local path holding ``rel`` (downloaded to a temporary copy when remote)."""
        full = self._full(rel)
        if self.is_local:
            yield Path(full)
            return
        if not self.fs.exists(full):
            raise FileNotFoundError(f"{self.uri(rel)} does not exist")
        with tempfile.TemporaryDirectory(prefix="amygdala-download-") as tmp:
            local = Path(tmp) / Path(rel).name
            if self.fs.isdir(full):
                self.fs.get(full.rstrip("/") + "/", str(local), recursive=True)
            else:
                self.fs.get_file(full, str(local))
            yield local

    def put(self, local: str | Path, rel: str) -> None:
        """Copy a finished local file to ``rel`` (a no-op when ``local`` already is that file)."""
        full = self._full(rel)
        if self.is_local:
            if Path(local).resolve() != Path(full).resolve():
                Path(full).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local, full)
            return
        self.fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(str(local), full)

    def remove(self, rel: str) -> None:
        full = self._full(rel)
        if self.is_local:
            p = Path(full)
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        elif self.fs.exists(full):
            self.fs.rm(full, recursive=True)
