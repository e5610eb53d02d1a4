"""Where the steps run on Kubernetes (dagster-k8s): the GPU steps' pod settings, and the executor.

Only the steps that forward texts through the model (``activation_stats``, and the shard steps)
carry :func:`gpu_op_tags`; every other step runs on an ordinary node. The tag is
``dagster-k8s/config``, which the Kubernetes executor (one pod per step) and run launcher read.
Settings come from the code location's environment (set them on the user-code deployment):

=================================  =========================================================
``AMYGDALA_K8S_GPUS``              GPUs per GPU step (``nvidia.com/gpu`` limit), default 1
``AMYGDALA_K8S_GPU_NODE_SELECTOR`` ``key=value,key=value`` or a JSON object, default none
``AMYGDALA_K8S_GPU_TOLERATIONS``   JSON list of tolerations, default: tolerate the
                                   ``nvidia.com/gpu`` taint (``Exists``, ``NoSchedule``)
``AMYGDALA_K8S_GPU_MEMORY``        memory request and limit of a GPU step (e.g. ``64Gi``)
``AMYGDALA_EXECUTOR``              ``k8s``: one pod per step (dagster-k8s ``k8s_job_executor``)
=================================  =========================================================
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import dagster as dg

K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GPU_TOLERATIONS = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]


def _node_selector(raw: str) -> dict[str, str]:
    raw = raw.strip()
    if not raw:
        return {}
    if raw.startswith("{"):
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise ValueError
        return {str(k): str(v) for k, v in value.items()}
    pairs = [p.split("=", 1) for p in raw.split(",") if p.strip()]
    if any(len(p) != 2 or not p[0].strip() for p in pairs):
        raise ValueError
    return {k.strip(): v.strip() for k, v in pairs}


def gpu_step_k8s_config(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``dagster-k8s/config`` value of a GPU step: the GPU limit, node selector and tolerations."""
    env = os.environ if env is None else env
    raw_gpus = env.get("AMYGDALA_K8S_GPUS", "1")
    try:
        gpus = int(raw_gpus)
        if gpus < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"AMYGDALA_K8S_GPUS must be a whole number >= 1, got {raw_gpus!r}") from None
    raw_selector = env.get("AMYGDALA_K8S_GPU_NODE_SELECTOR", "")
    try:
        selector = _node_selector(raw_selector)
    except ValueError:
        raise ValueError(
            f"AMYGDALA_K8S_GPU_NODE_SELECTOR must be key=value[,key=value] or a JSON object, got {raw_selector!r}"
        ) from None
    raw_tolerations = env.get("AMYGDALA_K8S_GPU_TOLERATIONS")
    tolerations = DEFAULT_GPU_TOLERATIONS
    if raw_tolerations:
        try:
            tolerations = json.loads(raw_tolerations)
            if not isinstance(tolerations, list) or not all(isinstance(t, dict) for t in tolerations):
                raise ValueError
        except ValueError:
            raise ValueError(
                f"AMYGDALA_K8S_GPU_TOLERATIONS must be a JSON list of tolerations, got {raw_tolerations!r}"
            ) from None
    limits: dict[str, str] = {GPU_RESOURCE: str(gpus)}
    requests: dict[str, str] = {}
    memory = env.get("AMYGDALA_K8S_GPU_MEMORY", "").strip()
    if memory:
        limits["memory"] = requests["memory"] = memory
    pod_spec: dict[str, Any] = {"tolerations": tolerations}
    if selector:
        pod_spec["node_selector"] = selector
    resources: dict[str, Any] = {"limits": limits}
    if requests:
        resources["requests"] = requests
    return {"container_config": {"resources": resources}, "pod_spec_config": pod_spec}


def gpu_op_tags(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``op_tags`` for a step that needs a GPU (the value JSON-encoded, as dagster-k8s reads tags)."""
    return {K8S_CONFIG_TAG: json.dumps(gpu_step_k8s_config(env), sort_keys=True)}


def deployment_executor(env: Mapping[str, str] | None = None) -> dg.ExecutorDefinition | None:
    """``k8s_job_executor`` (each step its own pod) when ``AMYGDALA_EXECUTOR=k8s``; else Dagster's default."""
    env = os.environ if env is None else env
    choice = env.get("AMYGDALA_EXECUTOR", "").strip().lower()
    if not choice or choice == "default":
        return None
    if choice != "k8s":
        raise ValueError(f"AMYGDALA_EXECUTOR must be 'k8s' or unset, got {choice!r}")
    # dagster-k8s comes with the [deploy] extra; a local install need not have it.
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor
