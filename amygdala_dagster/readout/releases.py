"""Reading the published Contract 3 pair: the release layout's names, and one consistent pair out of it.

The layout is the one :mod:`.publish` writes (a ``current`` link on a local filesystem, a ``current.json``
pointer on object storage). :func:`open_pair` gives local files of one release, whatever name a reader
uses (a file, an output directory, ``current/`` or ``current.json``); :func:`current_pair` says which
release is current; :func:`pin_pair` reads ``current`` once for both files.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upath import UPath

from amygdala_dagster.files.atomic import sha256_file
from amygdala_dagster.files.storage import Location, is_local, location, read_whole, refresh, uri

RELEASES_DIR = "releases"
CURRENT_LINK = "current"
POINTER_FILE = "current.json"
POINTER_FORMAT = "amygdala-release-pointer/1"
VECTORS_NAME = "vectors.safetensors"
MANIFEST_NAME = "manifest.json"


class PublishError(OSError):
    """The pair could not be published; the message names the path and the cause. The old pair is intact."""


def _through_current(path: Path) -> tuple[Path, str] | None:
    """``(current link, file name)`` if ``path`` is ``D/current/name`` or a link to it; else None."""
    if path.parent.name == CURRENT_LINK and path.parent.is_symlink():
        return path.parent, path.name
    if path.is_symlink():
        target = Path(os.path.normpath(path.parent / os.readlink(path)))
        if target.parent.name == CURRENT_LINK and target.parent.is_symlink():
            return target.parent, target.name
    return None


def pin_pair(vectors: str | os.PathLike[str], manifest: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The two files of one release: ``current`` is read once for both (local paths only).

    Paths that do not go through the same ``current`` link come back unchanged.
    """
    vectors, manifest = Path(vectors), Path(manifest)
    a, b = _through_current(vectors), _through_current(manifest)
    if a is None or b is None or a[0] != b[0]:
        return vectors, manifest
    link = a[0]
    try:
        release = Path(os.path.normpath(link.parent / os.readlink(link)))
    except OSError:
        return vectors, manifest
    return release / a[1], release / b[1]


def read_pointer(base: UPath) -> dict[str, Any] | None:
    path = base / POINTER_FILE
    try:
        data = read_whole(path)  # the publisher replaces the pointer in place
    except FileNotFoundError:
        return None
    try:
        pointer = json.loads(data)
    except ValueError as exc:
        raise PublishError(f"{uri(path)}: not valid JSON ({exc})") from None
    if not isinstance(pointer, dict) or pointer.get("format") != POINTER_FORMAT:
        raise PublishError(f"{uri(path)}: not a release pointer ({POINTER_FORMAT})")
    return pointer


def split_location(
    vectors: Location, manifest: Location | None = None
) -> tuple[UPath, UPath]:
    """The vectors and manifest locations a user means by ``vectors`` (a file, an output directory,
    ``current.json`` or ``current/``) and an optional ``manifest`` (default: ``manifest.json`` beside)."""
    v = location(vectors)
    if v.name in (POINTER_FILE, CURRENT_LINK) or v.is_dir() or (not is_local(v) and not v.suffix):
        base = v.parent if v.name == POINTER_FILE else v
        v = base / VECTORS_NAME
    m = location(manifest) if manifest is not None else v.parent / MANIFEST_NAME
    return v, m


@dataclass(frozen=True)
class PairFiles:
    """Local files of one pair (``vectors``, ``manifest``) and where they were read from."""

    vectors: Path
    manifest: Path
    source_vectors: str
    source_manifest: str
    where: str


@contextlib.contextmanager
def open_pair(
    vectors: Location, manifest: Location | None = None
) -> Iterator[PairFiles]:
    """Local files of one consistent pair, and where they came from.

    Local: ``current`` is resolved once (:func:`pin_pair`). Object storage:
    ``current.json`` beside the vectors name is resolved, both files of its
    release are downloaded to a temporary directory and their SHA-256 sums
    checked against the pointer; without a pointer (older layout) the two
    objects are downloaded as they are (``load_readout`` still checks the
    vectors' SHA-256 against the manifest).
    """
    v, m = split_location(vectors, manifest)
    if is_local(v) and is_local(m):
        pv, pm = pin_pair(v.path, m.path)
        yield PairFiles(pv, pm, str(pv), str(pm), str(pv.parent) if pv.parent == pm.parent else f"{pv}, {pm}")
        return
    base = v.parent
    refresh(base)
    pointer = read_pointer(base) if manifest is None or str(m.parent) == str(base) else None
    with tempfile.TemporaryDirectory(prefix="amygdala-pair-") as tmp:
        lv, lm = Path(tmp) / v.name, Path(tmp) / m.name
        if pointer is not None:
            rv, rm = base / pointer["vectors"], base / pointer["manifest"]
            where = f"{uri(base / POINTER_FILE)} -> release {pointer['release']}"
        else:
            rv, rm = v, m
            where = uri(base)
        for remote, local in ((rv, lv), (rm, lm)):
            try:
                remote.fs.get_file(remote.path, str(local))
            except FileNotFoundError:
                raise FileNotFoundError(f"{uri(remote)}: no such object") from None
        if pointer is not None:
            for local, key in ((lv, "vectors_sha256"), (lm, "manifest_sha256")):
                actual = sha256_file(local)
                if actual != pointer[key]:
                    raise PublishError(
                        f"{where}: {local.name} has SHA-256 {actual}, the pointer expects {pointer[key]}"
                    )
        yield PairFiles(lv, lm, uri(rv), uri(rm), where)


def current_pair(
    base: Location, vectors_name: str = VECTORS_NAME, manifest_name: str = MANIFEST_NAME
) -> tuple[str, str] | None:
    """Paths (relative to ``base``) of the current release's two files, or None before the first publication.

    Local: ``current`` read once; object storage: the ``current.json`` pointer.
    """
    root = location(base)
    if is_local(root):
        link = Path(root.path) / CURRENT_LINK
        try:
            target = os.readlink(link)
        except OSError:
            return None
        rel = os.path.normpath(target)
        return f"{rel}/{vectors_name}", f"{rel}/{manifest_name}"
    refresh(root)
    pointer = read_pointer(root)
    return None if pointer is None else (pointer["vectors"], pointer["manifest"])
