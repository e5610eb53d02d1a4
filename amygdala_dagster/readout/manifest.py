"""Contract 3: ``vectors.safetensors`` + ``manifest.json`` for a vLLM ReadoutManager.

``vectors.safetensors`` holds ``layer_<idx>.vectors`` of shape
``[n_concepts, hidden_size]`` (float32 unless asked), rows in the manifest's
``concepts`` order, each of unit L2 norm. ``manifest.json`` describes them
(format_version 3) and carries the vectors file's SHA-256. Format 2 added, per
concept and layer, ``token_calibration`` (the distribution of *per-token*
projections, what the runtime sees) beside the text-level ``calibration``;
format 3 adds ``episode``, the conversation-level rule
(:mod:`amygdala_dagster.readout.episode`). Readers accept formats 1 and 2 too
(without those entries).

Publication (see :func:`write_readout` and :mod:`amygdala_dagster.readout.publish`):
both files are fully serialised in memory, then published together as one
release (a versioned directory and an atomically switched ``current`` link on
a local filesystem; immutable objects and a ``current.json`` pointer written
last on object storage). A reader never sees a half-written or mismatched
pair, not even after a crash; :func:`load_readout` resolves ``current`` once
and still checks the vectors' SHA-256 against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save_torch
from upath import UPath

from amygdala_dagster.files.atomic import sha256_file
from amygdala_dagster.files.jsonio import jsonable
from amygdala_dagster.files.storage import Location, location
from amygdala_dagster.readout.publish import DEFAULT_KEEP_RELEASES, publish_pair
from amygdala_dagster.readout.releases import PublishError, open_pair
from amygdala_dagster.readout.vectors import TrainedReadout

FORMAT_VERSION = 3
#: Manifest versions :func:`load_readout` reads (1: no ``token_calibration``; 2: no ``episode``).
READABLE_FORMAT_VERSIONS = (1, 2, 3)
#: Per concept and layer, the manifest's calibration entries: text level (mean-pooled texts), per token, and
#: the conversation-level (episode) rule.
CALIBRATION_KINDS = {"text": "calibration", "token": "token_calibration", "episode": "episode"}
ACTIVATION_SITE = "residual_stream_after_layer"
VECTORS_FORMAT = "amygdala-readout-vectors/1"
METADATA_KEY = "amygdala_readout"
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NORM_TOL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1e-2}


class ReadoutMatrix(Protocol):
    """What reading with a readout needs: its concepts, hooked layers and one ``[n_concepts, H]`` matrix per
    layer -- a freshly trained :class:`~amygdala_dagster.readout.vectors.TrainedReadout` or a loaded
    :class:`ReadoutPair`."""

    @property
    def concepts(self) -> list[str]: ...

    @property
    def layers(self) -> list[int]: ...

    @property
    def vectors(self) -> Mapping[int, np.ndarray]: ...


class CalibratedReadout(ReadoutMatrix, Protocol):
    """A readout with its manifest (the calibration a runtime turns raw projections into scores with)."""

    @property
    def manifest(self) -> Mapping[str, Any]: ...


class ReadoutFileError(ValueError):
    """A vectors/manifest pair that is missing, invalid or mismatched; the message says what."""


def layer_key(idx: int) -> str:
    return f"layer_{int(idx)}.vectors"


def _utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# ----------------------------------------------------------------------------- manifest
def build_manifest(
    readout: TrainedReadout,
    *,
    model: str,
    model_revision: str | None,
    dtype: str,
    pooling: str,
    layer_path: str | None,
    fingerprint: Mapping[str, Any] | None,
    training: Mapping[str, Any],
    calibration: Mapping[str, Mapping[int, Mapping[str, Any]]] | None,
    vectors_file: str,
    token_calibration: Mapping[str, Mapping[Any, Mapping[str, Any] | None]] | None = None,
    episode: Mapping[str, Mapping[Any, Mapping[str, Any] | None]] | None = None,
    vectors_sha256: str,
    vectors_dtype: str = "float32",
    created_at: str | None = None,
) -> dict[str, Any]:
    """The manifest dict (Contract 3) for a :class:`~amygdala_dagster.readout.vectors.TrainedReadout`.

    ``dtype`` is the dtype the model ran in when activations were captured;
    ``vectors_dtype`` the dtype of the stored vectors. ``calibration`` defaults
    to ``readout.calibration``. Per concept the manifest lists the training
    counts and, per layer (key = layer index as a string), the raw
    (pre-normalisation) norm, the text-level projection calibration
    (``calibration``) and the per-token one (``token_calibration``, from
    :func:`amygdala_dagster.readout.token_calibration.calibrate_tokens`) and the episode rule
    (``episode``, from :func:`amygdala_dagster.readout.episode.calibrate_episode`); null when not
    computed.
    """
    calibration = readout.calibration if calibration is None else calibration
    concepts = list(readout.concepts)
    layers = [int(x) for x in readout.layers]
    per_concept: dict[str, Any] = {}
    for c in concepts:
        norms = readout.raw_norms.get(c, [])
        layer_entries = {}
        for i, layer in enumerate(layers):
            entry: dict[str, Any] = {"raw_norm": float(norms[i]) if i < len(norms) else None}
            cal = (calibration or {}).get(c, {}).get(layer)
            if cal is None:
                cal = (calibration or {}).get(c, {}).get(str(layer))  # type: ignore[call-overload]
            entry["calibration"] = dict(cal) if cal is not None else None
            tok_layers = (token_calibration or {}).get(c, {})
            tok = tok_layers.get(layer, tok_layers.get(str(layer)))
            entry["token_calibration"] = dict(tok) if tok is not None else None
            ep_layers = (episode or {}).get(c, {})
            ep = ep_layers.get(layer, ep_layers.get(str(layer)))
            entry["episode"] = dict(ep) if ep is not None else None
            layer_entries[str(layer)] = entry
        per_concept[c] = {"training": dict(readout.counts.get(c, {})), "layers": layer_entries}
    manifest = {
        "format_version": FORMAT_VERSION,
        "concepts": concepts,
        "layers": layers,
        "hidden_size": int(readout.hidden_size),
        "model": model,
        "model_revision": model_revision,
        "dtype": dtype,
        "pooling": pooling,
        "activation_site": ACTIVATION_SITE,
        "layer_path": layer_path,
        "vectors_file": vectors_file,
        "vectors_sha256": vectors_sha256,
        "vectors_dtype": vectors_dtype,
        "estimator": getattr(readout, "estimator", None),
        "created_at": created_at or _utc_now(),
        "fingerprint": dict(fingerprint) if fingerprint is not None else None,
        "training": dict(training),
        "per_concept": per_concept,
    }
    return cast("dict[str, Any]", jsonable(manifest))


def vectors_bytes(readout: ReadoutMatrix, vectors_dtype: str = "float32") -> bytes:
    """Serialise ``readout.vectors`` as Contract 3 safetensors bytes, validating them first."""
    if vectors_dtype not in _TORCH_DTYPES:
        raise ValueError(f"vectors dtype must be one of {', '.join(_TORCH_DTYPES)}, got {vectors_dtype!r}")
    concepts = list(readout.concepts)
    if len(set(concepts)) != len(concepts):
        raise ReadoutFileError(f"duplicate concept names in {concepts}")
    if not concepts:
        raise ReadoutFileError("no concepts: refusing to write an empty readout")
    tensors: dict[str, torch.Tensor] = {}
    hidden = None
    for layer in readout.layers:
        arr = np.asarray(readout.vectors[layer], dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] != len(concepts):
            raise ReadoutFileError(f"layer {layer}: vectors of shape {arr.shape}, expected [{len(concepts)}, H]")
        hidden = arr.shape[1] if hidden is None else hidden
        if arr.shape[1] != hidden:
            raise ReadoutFileError(f"layer {layer}: hidden size {arr.shape[1]} != {hidden}")
        _check_rows(arr, concepts, layer, _NORM_TOL["float32"])
        tensors[layer_key(layer)] = (torch.from_numpy(np.ascontiguousarray(arr))
                                     .to(_TORCH_DTYPES[vectors_dtype]).contiguous())
    # One metadata entry: safetensors orders several entries differently from run to
    # run, and the same vectors must give the same bytes (and SHA-256).
    info = {"format": VECTORS_FORMAT, "concepts": concepts, "layers": [int(x) for x in readout.layers]}
    metadata = {METADATA_KEY: json.dumps(info, ensure_ascii=False, sort_keys=True)}
    return st_save_torch(tensors, metadata=metadata)


def row_problems(arr: np.ndarray, concepts: Sequence[str], layer: int, tol: float = _NORM_TOL["float32"]) -> list[str]:
    """What is wrong with one layer's ``[n_concepts, H]`` rows: non-finite values, norms off 1 by more than ``tol``."""
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = [concepts[int(i)] for i in np.flatnonzero(~finite)]
        return [f"layer {layer}: non-finite values in the rows of {bad}"]
    norms = np.linalg.norm(arr.astype(np.float64), axis=1)
    return [f"layer {layer}: row {i} ({concepts[i]!r}) has L2 norm {norms[i]:.6g}, expected unit norm"
            for i in map(int, np.flatnonzero(np.abs(norms - 1.0) > tol))]


def _check_rows(arr: np.ndarray, concepts: Sequence[str], layer: int, tol: float) -> None:
    problems = row_problems(arr, concepts, layer, tol)
    if problems:
        raise ReadoutFileError(problems[0])


def write_readout(
    vectors_path: Location,
    manifest_path: Location,
    readout: TrainedReadout,
    *,
    vectors_dtype: str = "float32",
    keep_releases: int = DEFAULT_KEEP_RELEASES,
    **manifest_fields: Any,
) -> dict[str, Any]:
    """Write the Contract 3 pair and return the manifest written.

    ``vectors_path``/``manifest_path`` are local paths or fsspec URLs.
    ``manifest_fields`` are :func:`build_manifest`'s keyword arguments except
    ``vectors_file``/``vectors_sha256``/``vectors_dtype`` (filled in here;
    ``vectors_file`` is the vectors file's name: in a release the two files are
    siblings). The pair is published by
    :func:`amygdala_dagster.readout.publish.publish_pair`, which keeps the last ``keep_releases``
    releases; an unwritable location raises its one-line
    :class:`~amygdala_dagster.readout.releases.PublishError` and leaves the old pair current.
    """
    vloc, mloc = location(vectors_path), location(manifest_path)
    if str(vloc) == str(mloc):
        raise ValueError(f"vectors and manifest would be the same file: {vectors_path}")
    manifest_fields.setdefault("calibration", None)
    data = vectors_bytes(readout, vectors_dtype)
    sha = hashlib.sha256(data).hexdigest()
    manifest = build_manifest(
        readout, vectors_file=vloc.name, vectors_sha256=sha, vectors_dtype=vectors_dtype, **manifest_fields
    )
    text = json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    publish_pair(vloc, mloc, data, text.encode("utf-8"), keep=keep_releases)
    return manifest


def calibration_entry(manifest: Mapping[str, Any], concept: str, layer: int, kind: str = "text"
                      ) -> dict[str, Any] | None:
    """The ``kind`` (``text``, ``token`` or ``episode``) calibration of ``concept`` at ``layer``; None when
    absent (``token`` is absent from every format-1 manifest, ``episode`` from formats 1 and 2)."""
    if kind not in CALIBRATION_KINDS:
        raise ValueError(f"calibration kind {kind!r}: choose one of {', '.join(CALIBRATION_KINDS)}")
    per = (manifest.get("per_concept") or {}).get(concept) or {}
    entry = (per.get("layers") or {}).get(str(int(layer))) or {}
    cal = entry.get(CALIBRATION_KINDS[kind])
    return dict(cal) if isinstance(cal, Mapping) else None


# ----------------------------------------------------------------------------- reading
@dataclass
class ReadoutPair:
    """A loaded and validated Contract 3 pair: the vectors file and its manifest."""

    concepts: list[str]
    layers: list[int]
    vectors: dict[int, np.ndarray]  # layer -> [C, H] float32
    manifest: dict[str, Any]
    vectors_path: Path | UPath
    manifest_path: Path | UPath
    sha256: str
    dtype: str

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["hidden_size"])

    def matrix(self, layer: int) -> np.ndarray:
        return self.vectors[int(layer)]


def default_manifest_path(vectors_path: str | os.PathLike[str]) -> Path:
    """``manifest.json`` next to the vectors file."""
    return Path(vectors_path).parent / "manifest.json"


def read_vectors_file(vectors_path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
    """All tensors (as float32 numpy), our metadata entry (``{}`` if absent) and the stored dtype name."""
    vectors_path = Path(vectors_path)
    if not vectors_path.is_file():
        raise ReadoutFileError(f"{vectors_path}: no such vectors file")
    try:
        with safe_open(str(vectors_path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {}
            dtypes = set()
            for key in f.keys():  # noqa: SIM118 - a safetensors file, not a dict: keys() is how it lists them
                t = f.get_tensor(key)
                dtypes.add(str(t.dtype).removeprefix("torch."))
                tensors[key] = t.float().numpy()
    except ReadoutFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a valid file"
        raise ReadoutFileError(f"{vectors_path}: not a readable safetensors file ({exc})") from exc
    dtype = dtypes.pop() if len(dtypes) == 1 else ",".join(sorted(dtypes)) or "float32"
    try:
        info = json.loads(meta.get(METADATA_KEY, "{}"))
    except ValueError:
        info = {}
    return tensors, info if isinstance(info, dict) else {}, dtype


def load_readout(
    vectors_path: Location,
    manifest_path: Location | None = None,
) -> ReadoutPair:
    """Load and validate a vectors/manifest pair; :class:`ReadoutFileError` says what is wrong.

    ``vectors_path`` is the vectors file, or an output directory (local or an
    fsspec URL); ``manifest_path`` defaults to ``manifest.json`` next to the
    vectors file. The pair is read through the published release
    (:func:`amygdala_dagster.readout.releases.open_pair`: ``current`` resolved once, or
    the ``current.json`` pointer on object storage). Checks: format_version,
    SHA-256 of the vectors file against the manifest, exactly one
    ``layer_<idx>.vectors`` per manifest layer, shapes
    ``[len(concepts), hidden_size]``, finite values, unit-norm rows.
    """
    try:
        with open_pair(vectors_path, manifest_path) as files:
            readout = _load_pair(files.vectors, files.manifest)
            if files.source_vectors != str(files.vectors):  # downloaded: name the objects, not temp copies
                readout.vectors_path = location(files.source_vectors)
                readout.manifest_path = location(files.source_manifest)
            return readout
    except (PublishError, FileNotFoundError) as exc:
        raise ReadoutFileError(str(exc)) from exc


def _load_pair(vectors_path: Path, manifest_path: Path) -> ReadoutPair:
    if not manifest_path.is_file():
        raise ReadoutFileError(f"{manifest_path}: no such manifest file")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReadoutFileError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ReadoutFileError(f"{manifest_path}: not a JSON object")
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise ReadoutFileError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r}, expected one of "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}"
        )
    for field_name in ("concepts", "layers", "hidden_size", "vectors_sha256"):
        if field_name not in manifest:
            raise ReadoutFileError(f"{manifest_path}: missing field {field_name!r}")
    if not vectors_path.is_file():
        raise ReadoutFileError(f"{vectors_path}: no such vectors file")
    sha = sha256_file(vectors_path)
    if sha != manifest["vectors_sha256"]:
        raise ReadoutFileError(
            f"mismatched pair: {vectors_path} has SHA-256 {sha} but {manifest_path} expects "
            f"{manifest['vectors_sha256']} (the files come from different runs, or one is being replaced)"
        )
    concepts = list(manifest["concepts"])
    layers = [int(x) for x in manifest["layers"]]
    hidden = int(manifest["hidden_size"])
    if len(set(concepts)) != len(concepts):
        raise ReadoutFileError(f"{manifest_path}: duplicate concepts in {concepts}")
    tensors, _meta, dtype = read_vectors_file(vectors_path)
    expected = {layer_key(x) for x in layers}
    missing = sorted(expected - set(tensors))
    extra = sorted(set(tensors) - expected)
    if missing or extra:
        raise ReadoutFileError(
            f"{vectors_path}: tensor keys do not match the manifest's layers {layers}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {extra}" if extra else "")
        )
    tol = _NORM_TOL.get(dtype, 1e-2)
    vectors: dict[int, np.ndarray] = {}
    for layer in layers:
        arr = tensors[layer_key(layer)]
        if arr.shape != (len(concepts), hidden):
            raise ReadoutFileError(
                f"{vectors_path}: {layer_key(layer)} has shape {list(arr.shape)}, expected "
                f"[{len(concepts)}, {hidden}] (concepts x hidden_size)"
            )
        try:
            _check_rows(arr, concepts, layer, tol)
        except ReadoutFileError as exc:
            raise ReadoutFileError(f"{vectors_path}: {exc}") from None
        vectors[layer] = np.ascontiguousarray(arr, dtype=np.float32)
    return ReadoutPair(
        concepts=concepts,
        layers=layers,
        vectors=vectors,
        manifest=manifest,
        vectors_path=vectors_path,
        manifest_path=manifest_path,
        sha256=sha,
        dtype=dtype,
    )
