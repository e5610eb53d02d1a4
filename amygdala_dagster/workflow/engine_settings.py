"""The training workflow, without Dagster: what the seed scripts, the ``amygdala`` commands and the assets share.

- :class:`EngineSettings` -> :func:`build_engine`: the model (weight-less until a text must be
  forwarded), the hooked layers (:func:`default_target_layers` when none are given) and the engine;
- the artefact layout: relative paths of every file under an output directory;
- :func:`collect_texts`: the texts of a set of emotions, each with a key naming it;
- trainability and partition planning: which emotions can be trained and which partitions to keep;
- the staged readout (the trained matrix between ``readout_vectors`` and ``readout_manifest``) and
  the per-emotion statistics' info, with the rules that decide whether they are current;
- :func:`check_writable`: every output location checked before any forward pass.

The per-token samples of a run live in :mod:`amygdala_dagster.workflow.samples` (their names are importable
from here too) and the seed's step 2, examples directory -> pair, in :mod:`amygdala_dagster.workflow.training`.

Nothing here imports from :mod:`amygdala_dagster.commands` or :mod:`amygdala_dagster.pipeline`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from amygdala_dagster.engine.activations import ActivationEngine
from amygdala_dagster.engine.cache import cache_location, default_cache_dir, fingerprint_id
from amygdala_dagster.examples.selection import ExampleSet, SelectionParams, check_emotion_name, training_problems
from amygdala_dagster.examples.directory import examples_hash
from amygdala_dagster.engine.layers import check_layer_indices, parse_layers
from amygdala_dagster.readout.manifest import layer_key, read_vectors_file
from amygdala_dagster.engine.models import LoadedModel, load_model
from amygdala_dagster.readout.vectors import EmotionStats, TrainedReadout
from amygdala_dagster.workflow.samples import (  # noqa: F401  (the per-token samples were defined here)
    RunSamples, StoredSamples, calibration_sample, conversation_sample, forward_run, held_out_negatives,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "minilm"
# Fractions of depth for the default target layers: middle-to-late (the seed's ~60-80%).
DEFAULT_DEPTH_FRACTIONS = (0.6, 0.7, 0.8)

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


# ----------------------------------------------------------------------------- settings -> engine
class SettingsError(ValueError):
    """A setting that does not fit the model (layers, dtype, device, pooling); the message names it."""


def default_target_layers(num_layers: int, fractions: Sequence[float] = DEFAULT_DEPTH_FRACTIONS) -> list[int]:
    """Middle-to-late layers: for each fraction f, the layer after which f of the depth is done.

    Layer ``idx`` is the residual stream after block ``idx + 1`` of ``num_layers``,
    so ``idx = round(f * num_layers) - 1`` (clamped, deduplicated). For 64 layers:
    37, 44, 50; for MiniLM's 6: 3, 4.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return sorted({min(num_layers - 1, max(0, round(f * num_layers) - 1)) for f in fractions})


def resolve_target_layers(spec: str | Sequence[int] | None, num_layers: int, model_id: str) -> list[int]:
    """``spec`` (``"3,18,-1"``, a list, or None for :func:`default_target_layers`) checked against the depth."""
    try:
        if spec is None:
            layers = default_target_layers(num_layers)
        elif isinstance(spec, str):
            layers = parse_layers(spec, num_layers)
        else:
            layers = list(spec)
        return check_layer_indices(layers, num_layers, model_id)
    except ValueError as exc:
        raise SettingsError(f"target layers: {exc}") from None


@dataclass(frozen=True)
class EngineSettings:
    """Everything that decides which model runs and how its activations are captured and cached."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    layers: str | tuple[int, ...] | None = None
    pooling: str = "mean"
    #: Texts per forward batch; None batches by the token budget (``max_batch_tokens``) alone.
    batch_size: int | None = None
    max_tokens: int = 512
    #: Padded-token budget per batch; None lets the engine choose (see ActivationEngine).
    max_batch_tokens: int | None = None
    layer_path: str | None = None
    trust_remote_code: bool = False
    cache_dir: str | None = None
    #: Spread one model over several devices: ``"auto"`` or a ``{module: device}`` map (see load_model).
    device_map: str | Mapping[str, Any] | None = None

    def cache_root(self) -> Path | str:
        """The activation cache root: ``cache_dir``, else ``$AMYGDALA_CACHE_DIR`` or the user cache.

        An fsspec URL (``s3://bucket/cache``) is returned as given: ``Path`` would fold its ``//``.
        """
        return cache_location(self.cache_dir) if self.cache_dir else default_cache_dir()

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], **overrides: Any) -> EngineSettings:
        """The settings that reproduce a manifest's activation fingerprint (``overrides``: device, batch size ...)."""
        fp = manifest.get("fingerprint") or {}
        model = manifest.get("model") or fp.get("model")
        if not model:
            raise SettingsError("the manifest records no model")
        base = cls(
            model=str(model), revision=manifest.get("model_revision") or fp.get("revision"),
            dtype=str(manifest.get("dtype") or fp.get("dtype") or "auto"),
            layers=tuple(int(x) for x in manifest.get("layers") or fp.get("layers") or ()) or None,
            pooling=str(fp.get("pooling") or manifest.get("pooling") or "mean"),
            max_tokens=int(fp.get("max_tokens", 512)), layer_path=fp.get("layer_path"),
        )
        return replace(base, **overrides)


def build_engine(settings: EngineSettings, *, loaded: LoadedModel | None = None,
                 on_weights_loaded: Callable[[LoadedModel], None] | None = None) -> ActivationEngine:
    """The activation engine for ``settings``, its model prepared without the weights.

    The weights are read by the first forward pass that has texts, so a fully
    cached run reads none. ``loaded`` reuses an already prepared model (same
    model, dtype and device) for another set of layers. Raises
    :class:`SettingsError` for a setting the model cannot take and lets
    ``ModelLoadError`` through.
    """
    if loaded is None:
        try:
            extra = {"device_map": settings.device_map} if settings.device_map is not None else {}
            loaded = load_model(settings.model, dtype=settings.dtype, device=settings.device,
                                revision=settings.revision, trust_remote_code=settings.trust_remote_code,
                                weights=False, **extra)
        except ValueError as exc:  # device or dtype not usable here (ModelLoadError is not a ValueError)
            raise SettingsError(str(exc)) from None
    layers = resolve_target_layers(settings.layers, loaded.num_layers, loaded.model_id)
    try:
        return ActivationEngine(loaded, layers, pooling=settings.pooling, max_tokens=settings.max_tokens,
                                batch_size=settings.batch_size, max_batch_tokens=settings.max_batch_tokens,
                                layer_path=settings.layer_path, on_weights_loaded=on_weights_loaded)
    except ValueError as exc:  # a layer path that does not resolve, an unknown pooling
        raise SettingsError(str(exc)) from None


def engine_report(engine: ActivationEngine) -> dict[str, Any]:
    """What ran: the linear-attention fast path (``yes`` / ``no`` / ``not-applicable``), the kernels found
    and missing, and the device map a spread model was placed with (None: one device)."""
    fast = engine.fast_path
    return {"fast_path": fast.fast_path, "kernels_found": list(fast.kernels_found),
            "kernels_missing": list(fast.kernels_missing),
            "linear_attention_layers": int(fast.linear_attention_layers),
            "device_map": dict(engine.loaded.device_map) if engine.loaded.device_map else None}


def fast_path_line(report: Mapping[str, Any]) -> str:
    """``fast_path: yes (kernels: fla)`` -- the one-line form the summaries print."""
    line = f"fast_path: {report.get('fast_path', 'not-applicable')}"
    found, missing = report.get("kernels_found") or [], report.get("kernels_missing") or []
    if found or missing:
        line += f" (kernels found: {', '.join(found) or 'none'}; missing: {', '.join(missing) or 'none'})"
    return line


# ----------------------------------------------------------------------------- texts and trainability
def collect_texts(example_sets: Mapping[str, ExampleSet]) -> tuple[list[str], list[str]]:
    """Every example text of every emotion (both splits, duplicates kept) and a key naming each."""
    texts: list[str] = []
    keys: list[str] = []
    for name, s in example_sets.items():
        for polarity, items in (("positive", s.positives), ("negative", s.negatives)):
            for ex in items:
                texts.append(ex.text)
                keys.append(f"{ex.key} ({name} {polarity})")
    return texts, keys


def untrainable(example_sets: Mapping[str, ExampleSet]) -> dict[str, str]:
    """``{emotion: reason}`` for the emotions whose train split cannot give a direction."""
    out = {}
    for name, s in example_sets.items():
        counts = s.counts()
        problems = training_problems(name, counts["train_positives"], counts["train_negatives"])
        if problems:
            out[name] = "; ".join(problems)
    return out


class NotQualifiedError(ValueError):
    """Emotions asked for by name that the graph cannot train; the message says why and what would help."""


def qualification_problems(catalog: pl.DataFrame, sets: Mapping[str, ExampleSet], min_positives: int,
                           params: SelectionParams) -> dict[str, str]:
    """``{emotion: why it does not qualify and what would make it}`` for the emotions of ``sets``."""
    eligible = dict(zip(catalog["emotion"].to_list(), catalog["n_positive"].to_list()))
    out = {}
    for name, s in sets.items():
        n_pos = int(eligible.get(name, 0) or 0)
        reasons = []
        if n_pos < min_positives:
            reasons.append(f"{n_pos} eligible positive(s), {min_positives} needed (a positive is a node tagged "
                           f"{name}:{params.min_positive_score:g} or higher with at least "
                           f"{params.min_content_chars} characters of text); tag more nodes, or lower "
                           "--min-positives")
        trainability = untrainable({name: s}).get(name)
        if trainability and not reasons:
            reasons.append(trainability)
        if reasons:
            out[name] = "; ".join(reasons)
    return out


@dataclass
class PartitionPlan:
    """Which emotion partitions a run covers: ``partitions`` = kept existing ones + ``new``."""

    new: list[str]
    dropped: dict[str, str]  # emotion -> why its partition goes
    partitions: list[str]


def plan_partitions(catalog: pl.DataFrame, existing: Sequence[str], min_positives: int,
                    curated: Iterable[str] = ()) -> PartitionPlan:
    """Keep the registered emotions that still qualify, add the newly qualifying ones.

    An existing partition goes when its name is not a valid emotion name (e.g.
    registered by an older version) or when it has fewer than ``min_positives``
    eligible positives (curated or not): it would fail the blocking checks and
    hold back every other emotion's refresh.
    """
    qualifying = catalog.filter(pl.col("qualifies")).sort("rank")["emotion"].to_list()
    positives = dict(zip(catalog["emotion"].to_list(), catalog["n_positive"].to_list()))
    curated = set(curated)
    dropped: dict[str, str] = {}
    for e in existing:
        try:
            if check_emotion_name(e) != e:
                raise ValueError(f"it normalises to {check_emotion_name(e)!r}")
        except ValueError as exc:
            dropped[e] = f"not a valid emotion name ({exc})"
            continue
        n = int(positives.get(e, 0) or 0)
        if n < min_positives:
            dropped[e] = (f"{n} eligible positive(s), fewer than {min_positives}"
                          + (" (curated, but it cannot pass the min-positives check)" if e in curated else ""))
    kept = [e for e in existing if e not in dropped]
    new = [e for e in qualifying if e not in existing and int(positives.get(e, 0) or 0) >= min_positives]
    return PartitionPlan(new=new, dropped=dropped, partitions=kept + new)


# ----------------------------------------------------------------------------- statistics and staleness
def stats_info(example_set: ExampleSet, stats: EmotionStats, fingerprint: Mapping[str, Any],
               cache_root: str | os.PathLike[str], stats_sha256: str) -> dict[str, Any]:
    """The JSON written beside one emotion's statistics: what they were computed from."""
    return {
        "emotion": example_set.emotion,
        "examples_sha256": examples_hash(example_set),
        "layers": [int(x) for x in stats.layers],
        "pos_n": int(stats.pos_n),
        "neg_n": int(stats.neg_n),
        "fingerprint": dict(fingerprint),
        "fingerprint_id": fingerprint_id(fingerprint),
        "cache_root": str(cache_root),
        "stats_sha256": stats_sha256,
    }


class StaleInputError(ValueError):
    """Stored intermediate results that do not belong together; the message says what to rematerialise."""


def check_stats_current(infos: Mapping[str, Mapping[str, Any]], sets: Mapping[str, ExampleSet]) -> dict[str, Any]:
    """The shared ``{fingerprint, layers, cache_root}`` of per-emotion statistics, if they are current.

    Current: each emotion's statistics were computed from its examples as they
    are now, and all of them under one activation fingerprint.
    """
    stale = [e for e in infos if infos[e]["examples_sha256"] != examples_hash(sets[e])]
    if stale:
        raise StaleInputError(
            f"activation_stats is older than tagged_examples for {', '.join(stale)}: "
            "materialize activation_stats for those partitions first"
        )
    ids = {e: fingerprint_id(info["fingerprint"]) for e, info in infos.items()}
    if len(set(ids.values())) > 1:
        by = {e: i[:12] for e, i in ids.items()}
        raise StaleInputError(f"emotion statistics come from different models/settings ({by}); "
                              "rematerialize activation_stats")
    first = next(iter(infos.values()))
    return {"fingerprint": first["fingerprint"], "layers": [int(x) for x in first["layers"]],
            "cache_root": first["cache_root"]}


# ----------------------------------------------------------------------------- staged readout
def staged_info(readout: TrainedReadout, *, vectors_sha256: str, fingerprint: Mapping[str, Any],
                examples_sha256: Mapping[str, str], cache_root: str) -> dict[str, Any]:
    """The JSON beside the staged vectors: everything the manifest and the report need besides the matrix."""
    return {
        "concepts": readout.concepts, "layers": readout.layers, "hidden_size": readout.hidden_size,
        "raw_norms": readout.raw_norms, "counts": readout.counts,
        "calibration": {c: {str(k): v for k, v in cal.items()} for c, cal in readout.calibration.items()},
        "estimator": readout.estimator, "skipped": readout.skipped, "fingerprint": dict(fingerprint),
        "examples_sha256": {e: examples_sha256[e] for e in readout.concepts}, "vectors_sha256": vectors_sha256,
        "cache_root": cache_root,
    }


def encode_staged_info(info: Mapping[str, Any]) -> str:
    return json.dumps(info, indent=1, sort_keys=True) + "\n"


def read_staged_readout(vectors_path: str | os.PathLike[str], info: Mapping[str, Any]) -> TrainedReadout:
    """The :class:`TrainedReadout` from the staged vectors file and its info."""
    tensors, _meta, _dtype = read_vectors_file(vectors_path)
    vectors = {int(l): np.ascontiguousarray(tensors[layer_key(int(l))], dtype=np.float32) for l in info["layers"]}
    return TrainedReadout(
        concepts=list(info["concepts"]), layers=[int(x) for x in info["layers"]], vectors=vectors,
        raw_norms=info["raw_norms"], counts=info["counts"],
        calibration={c: {int(k): v for k, v in cal.items()} for c, cal in info["calibration"].items()},
        estimator=info["estimator"], skipped=list(info.get("skipped", [])),
    )


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def drift_cosines(previous: TrainedReadout | None, current: TrainedReadout) -> dict[str, float]:
    """Per concept in both: the lowest cosine, over the shared layers, between its new and previous vector.

    1.0 = unchanged direction; a graph change that moves a direction shows here.
    """
    if previous is None:
        return {}
    shared = [l for l in current.layers if l in previous.layers]
    out = {}
    for concept in current.concepts:
        if concept not in previous.concepts or not shared:
            continue
        i, j = current.concepts.index(concept), previous.concepts.index(concept)
        cosines = []
        for layer in shared:
            a = current.vectors[layer][i].astype(np.float64)
            b = previous.vectors[layer][j].astype(np.float64)
            if a.shape != b.shape:
                break
            cosines.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)))
        if cosines:
            out[concept] = round(min(cosines), 6)
    return out


# ----------------------------------------------------------------------------- writability
class UnwritableError(OSError):
    """An output location that cannot be written; the message names it and the cause, on one line."""


def check_writable(directories: Mapping[str, str | os.PathLike[str] | None] = (),
                   files: Mapping[str, str | os.PathLike[str] | None] = ()) -> None:
    """Fail early, naming the location and the cause, when an output cannot be written.

    ``directories`` (``{"--output-dir": path}``) are created if missing and a
    file is created and removed in each; for ``files`` the same is done in the
    parent directory, and an existing path must be a writable regular file. A
    ``None`` path or a URL (``s3://...``) is skipped.
    """
    files = dict(files)
    for what, raw in {**dict(directories), **files}.items():
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
