"""Dagster resources: the memory graph, the model, artifact storage and selection parameters.

All four are :class:`dagster.ConfigurableResource` so they can be set from the
launchpad, from YAML run config and from Python. Defaults come from the
environment (``AMYGDALA_*`` variables, read by :mod:`amygdala_dagster.workflow.settings`)
so ``dagster dev`` works without any configuration on the bundled sample graph and MiniLM.
"""

from __future__ import annotations

import gc
import logging
import threading
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import torch
from pydantic import Field, PrivateAttr

from amygdala_dagster.data import conversation_snippets_path, sample_graph_path
from amygdala_dagster.engine.activations import ActivationEngine
from amygdala_dagster.engine.models import LoadedModel
from amygdala_dagster.engine.placement import parse_device_map
from amygdala_dagster.engine.token_sample import DEFAULT_SAMPLE_TOKENS
from amygdala_dagster.evaluation.verdicts import Criteria
from amygdala_dagster.examples.catalog import DEFAULT_CORE_NODE_TYPES, emotion_catalog
from amygdala_dagster.examples.selection import SelectionParams
from amygdala_dagster.files.storage import Store
from amygdala_dagster.graph.mcp_source import McpSource
from amygdala_dagster.graph.sources import JsonlSource, open_source
from amygdala_dagster.readout.episode import DEFAULT_FALSE_ALARM_RATE, DEFAULT_HALF_LIFE_TOKENS, DEFAULT_MIN_TOKENS
from amygdala_dagster.readout.metrics import THRESHOLD_METHODS
from amygdala_dagster.workflow.engine_settings import EngineSettings, build_engine
from amygdala_dagster.workflow.settings import MAX_SHARDS, current_settings

log = logging.getLogger(__name__)

_LOAD_LOCK = threading.Lock()


def default_output_dir() -> str:
    """``$AMYGDALA_OUTPUT_DIR`` or ``./amygdala_output`` (under the current directory)."""
    return current_settings().output_location()


class MemoryGraphResource(dg.ConfigurableResource):
    """The memory graph: an MCP server (``mcp_url``) or a JSONL export (``file``).

    With neither, the bundled sample graph. The bearer token comes from the
    environment: set ``token`` to ``dg.EnvVar("AMYGDALA_MEMORY_TOKEN")`` (Dagster
    resolves it at run time and shows only the variable's name), or leave it
    unset and the variable named by ``token_env`` is read at call time. Either
    way the secret never enters run config, metadata or logs.
    """

    # No environment default here (an explicit ``file`` must never lose to a URL from the environment): the
    # code location's resource takes $AMYGDALA_MEMORY_MCP_URL / $AMYGDALA_MEMORY_FILE (definitions.default_resources).
    mcp_url: str | None = Field(default=None, description="MCP endpoint, e.g. http://localhost:7777")
    file: str | None = Field(default=None, description="JSONL export (used when mcp_url is unset)")
    token: str | None = Field(default=None, description="bearer token; give it as EnvVar('AMYGDALA_MEMORY_TOKEN')")
    token_env: str | None = Field(default="AMYGDALA_MEMORY_TOKEN", description="env var holding the bearer token")
    list_tool: str = "list_nodes"
    version_tool: str = "graph_version"
    page_size: int = 200
    retries: int = 3

    def source(self) -> JsonlSource | McpSource:
        if self.mcp_url:
            return open_source(
                memory_mcp_url=self.mcp_url, list_tool=self.list_tool, version_tool=self.version_tool,
                token_env=self.token_env, token=self._token(), page_size=self.page_size, retries=self.retries,
            )
        return open_source(memory_file=self.file or str(sample_graph_path()))

    def _token(self) -> str | None:
        # Outside a run (planning partitions, observing the graph, a sensor tick) Dagster has not
        # resolved an EnvVar yet, and str() of it raises: read the variable here instead.
        token = self.token
        if isinstance(token, dg.EnvVar):
            return token.get_value()
        return token

    @property
    def description(self) -> str:
        return self.mcp_url or self.file or f"{sample_graph_path()} (bundled sample)"


class SelectionResource(dg.ConfigurableResource):
    """Example-selection parameters (Contract 2 flags) and which emotions qualify."""

    min_positive_score: float = 8.0
    max_negative_mentions: int = 0
    min_content_chars: int = 40
    max_examples_per_emotion: int = 500
    holdout_fraction: float = 0.2
    min_positives: int = Field(default=10, description="positives an emotion needs to qualify (and to pass its check)")
    max_emotions: int = 200
    curated: list[str] = Field(default_factory=lambda: current_settings().emotions,
                               description="emotions always included (default $AMYGDALA_EMOTIONS)")
    core_node_types: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CORE_NODE_TYPES),
        description="node types (core-personality, pattern) whose tagged or named emotions are candidates beside the "
                    "most-tagged ones, and take the max_emotions slots before them")

    def params(self) -> SelectionParams:
        return SelectionParams(
            min_positive_score=float(self.min_positive_score),
            max_negative_mentions=int(self.max_negative_mentions),
            min_content_chars=int(self.min_content_chars),
            max_examples_per_emotion=int(self.max_examples_per_emotion),
            holdout_fraction=float(self.holdout_fraction),
        )

    def catalog(self, snapshot: pl.DataFrame) -> pl.DataFrame:
        return emotion_catalog(
            snapshot, self.params(), min_positives=int(self.min_positives),
            max_emotions=int(self.max_emotions), curated=list(self.curated),
            core_node_types=list(self.core_node_types),
        )


class ArtifactStorage(dg.ConfigurableResource):
    """Base directory or fsspec URL (``s3://bucket/prefix``, ``memory://x``) for every artifact."""

    base_path: str = Field(default_factory=default_output_dir)

    def store(self) -> Store:
        return Store(self.base_path)


class ModelResource(dg.ConfigurableResource):
    """The model whose activations are read, and how they are captured and cached.

    The model is loaded lazily, at most once per process and resource instance
    (every emotion partition of a run shares it) and released when the run's
    execution ends. The engine is built without the weights (config, tokenizer
    and a meta-device skeleton give the activation fingerprint); they are read
    only when a text is not in the activation cache, so a fully cached run
    loads none.
    """

    model: str = Field(default_factory=lambda: current_settings().model,
                       description="bundled short name, local checkpoint dir or hub id "
                                   "(default $AMYGDALA_MODEL or minilm)")
    revision: str | None = None
    dtype: str = Field(default_factory=lambda: current_settings().dtype,
                       description="default $AMYGDALA_DTYPE or auto")
    device: str = Field(default_factory=lambda: current_settings().device,
                        description="default $AMYGDALA_DEVICE or auto")
    layers: str | None = Field(default_factory=lambda: current_settings().target_layers,
                               description="comma-separated layer indices (negative = from the end); default: "
                                           "$AMYGDALA_TARGET_LAYERS, else ~60/70/80% of depth")
    pooling: str = "mean"
    batch_size: int | None = Field(default=None,
                                   description="texts per forward batch; unset: batch by the token budget")
    max_batch_tokens: int | None = Field(default=None,
                                         description="padded tokens per batch (default: the engine's budget)")
    max_tokens: int = 512
    layer_path: str | None = None
    cache_dir: str | None = Field(default_factory=lambda: current_settings().cache_dir,
                                  description="activation cache; default $AMYGDALA_CACHE_DIR or "
                                              "~/.cache/amygdala/activations")
    trust_remote_code: bool = False
    device_map: str | None = Field(
        default_factory=lambda: current_settings().device_map,
        description='spread one model over the GPUs of a box: "auto" or a JSON {module: device} map (needs '
                    'accelerate; default $AMYGDALA_DEVICE_MAP)')

    _engine: ActivationEngine | None = PrivateAttr(default=None)

    def settings(self) -> EngineSettings:
        """The workflow's engine settings from this resource's fields."""
        return EngineSettings(
            model=self.model, revision=self.revision, dtype=self.dtype, device=self.device, layers=self.layers,
            pooling=self.pooling, batch_size=self.batch_size, max_tokens=self.max_tokens,
            max_batch_tokens=self.max_batch_tokens, layer_path=self.layer_path,
            trust_remote_code=self.trust_remote_code, cache_dir=self.cache_dir,
            device_map=parse_device_map(self.device_map),
        )

    def cache_root(self) -> Path | str:
        return self.settings().cache_root()

    def engine(self) -> ActivationEngine:
        """The activation engine (weights loaded by its first forward pass that has texts)."""
        with _LOAD_LOCK:
            if self._engine is None:
                log.info("preparing model %s (dtype %s, device %s)", self.model, self.dtype, self.device)
                self._engine = build_engine(self.settings(), on_weights_loaded=_log_weights_loaded)
            return self._engine

    def release(self) -> bool:
        """Drop the model so its memory (and GPU memory) is freed; True when weights were held."""
        with _LOAD_LOCK:
            if self._engine is None:
                return False
            had_weights = self._engine.weights_loaded
            self._engine = None
        if had_weights:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return had_weights

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self.release() and context.log is not None:
            context.log.info(f"released the weights of model {self.model}")


def _log_weights_loaded(loaded: LoadedModel) -> None:
    log.info("loaded the weights of %s on %s", loaded.model_id, loaded.device)


class ShardingResource(dg.ConfigurableResource):
    """How many parallel GPU steps share the forward work (one process, or one GPU pod on Kubernetes, each)."""

    shards: int = Field(
        default_factory=lambda: current_settings().shards, ge=1, le=MAX_SHARDS,
        description=f"split the forward work into this many parallel steps by text hash, 1 to {MAX_SHARDS}, never "
                    "more than the run's unique texts; 1: one step (default $AMYGDALA_SHARDS)")


class EvaluationResource(dg.ConfigurableResource):
    """How the readout is evaluated, and the thresholds of the evaluation checks."""

    bootstrap: int = Field(default=200, description="bootstrap resamples for the AUROC confidence interval (0: none)")
    min_auroc: float = Field(default=Criteria.min_auroc,
                             description="held-out AUROC below which an emotion is flagged (WARN)")
    confound_margin: float = Field(default=Criteria.confound_margin,
                                   description="how much a vector must beat the trivial baselines by")
    crosstalk_cosine: float = Field(default=0.5, description="list vector pairs with at least this cosine")
    min_holdout_positives: int = Field(default=Criteria.min_holdout_positives,
                                       description="fewer held-out positives make a verdict 'weak'")
    max_crosstalk_cosine: float = Field(
        default=Criteria.max_crosstalk_cosine,
        description="a vector this close to another emotion's (at its best layer) is 'weak'")
    max_fire_rate_without: float = Field(
        default=Criteria.max_fire_rate_without,
        description="firing on more of the conversations without the emotion makes it 'do not use'")
    min_episode_auroc: float = Field(
        default=Criteria.min_episode_auroc,
        description="a lower AUROC of the episode rule's score on conversations makes it 'weak'")
    max_episode_false_alarm_rate: float | None = Field(
        default=Criteria.max_episode_false_alarm_rate,
        description="the episode rule firing on more of the conversations without the emotion (beyond the 95% "
                    "interval) makes it 'weak'; unset: the rule's own false-alarm rate")
    min_episode_hit_rate: float = Field(
        default=Criteria.min_episode_hit_rate,
        description="the episode rule firing on fewer of the conversations with the emotion (beyond the 95% "
                    "interval) makes it 'weak'")
    estimators: str = Field(
        default="auto",
        description="estimators compared with the shipped one: auto (LDA and logistic up to 24 emotions), "
                    "none, or a list such as mean_difference,lda,logistic",
    )
    histograms: int = Field(default=12, description="per-emotion projection histograms drawn (most attention first)")
    threshold_method: str = Field(
        default="max_f1",
        description="decision threshold written into the manifest: max_f1 (on the holdout) or fixed_fpr",
    )
    target_fpr: float = Field(default=0.05, description="false-positive rate of the fixed_fpr threshold")
    snippets_file: str | None = Field(
        default=None,
        description="JSONL of {id, text} out-of-distribution snippets to score "
                    "(default: the bundled sample; \"none\": skip)",
    )

    token_target_rate: float = Field(default=0.01,
                                     description="share of calibration tokens the token threshold fires on")
    episode_false_alarm_rate: float = Field(
        default=DEFAULT_FALSE_ALARM_RATE, gt=0.0, lt=1.0,
        description="share of calibration episodes without an emotion on which its episode rule may fire")
    episode_half_life_tokens: float | None = Field(
        default=DEFAULT_HALF_LIFE_TOKENS, gt=0.0,
        description="half-life in scored tokens of the episode rule's weighted mean (null: the cumulative mean)")
    episode_min_tokens: int = Field(default=DEFAULT_MIN_TOKENS, ge=1,
                                    description="scored tokens the episode rule reads before it decides")
    calibration_tokens: int = Field(
        default=DEFAULT_SAMPLE_TOKENS, ge=1,
        description="token budget of the calibration sample (and of the evaluation conversations) whose per-token "
                    "activations the GPU step keeps")
    calibration_texts: str | None = Field(
        default=None,
        description="JSONL of {text} or {messages} to set the token calibration on (default: held-out negatives)",
    )
    eval_conversations: str | None = Field(
        default=None,
        description="JSONL of labelled conversations {id, text|messages, emotions} for the report's runtime "
                    "section (default: the bundled snippets; \"none\": skip)",
    )

    def eval_conversations_path(self) -> str | None:
        if self.eval_conversations and self.eval_conversations.lower() == "none":
            return None
        return self.eval_conversations or str(conversation_snippets_path())

    def threshold(self) -> dict[str, Any]:
        """``{"threshold_method", "target_fpr"}`` validated (a typo fails before any work is done)."""
        if self.threshold_method not in THRESHOLD_METHODS:
            raise ValueError(
                f"evaluation.threshold_method {self.threshold_method!r}: choose one of {', '.join(THRESHOLD_METHODS)}"
            )
        if not 0.0 <= float(self.target_fpr) <= 1.0:
            raise ValueError(f"evaluation.target_fpr must be within [0, 1], got {self.target_fpr}")
        return {"threshold_method": self.threshold_method, "target_fpr": float(self.target_fpr)}

    def criteria(self) -> Any:
        """The verdict criteria (:class:`amygdala_dagster.evaluation.verdicts.Criteria`) of these settings."""
        return Criteria(min_auroc=float(self.min_auroc), min_holdout_positives=int(self.min_holdout_positives),
                        confound_margin=float(self.confound_margin),
                        max_crosstalk_cosine=float(self.max_crosstalk_cosine),
                        max_fire_rate_without=float(self.max_fire_rate_without),
                        min_episode_auroc=float(self.min_episode_auroc),
                        max_episode_false_alarm_rate=None if self.max_episode_false_alarm_rate is None
                        else float(self.max_episode_false_alarm_rate),
                        min_episode_hit_rate=float(self.min_episode_hit_rate))

    def episode_settings(self) -> dict[str, Any]:
        """Keyword arguments of :func:`amygdala_dagster.readout.token_calibration.calibrate_episodes`."""
        return {"false_alarm_rate": float(self.episode_false_alarm_rate),
                "half_life_tokens": (None if self.episode_half_life_tokens is None
                                     else float(self.episode_half_life_tokens)),
                "min_tokens": int(self.episode_min_tokens)}

    def snippets_path(self) -> str | None:
        if self.snippets_file and self.snippets_file.lower() == "none":
            return None
        return self.snippets_file or str(conversation_snippets_path())
