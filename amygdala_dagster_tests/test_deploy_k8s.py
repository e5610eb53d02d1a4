"""Kubernetes deployment without a cluster: the pod/job specs that dagster-k8s itself builds from our
step tags (GPU only on GPU steps), the Helm values against the chart's documented keys, the
instance YAML through Dagster's own config validation, and the image build where a builder exists."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml
from dagster._core.execution.api import create_execution_plan
from dagster._core.instance.config import dagster_instance_config
from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

from amygdala_dagster.pipeline.definitions import build_definitions
from amygdala_dagster.pipeline.k8s import GPU_RESOURCE, deployment_executor, gpu_op_tags, gpu_step_k8s_config

REPO = Path(__file__).resolve().parents[1]
VALUES = REPO / "deploy" / "helm" / "values.yaml"
GPU_STEPS = {"activation_stats", "activation_cache.forward_activation_shard[?]"}  # the shard steps: one pod each


def job_spec(tags: dict[str, str], name: str):
    """The Kubernetes Job dagster-k8s builds for a step with these tags."""
    config = DagsterK8sJobConfig(job_image="registry.example.com/amygdala-dagster:test",
                                 dagster_home="/opt/dagster/dagster_home", instance_config_map="dagster-instance")
    return construct_dagster_k8s_job(config, ["dagster", "api", "execute_step"], name.replace("_", "-"),
                                     user_defined_k8s_config=get_user_defined_k8s_config(tags))


def gpu_limit(job) -> str | None:
    resources = job.spec.template.spec.containers[0].resources
    return ((resources.limits or {}) if resources else {}).get(GPU_RESOURCE)


def test_only_gpu_steps_ask_for_a_gpu_in_the_pods_dagster_k8s_builds():
    job_def = build_definitions().resolve_implicit_global_asset_job_def()
    steps = {s.key: dict(s.tags) for s in create_execution_plan(job_def).steps}
    assert set(steps) >= GPU_STEPS and len(steps) >= 10
    for key, tags in steps.items():
        job = job_spec(tags, key)
        pod = job.spec.template.spec
        if key in GPU_STEPS:
            assert gpu_limit(job) == "1", key
            assert any(t.key == GPU_RESOURCE and t.effect == "NoSchedule" for t in pod.tolerations)
        else:
            assert gpu_limit(job) is None, key
            assert not pod.tolerations and not pod.node_selector, key


@pytest.mark.parametrize("shards", [1, 2])
def test_only_gpu_pool_steps_need_the_model(shards):
    """Issue "Model work once, on the GPU" §1: a step that takes the model resource (which loads weights) is in
    the gpu pool and carries the GPU pod tags; calibration, evaluation, the report and shard planning do not
    take it, directly or through another resource."""
    job_def = build_definitions(shards=shards).resolve_job_def("full_refresh")
    plan = create_execution_plan(job_def)
    needing = set()
    for step in plan.steps:
        node = job_def.get_node(step.node_handle)
        keys = set(node.definition.required_resource_keys)
        resources = job_def.resource_defs
        nested = {k for key in keys for k in getattr(resources.get(key), "required_resource_keys", set())}
        if "model" in keys | nested:
            needing.add(step.key)
            assert node.definition.pool == "gpu", step.key
            assert gpu_limit(job_spec(dict(step.tags), step.key)) == "1", step.key
    expected = {"activation_stats"} | ({"activation_cache.forward_activation_shard[?]"} if shards > 1 else set())
    assert needing == expected


def test_gpu_placement_comes_from_the_environment():
    env = {"AMYGDALA_K8S_GPUS": "2", "AMYGDALA_K8S_GPU_NODE_SELECTOR": "pool=a100, zone=eu-1",
           "AMYGDALA_K8S_GPU_MEMORY": "64Gi",
           "AMYGDALA_K8S_GPU_TOLERATIONS":
               '[{"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoSchedule"}]'}
    job = job_spec(gpu_op_tags(env), "activation_stats")
    container, pod = job.spec.template.spec.containers[0], job.spec.template.spec
    assert container.resources.limits == {GPU_RESOURCE: "2", "memory": "64Gi"}
    assert container.resources.requests == {"memory": "64Gi"}
    assert pod.node_selector == {"pool": "a100", "zone": "eu-1"}
    assert [(t.key, t.value) for t in pod.tolerations] == [("gpu", "yes")]
    config = gpu_step_k8s_config({"AMYGDALA_K8S_GPU_NODE_SELECTOR": '{"a": "b"}'})
    assert config["pod_spec_config"]["node_selector"] == {"a": "b"}


@pytest.mark.parametrize("env, message", [
    ({"AMYGDALA_K8S_GPUS": "0"}, "AMYGDALA_K8S_GPUS must be a whole number >= 1, got '0'"),
    ({"AMYGDALA_K8S_GPU_NODE_SELECTOR": "pool"}, "AMYGDALA_K8S_GPU_NODE_SELECTOR must be key=value"),
    ({"AMYGDALA_K8S_GPU_TOLERATIONS": "{}"}, "AMYGDALA_K8S_GPU_TOLERATIONS must be a JSON list"),
    ({"AMYGDALA_EXECUTOR": "celery"}, "AMYGDALA_EXECUTOR must be 'k8s' or unset, got 'celery'"),
])
def test_bad_placement_settings_are_one_clear_line(env, message):
    with pytest.raises(ValueError, match=message):
        gpu_op_tags(env)
        deployment_executor(env)


def test_the_kubernetes_executor_is_chosen_by_the_environment(monkeypatch):
    assert deployment_executor({}) is None
    monkeypatch.setenv("AMYGDALA_EXECUTOR", "k8s")
    job_def = build_definitions().resolve_implicit_global_asset_job_def()
    assert job_def.executor_def.name == "k8s"


# The chart's documented values (dagster-io/dagster helm/dagster/schema/schema/charts/...: values.py,
# subschema/daemon.py, run_launcher.py, postgresql.py, concurrency.py, webserver.py and
# dagster_user_deployments/subschema/user_deployments.py): the keys each section we set accepts.
CHART_KEYS = {
    "": {"dagsterWebserver", "dagster-user-deployments", "postgresql", "generatePostgresqlPasswordSecret",
         "generateCeleryConfigSecret", "rabbitmq", "redis", "flower", "ingress", "imagePullSecrets",
         "computeLogManager", "scheduler", "runLauncher", "pythonLogs", "dagsterDaemon", "busybox", "migrate",
         "telemetry", "serviceAccount", "global", "retention", "concurrency", "additionalInstanceConfig"},
    "dagsterWebserver": {"replicaCount", "image", "nameOverride", "pathPrefix", "service", "workspace", "env",
                         "envConfigMaps", "envSecrets", "deploymentLabels", "labels", "nodeSelector", "affinity",
                         "tolerations", "podSecurityContext", "securityContext", "resources", "readinessProbe",
                         "livenessProbe", "startupProbe", "annotations", "enableReadOnly", "dbStatementTimeout",
                         "dbPoolRecycle", "logLevel", "schedulerName", "volumeMounts", "volumes"},
    "dagster-user-deployments": {"enabled", "enableSubchart", "imagePullSecrets", "deployments"},
    "dagster-user-deployments.deployments[]": {
        "name", "image", "port", "dagsterApiGrpcArgs", "codeServerArgs", "includeConfigInLaunchedRuns", "env",
        "envConfigMaps", "envSecrets", "annotations", "nodeSelector", "affinity", "tolerations",
        "podSecurityContext", "securityContext", "resources", "livenessProbe", "readinessProbe", "startupProbe",
        "labels", "volumeMounts", "volumes", "schedulerName"},
    "runLauncher": {"type", "config"},
    "runLauncher.config": {"celeryK8sRunLauncher", "k8sRunLauncher", "customRunLauncher"},
    "runLauncher.config.k8sRunLauncher": {
        "image", "imagePullPolicy", "jobNamespace", "loadInclusterConfig", "kubeconfigFile", "envConfigMaps",
        "envSecrets", "envVars", "volumeMounts", "volumes", "labels", "failPodOnRunFailure"},
    "postgresql": {"postgresqlScheme", "image", "enabled", "postgresqlHost", "postgresqlUsername",
                   "postgresqlPassword", "postgresqlDatabase", "postgresqlParams", "service"},
    "dagsterDaemon": {"schedulerName", "volumeMounts", "volumes", "enabled", "image", "runCoordinator",
                      "heartbeatTolerance", "env", "envConfigMaps", "envSecrets", "deploymentLabels", "labels",
                      "nodeSelector", "affinity", "tolerations", "podSecurityContext", "securityContext",
                      "resources", "livenessProbe", "readinessProbe", "startupProbe", "annotations",
                      "runMonitoring", "runRetries", "sensors", "schedules"},
    "dagsterDaemon.runCoordinator": {"enabled", "type", "config"},
    # runMonitoring / runRetries are free-form in the schema; these are the keys templates/configmap-instance.yaml reads
    "dagsterDaemon.runMonitoring": {"enabled", "startTimeoutSeconds", "cancelTimeoutSeconds", "maxResumeRunAttempts",
                                    "pollIntervalSeconds", "freeSlotsAfterRunEndSeconds"},
    "dagsterDaemon.runRetries": {"enabled", "maxRetries"},
    "dagsterDaemon.runCoordinator.config": {"queuedRunCoordinator", "customRunCoordinator"},
    "dagsterDaemon.runCoordinator.config.queuedRunCoordinator": {
        "maxConcurrentRuns", "tagConcurrencyLimits", "dequeueIntervalSeconds", "dequeueNumWorkers",
        "dequeueUseThreads"},
    "concurrency": {"enabled", "pools", "runs"},
    "concurrency.pools": {"defaultLimit", "granularity", "opGranularityRunBuffer"},
    "telemetry": {"enabled"},
}
# kubernetes objects
OPEN = {"service", "image", "resources", "postgresqlParams", "includeConfigInLaunchedRuns", "additionalInstanceConfig"}


def _check_keys(node, path: str, seen: list[str]) -> list[str]:
    errors = []
    if isinstance(node, dict) and path in CHART_KEYS:
        seen.append(path)
        for key, value in node.items():
            if key not in CHART_KEYS[path]:
                errors.append(f"{path or '<top>'}: {key!r} is not a key of the chart")
            elif key not in OPEN:
                errors += _check_keys(value, f"{path}.{key}" if path else key, seen)
    elif isinstance(node, list) and f"{path}[]" in CHART_KEYS:
        for item in node:
            seen.append(f"{path}[]")
            errors += [e for k, v in item.items() if k not in CHART_KEYS[f"{path}[]"]
                       for e in [f"{path}[]: {k!r} is not a key of the chart"]]
    return errors


def test_helm_values_use_the_charts_documented_keys_and_our_settings():
    values = yaml.safe_load(VALUES.read_text())
    seen: list[str] = []
    assert _check_keys(values, "", seen) == []
    assert {"dagster-user-deployments.deployments[]", "runLauncher.config.k8sRunLauncher",
            "dagsterDaemon.runCoordinator.config.queuedRunCoordinator", "concurrency.pools"} <= set(seen)
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["enabled"] \
        and values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert values["concurrency"]["pools"]["defaultLimit"] >= 1
    # the same monitoring and retries as deploy/dagster.yaml, and the driver dagster-postgres ships
    deploy = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    monitoring = values["dagsterDaemon"]["runMonitoring"]
    assert monitoring["pollIntervalSeconds"] == deploy["run_monitoring"]["poll_interval_seconds"]
    assert monitoring["freeSlotsAfterRunEndSeconds"] == deploy["run_monitoring"]["free_slots_after_run_end_seconds"]
    assert monitoring["maxResumeRunAttempts"] == deploy["run_monitoring"]["max_resume_run_attempts"]
    assert not values["dagsterDaemon"]["runRetries"]["enabled"]  # else the chart writes a second run_retries
    assert values["additionalInstanceConfig"]["run_retries"] == deploy["run_retries"]
    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    module = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dagster"]["module_name"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", module]
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["AMYGDALA_EXECUTOR"] == "k8s" and deployment_executor(env) is not None
    job = job_spec(gpu_op_tags(env), "activation_stats")  # the deployment's own GPU settings, as dagster-k8s reads them
    assert gpu_limit(job) == env["AMYGDALA_K8S_GPUS"]
    assert job.spec.template.spec.node_selector == {"nvidia.com/gpu.present": "true"}
    assert env["AMYGDALA_OUTPUT_DIR"].startswith("s3://") and env["AMYGDALA_CACHE_DIR"].startswith("s3://")
    assert not any("SECRET" in k or "PASSWORD" in k or "TOKEN" in k for k in env), "secrets belong in envSecrets"


def test_deploy_instance_yaml_passes_dagsters_own_validation(tmp_path, monkeypatch):
    shutil.copy(REPO / "deploy" / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", "postgresql://u@127.0.0.1:1/db")
    config, _ = dagster_instance_config(str(tmp_path))
    storage = config["storage"]["custom"]
    assert (storage["module"], storage["class"]) == ("amygdala_dagster.pipeline.instance", "PostgresStorage")
    assert storage["config"]["postgres_url"] == {"env": "DAGSTER_POSTGRES_URL"}
    assert config["run_monitoring"]["enabled"] and config["run_monitoring"]["max_resume_run_attempts"] == 0
    assert config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0
    assert config["run_retries"] == {"enabled": True, "max_retries": 0, "retry_on_asset_or_op_failure": False}
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["pools"]["default_limit"] == 1


@pytest.mark.slow
def test_image_builds():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True).returncode != 0:
        pytest.skip("no container builder here (no docker daemon): the Dockerfile is not built in this test run")
    tag = f"amygdala-dagster-test:{os.getpid()}"
    build = subprocess.run([docker, "build", "-q", "-t", tag, str(REPO)], capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([docker, "run", "--rm", tag, "python", "-c",
                          "import amygdala_dagster.pipeline.definitions as d, dagster_k8s, dagster_postgres, s3fs;"
                          "print(json.dumps(sorted(d.defs.resolve_all_asset_keys())))"
                          .replace("json.", "__import__('json')."),
                          ], capture_output=True, text=True, timeout=600)
    subprocess.run([docker, "rmi", "-f", tag], capture_output=True)
    assert run.returncode == 0 and "activation_stats" in run.stdout, run.stderr[-3000:]
