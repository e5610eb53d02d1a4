# Image of the amygdala-dagster code location: the Dagster user-code deployment, and the run and
# step pods launched from it (see deploy/helm/values.yaml and README, "Production").
#
#   CPU (default):  docker build -t registry.example.com/amygdala-dagster:0.1.0 .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu128 -t registry.example.com/amygdala-dagster:0.1.0-cuda .
#
# The CUDA wheels of torch carry the CUDA runtime; the GPU node supplies the driver (NVIDIA
# container toolkit / device plugin), so the base image stays the same for both variants.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# cpu, or a CUDA variant of the PyTorch wheel index (cu126, cu128, ...)
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# the project's extras: deploy = dagster-postgres, dagster-k8s, s3fs
ARG EXTRAS=deploy

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home

WORKDIR /opt/amygdala

# torch first, from the chosen index, so that the project's torch requirement is already met
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md workspace.yaml ./
COPY amygdala_dagster ./amygdala_dagster
RUN pip install ".[${EXTRAS}]" \
 && useradd --uid 1000 --create-home amygdala \
 && mkdir -p "${DAGSTER_HOME}" \
 && chown amygdala "${DAGSTER_HOME}"

USER amygdala
EXPOSE 3030
# The chart replaces this with `dagster api grpc` + dagsterApiGrpcArgs; inside a pod the server must
# listen on the pod's address for the webserver and daemon to reach it.
CMD ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", "3030", "-m", "amygdala_dagster.pipeline.definitions"]
