"""Where a run's artefacts live: paths relative to an output directory, and every output checked writable.

The relative paths are the layout under ``ArtifactStorage``'s base path (and ``amygdala report --output-dir``);
:func:`check_writable` fails early, naming the location, before any forward pass.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

# ----------------------------------------------------------------------------- artefact layout
# Paths relative to an output directory (ArtifactStorage's base path, `amygdala report --output-dir`).
SNAPSHOT_FILE = "snapshot/memory_snapshot.parquet"
CATALOG_FILE = "catalog/emotion_catalog.parquet"
COOCCURRENCE_FILE = "catalog/cooccurrence.json"
VECTORS_FILE = "vectors.safetensors"
MANIFEST_FILE = "manifest.json"
STAGED_VECTORS = "readout/staged_vectors.safetensors"
STAGED_INFO = "readout/staged_vectors.json"
REPORT_DIR = "report"
EVALUATION_JSON = f"{REPORT_DIR}/evaluation.json"
EVALUATION_HTML = f"{REPORT_DIR}/evaluation.html"
#: What the GPU step kept per token (the calibration sample, the evaluation conversations), for the steps after it.
TOKEN_SAMPLES_FILE = "tokens/samples.json"


def examples_dir(emotion: str) -> str:
    """Contract 2 directory for one emotion: ``examples/<e>/index.json`` and ``examples/<e>/<e>/*.jsonl``."""
    return f"examples/{emotion}"


def stats_file(emotion: str) -> str:
    return f"stats/{emotion}.safetensors"


def stats_info_file(emotion: str) -> str:
    return f"stats/{emotion}.json"


# ----------------------------------------------------------------------------- writability
class UnwritableError(OSError):
    """An output location that cannot be written; the message names it and the cause, on one line."""


def check_writable(directories: Mapping[str, str | os.PathLike[str] | None] | None = None,
                   files: Mapping[str, str | os.PathLike[str] | None] | None = None) -> None:
    """Fail early, naming the location and the cause, when an output cannot be written.

    ``directories`` (``{"--output-dir": path}``) are created if missing and a
    file is created and removed in each; for ``files`` the same is done in the
    parent directory, and an existing path must be a writable regular file. A
    ``None`` path or a URL (``s3://...``) is skipped.
    """
    files = dict(files or {})
    for what, raw in {**dict(directories or {}), **files}.items():
        if raw is None or "://" in str(raw):
            continue
        path = Path(raw).expanduser()
        is_file = what in files
        directory = path.parent if is_file else path
        try:
            if is_file and path.is_dir():
                raise IsADirectoryError(21, "is a directory, not a file")
            if directory.exists() and not directory.is_dir():
                raise NotADirectoryError(20, f"{directory} is a file, not a directory")
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".amygdala-write-check-"):
                pass
            if is_file and path.exists() and not os.access(path, os.W_OK):
                raise PermissionError(13, "the existing file is not writable")
        except OSError as exc:
            cause = exc.strerror or str(exc)
            raise UnwritableError(f"cannot write {what} {path}: {cause}") from None
