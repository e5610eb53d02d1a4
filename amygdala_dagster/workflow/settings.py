"""The ``AMYGDALA_*`` environment, read in one place: :class:`Settings` (pydantic-settings).

Every default that the README's Configuration table lists comes from here: the ``amygdala``
commands (where a flag is not given), the Dagster resources' defaults and the code location
(``pipeline/definitions.py``), the sensor's interval, the readout's freshness window, the
activation cache's location (:meth:`Settings.cache_location`) and the releases kept on publication.
Only the workflow, the Dagster layer and the commands read it: the stages below them (engine,
readout ...) take these values as arguments. A value outside its bounds is refused with one line naming the
variable and what it must be (:class:`ConfigurationError`), never a validation traceback; a flag of
the same setting goes through the same bounds (:func:`flag_type`).

The memory server's bearer token is not a field: its variable is configurable
(``--token-env``, the resource's ``token_env``, default ``AMYGDALA_MEMORY_TOKEN``) and it is read
when the graph is contacted, so that it never sits in a settings object, a run config or a log.
The Kubernetes placement variables (``AMYGDALA_EXECUTOR``, ``AMYGDALA_K8S_*``) are read by
:mod:`amygdala_dagster.pipeline.k8s`, which takes them as a mapping.

No Dagster and no torch here: every command imports this module.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from amygdala_dagster.engine.cache import cache_location
from amygdala_dagster.engine.placement import parse_device_map
from amygdala_dagster.files.storage import is_local
from amygdala_dagster.graph.tags import check_emotion_name
from amygdala_dagster.readout.publish import DEFAULT_KEEP_RELEASES

ENV_PREFIX = "AMYGDALA_"
#: Upper bound of ``shards`` (parallel forward steps). A run also never uses more shards than it has
#: unique texts (the runner lowers the count and says so).
MAX_SHARDS = 64
DTYPES = ("auto", "bf16", "bfloat16", "fp16", "float16", "half", "fp32", "float32", "float")
DEFAULT_OUTPUT_DIR = "amygdala_output"

_DEVICE = re.compile(r"^(auto|cpu|mps|meta|[a-z]+:\d+|cuda|xpu|npu|hpu)$")
_LAYERS = re.compile(r"^\s*-?\d+\s*(,\s*-?\d+\s*)*$")


class ConfigurationError(ValueError):
    """An ``AMYGDALA_*`` variable (or the flag of the same setting) out of bounds; one line naming it."""


def _names(text: str) -> list[str]:
    return list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))


class Settings(BaseSettings):
    """The ``AMYGDALA_*`` variables; each field's description says what the value must be."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore",
                                      validate_assignment=True)

    memory_mcp_url: str | None = Field(None, description="the memory graph's MCP URL, e.g. http://localhost:7777")
    memory_file: str | None = Field(None, description="a JSONL export of the memory graph")
    model: str = Field("minilm", min_length=1, description="a bundled short name, a checkpoint directory or a hub id")
    device: str = Field("auto", description="auto, cpu, mps, cuda or cuda:N")
    dtype: str = Field("auto", description=f"one of {', '.join(DTYPES)}")
    target_layers: str | None = Field(
        None, description="comma-separated layer indices such as 3,18,33,36 (negative counts from the end)")
    device_map: str | None = Field(
        None, description='"auto", "balanced", "balanced_low_0", "sequential" or a JSON {module: device} map')
    shards: int = Field(1, ge=1, le=MAX_SHARDS, description=f"a whole number from 1 to {MAX_SHARDS}")
    output_dir: str | None = Field(None, description="a directory or an fsspec URL such as s3://bucket/amygdala")
    cache_dir: str | None = Field(None, description="a directory or an fsspec URL such as s3://bucket/cache")
    keep_releases: int = Field(DEFAULT_KEEP_RELEASES, ge=1, le=1000, description="a whole number from 1 to 1000")
    emotions: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated emotion names (tag-line names, e.g. joy,awe)")
    freshness_hours: float = Field(24.0, gt=0, le=24 * 366, allow_inf_nan=False,
                                   description="a number of hours above 0 (at most a year)")
    sensor_interval_s: int = Field(60, ge=1, le=24 * 3600, description="a whole number of seconds from 1 to 86400")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value.strip().lower()):
            raise ValueError("bad device")
        return value.strip().lower()

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value.strip().lower() not in DTYPES:
            raise ValueError("bad dtype")
        return value.strip().lower()

    @field_validator("target_layers")
    @classmethod
    def _layers(cls, value: str | None) -> str | None:
        if value is not None and not _LAYERS.match(value):
            raise ValueError("bad layer list")
        return value.replace(" ", "") if value is not None else None

    @field_validator("device_map")
    @classmethod
    def _device_map(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parse_device_map(value)
        return value.strip()

    @field_validator("emotions", mode="before")
    @classmethod
    def _emotions(cls, value: Any) -> list[str]:
        names = _names(value) if isinstance(value, str) else list(value or [])
        return [check_emotion_name(n) for n in names]

    @model_validator(mode="after")
    def _one_memory_source(self) -> Settings:
        if self.memory_mcp_url and self.memory_file:
            raise ConfigurationError(f"set one of {ENV_PREFIX}MEMORY_MCP_URL and {ENV_PREFIX}MEMORY_FILE, not both")
        return self

    # ------------------------------------------------------------------ derived locations
    def output_location(self) -> str:
        """``output_dir``, else ``./amygdala_output`` of the current directory; a local path made absolute."""
        return absolute_location(self.output_dir or DEFAULT_OUTPUT_DIR)

    def cache_location(self) -> Path | str:
        """``cache_dir`` (an fsspec URL stays a string), else ``~/.cache/amygdala/activations``."""
        if self.cache_dir:
            return cache_location(self.cache_dir)
        return Path.home() / ".cache" / "amygdala" / "activations"


def absolute_location(location: str) -> str:
    """A local path expanded and made absolute; a URL (``s3://...``) as given."""
    if is_local(location):
        return str(Path(location.removeprefix("file://")).expanduser().resolve())
    return location


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def _expected(field: str) -> str:
    info = Settings.model_fields.get(field)
    return (info.description if info is not None and info.description else "valid")


def _one_line(exc: ValidationError, name_of: Callable[[str], str], given: dict[str, Any]) -> str:
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err.get("loc") else ""
    if not field:  # a model-level rule (one memory source): its own message
        return str(err.get("msg", "invalid settings")).removeprefix("Value error, ")
    value = given.get(field, err.get("input"))
    return f"{name_of(field)} must be {_expected(field)}, got {value!r}"


def current_settings() -> Settings:
    """The settings as the environment stands now (read afresh: cheap, and tests change it)."""
    try:
        return Settings()
    except ConfigurationError:
        raise
    except ValidationError as exc:
        raw = {f: os.environ.get(env_name(f)) for f in Settings.model_fields}
        raise ConfigurationError(_one_line(exc, env_name, raw)) from None


def check_setting(field: str, value: Any, name: str) -> Any:
    """``value`` checked against ``field``'s bounds; :class:`ConfigurationError` naming ``name`` (a flag) otherwise."""
    probe = Settings.model_construct()
    try:
        setattr(probe, field, value)
    except ValidationError as exc:
        raise ConfigurationError(_one_line(exc, lambda _f: name, {field: value})) from None
    return getattr(probe, field)


def flag_type(field: str) -> Callable[[str], Any]:
    """An argparse ``type`` applying ``field``'s bounds: ``--shards 1000`` -> "expected ..., got '1000'" (exit 2)."""

    def parse(text: str) -> Any:
        try:
            return check_setting(field, text, "value")
        except ConfigurationError:
            raise argparse.ArgumentTypeError(f"expected {_expected(field)}, got {text!r}") from None

    parse.__name__ = field  # argparse names the type in some messages
    return parse
