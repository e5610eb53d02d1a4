"""Publishing the Contract 3 pair so that a reader never sees a partial or mismatched pair.

**Local filesystem** (rename and symbolic links)::

    OUT/releases/<id>/vectors.safetensors    complete, immutable, 0644
    OUT/releases/<id>/manifest.json
    OUT/current -> releases/<id>             the one switch: os.replace of a temporary symlink
    OUT/vectors.safetensors -> current/vectors.safetensors     made once, never changed
    OUT/manifest.json -> current/manifest.json

A new release is written into a hidden staging directory inside
``releases/`` (``.<id>.<pid>.tmp``), fsynced and renamed to ``releases/<id>``;
then ``current`` is switched. Both top-level names go through ``current``, so
that one switch moves both files: existing readers of ``OUT/vectors.safetensors``
and ``OUT/manifest.json`` keep working, and vLLM can be pointed at
``OUT/current/...`` or the top-level names alike. A reader that opens the two
names one after the other could still straddle a switch; :func:`~.releases.pin_pair`
resolves ``current`` once and reads both files from that release
(:func:`amygdala_dagster.readout.manifest.load_readout` does this). A crash at any
point leaves ``current`` on the old release or the new one, never between;
the next publication removes staging leftovers. A pair written by an older
version as two plain files is first adopted as a release of its own, so the
switch to links is consistent too. Only the last ``keep`` releases are kept
(default 5; the workflow and the commands pass ``$AMYGDALA_KEEP_RELEASES``), never the current one.

**Object storage** (no rename, no links; ``s3://``, ``gs://`` ...)::

    PREFIX/releases/<id>/vectors.safetensors, manifest.json   written first, never changed
    PREFIX/current.json       {"release", "vectors", "manifest", "vectors_sha256", "manifest_sha256"}

A single object write is atomic on these stores, so ``current.json``, written
last, is the switch; readers resolve it and verify both SHA-256 sums
(:func:`~.releases.open_pair`). Top-level ``vectors.safetensors``/``manifest.json``
objects of the older layout are removed once a pointer exists, so no stale
pair looks current.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from upath import UPath

from amygdala_dagster.files.atomic import DIR_MODE, FILE_MODE, fsync_dir, write_new_file
from amygdala_dagster.files.storage import Location, is_local, location, refresh, uri
from amygdala_dagster.readout.releases import (
    CURRENT_LINK,
    POINTER_FILE,
    POINTER_FORMAT,
    RELEASES_DIR,
    PublishError,
    open_pair,
    split_location,
)

log = logging.getLogger(__name__)

#: Releases kept by a publication unless told otherwise (the current one is never removed).
DEFAULT_KEEP_RELEASES = 5
_STAGING = re.compile(r"^\.(?P<id>[^/]+)\.(?P<pid>\d+)\.tmp$")
_RESERVED = {RELEASES_DIR, CURRENT_LINK, POINTER_FILE}


@dataclass(frozen=True)
class Published:
    """Where a publication went: the release and the stable names readers use."""

    release: str
    release_dir: str
    vectors: str
    manifest: str
    vectors_sha256: str
    manifest_sha256: str


def release_id(vectors_sha256: str, now: float | None = None) -> str:
    """``<UTC time to the microsecond>-<sha prefix>``: sorts by publication time, names the content."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int((now % 1) * 1e6):06d}Z"
    return f"{stamp}-{vectors_sha256[:12]}"


def _cause(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    return str(exc) or type(exc).__name__


def _check_names(vectors_name: str, manifest_name: str) -> None:
    for name in (vectors_name, manifest_name):
        if name in _RESERVED:
            raise PublishError(f"{name!r} is reserved for the release layout; name the file differently")
    if vectors_name == manifest_name:
        raise PublishError(f"vectors and manifest would both be named {vectors_name!r}")


def publish_pair(
    vectors_path: Location,
    manifest_path: Location,
    vectors_data: bytes,
    manifest_data: bytes,
    *,
    keep: int = DEFAULT_KEEP_RELEASES,
) -> Published:
    """Publish ``vectors_data`` + ``manifest_data`` under the two names as one release (see the module doc).

    Raises :class:`PublishError` (one line: path and cause) if the location is
    not writable; the previously published pair is then still the current one.
    """
    keep = int(keep)
    vloc, mloc = location(vectors_path), location(manifest_path)
    _check_names(vloc.name, mloc.name)
    sha_v = hashlib.sha256(vectors_data).hexdigest()
    sha_m = hashlib.sha256(manifest_data).hexdigest()
    rid = release_id(sha_v)
    if is_local(vloc) and is_local(mloc):
        return _publish_local(Path(vloc.path), Path(mloc.path), vectors_data, manifest_data, sha_v, sha_m, rid, keep)
    if is_local(vloc) or is_local(mloc) or str(vloc.parent) != str(mloc.parent):
        raise PublishError(
            f"on object storage the vectors and the manifest must share one prefix: {uri(vloc)} and {uri(mloc)}"
        )
    return _publish_remote(vloc, mloc, vectors_data, manifest_data, sha_v, sha_m, rid, keep)


def check_publishable(vectors_path: Location, manifest_path: Location) -> None:
    """Fail early (:class:`PublishError`, one line) if the pair could not be published there.

    Local: creates the directories and a probe file in ``releases/`` (removed
    again), so that a read-only mount or a file in the way is reported before
    any forward pass rather than after. Remote locations are checked when written.
    """
    vloc, mloc = location(vectors_path), location(manifest_path)
    _check_names(vloc.name, mloc.name)
    if not (is_local(vloc) and is_local(mloc)):
        return
    releases = Path(vloc.path).parent / RELEASES_DIR
    step = releases
    try:
        for directory in (Path(mloc.path).parent, releases):
            step = directory
            make_readable_dirs(directory)
        step = releases
        fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=releases)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PublishError(f"cannot publish the readout pair in {step}: {_cause(exc)}") from exc


# ----------------------------------------------------------------------------- local


def _link_target(link: Path, base: Path, name: str) -> str:
    """The relative target that makes ``link`` point at ``base/current/name``."""
    return os.path.relpath(base / CURRENT_LINK / name, link.parent)


def _replace_with_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` atomically (a temporary symlink renamed over it)."""
    tmp = link.parent / f".{link.name}.{os.getpid()}.link.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(link.parent)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers(base: Path, releases: Path) -> None:
    """Staging directories and temporary links of publications that died (their process is gone)."""
    for entry in list(releases.iterdir()) if releases.is_dir() else []:
        m = _STAGING.match(entry.name)
        if m and not _pid_alive(int(m["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
    for entry in base.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(".link.tmp") and entry.is_symlink():
            pid = entry.name[:-len(".link.tmp")].rsplit(".", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                entry.unlink()


def _stage_release(releases: Path, rid: str, files: dict[str, bytes]) -> Path:
    """Write ``files`` into a hidden staging directory, fsync, rename it to ``releases/<rid>``."""
    staging = releases / f".{rid}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    os.mkdir(staging, DIR_MODE)
    try:
        os.chmod(staging, DIR_MODE)
        for name, data in files.items():
            write_new_file(staging / name, data, FILE_MODE)
        fsync_dir(staging)
        final = releases / rid
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(releases)
    return final


def _adopt_plain_files(base: Path, releases: Path, vectors: Path, manifest: Path) -> None:
    """A pair written as plain files (older layout) becomes a release, and ``current`` points at it.

    Then replacing each plain file by a link through ``current`` changes no
    content a reader sees, so the move to links is consistent at every instant.
    """
    plain = [p for p in (vectors, manifest) if p.is_file() and not p.is_symlink()]
    if not plain or (base / CURRENT_LINK).is_symlink():
        return
    stamp = time.strftime("%Y%m%dT%H%M%S000000Z", time.gmtime(max(p.stat().st_mtime for p in plain)))
    rid = f"{stamp}-adopted"
    if not (releases / rid).exists():
        _stage_release(releases, rid, {p.name: p.read_bytes() for p in plain})
    _replace_with_symlink(base / CURRENT_LINK, f"{RELEASES_DIR}/{rid}")
    _link_names(base, vectors, manifest)
    log.info("adopted the existing pair in %s as release %s", base, rid)


def _link_names(base: Path, *names: Path) -> None:
    """Make each of ``names`` a link to ``base/current/<name>`` (atomically; a no-op when it already is)."""
    for link in names:
        target = _link_target(link, base, link.name)
        if not (link.is_symlink() and os.readlink(link) == target):
            _replace_with_symlink(link, target)


def _prune_local(releases: Path, current: str, keep: int) -> None:
    names = sorted(e.name for e in releases.iterdir() if not e.name.startswith(".") and e.is_dir())
    for name in names[:-keep] if len(names) > keep else []:
        if name != current:
            shutil.rmtree(releases / name, ignore_errors=True)


def make_readable_dirs(directory: Path) -> None:
    """``mkdir -p`` whose new directories are 0755 whatever the umask: vLLM often reads the pair
    under another uid, and a 0700 ``releases/`` would hide the 0644 files in it."""
    missing = []
    for d in (directory, *directory.parents):
        if d.exists():
            break
        missing.append(d)
    directory.mkdir(parents=True, exist_ok=True)
    for d in reversed(missing):
        os.chmod(d, DIR_MODE)


def _publish_local(vectors: Path, manifest: Path, vdata: bytes, mdata: bytes, sha_v: str, sha_m: str,
                   rid: str, keep: int) -> Published:
    base = vectors.parent
    releases = base / RELEASES_DIR
    step_path = base
    try:
        for directory in (base, manifest.parent):
            step_path = directory
            make_readable_dirs(directory)
        step_path = releases
        make_readable_dirs(releases)
        _remove_leftovers(base, releases)
        for p in (vectors, manifest):
            step_path = p
            if p.is_dir() and not p.is_symlink():
                raise IsADirectoryError(21, "is a directory, not a file or link", str(p))
        step_path = base / CURRENT_LINK
        if step_path.exists() and not step_path.is_symlink():
            raise IsADirectoryError(21, "is not the release link (a real file or directory is in the way)",
                                    str(step_path))
        step_path = releases
        _adopt_plain_files(base, releases, vectors, manifest)
        release = _stage_release(releases, rid, {vectors.name: vdata, manifest.name: mdata})
        step_path = base / CURRENT_LINK
        _replace_with_symlink(step_path, f"{RELEASES_DIR}/{rid}")
        step_path = base
        _link_names(base, vectors, manifest)
        step_path = releases
        _prune_local(releases, rid, keep)
    except OSError as exc:
        raise PublishError(f"cannot publish the readout pair in {step_path}: {_cause(exc)}") from exc
    return Published(rid, str(release), str(vectors), str(manifest), sha_v, sha_m)


# ----------------------------------------------------------------------------- object storage


def _publish_remote(vectors: UPath, manifest: UPath, vdata: bytes, mdata: bytes, sha_v: str, sha_m: str,
                    rid: str, keep: int) -> Published:
    base = vectors.parent
    release = base / RELEASES_DIR / rid
    step = release
    try:
        refresh(base)
        release.fs.makedirs(release.path, exist_ok=True)
        step = release / vectors.name
        step.write_bytes(vdata)
        step = release / manifest.name
        step.write_bytes(mdata)
        pointer = {
            "format": POINTER_FORMAT,
            "release": rid,
            "vectors": f"{RELEASES_DIR}/{rid}/{vectors.name}",
            "manifest": f"{RELEASES_DIR}/{rid}/{manifest.name}",
            "vectors_sha256": sha_v,
            "manifest_sha256": sha_m,
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        step = base / POINTER_FILE
        step.write_bytes((json.dumps(pointer, indent=2) + "\n").encode())
        for legacy in (vectors, manifest):
            step = legacy
            if legacy.exists():
                legacy.unlink()
                log.info("removed %s: the pair is read through %s now", uri(legacy), POINTER_FILE)
        step = base / RELEASES_DIR
        _prune_remote(step, rid, keep)
    except Exception as exc:  # noqa: BLE001 - every backend error becomes the one-line PublishError
        raise PublishError(f"cannot publish the readout pair at {uri(step)}: {_cause(exc)}") from exc
    return Published(rid, uri(release), uri(release / vectors.name), uri(release / manifest.name), sha_v, sha_m)


def _prune_remote(releases: UPath, current: str, keep: int) -> None:
    refresh(releases)
    names = sorted(p.name for p in releases.iterdir() if p.name and not p.name.startswith("."))
    for name in names[:-keep] if len(names) > keep else []:
        if name != current:
            releases.fs.rm((releases / name).path, recursive=True)



def republish_manifest(
    vectors: Location, manifest: Location | None, manifest_data: bytes, *,
    keep: int = DEFAULT_KEEP_RELEASES,
) -> Published:
    """A new release holding the current vectors unchanged and ``manifest_data`` (e.g. added calibration);
    the last ``keep`` releases are kept."""
    with open_pair(vectors, manifest) as files:
        vectors_data = files.vectors.read_bytes()
    v, m = split_location(vectors, manifest)
    return publish_pair(v, m, vectors_data, manifest_data, keep=keep)
