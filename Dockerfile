# The one driftloop image: pipeline steps (KFP components use it as base_image), the
# KServe predictor (python -m serving.predictor), the monitor, the rollout controller and
# the local scheduler. Its tag is the project version, as in driftloop.core.config.DEFAULT_IMAGE:
#   docker build -t ghcr.io/driftloop/driftloop:0.1.0 .
# No secrets are built in: MLflow credentials, the webhook token and the KFP token reach
# the containers at run time from Kubernetes Secrets / projected tokens.
FROM python:3.11-slim

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="driftloop" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/driftloop/driftloop"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp

RUN groupadd --system --gid 10001 driftloop \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp driftloop

WORKDIR /opt/driftloop
COPY pyproject.toml README.md ./
COPY driftloop ./driftloop
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
COPY monitoring ./monitoring
# A regular (non-editable) install from pyproject, with the s3:// and gs:// data drivers.
RUN pip install ".[cloud]" \
 && rm -rf build ./*.egg-info

# Non-root; the manifests also run it with a read-only root filesystem and /tmp as emptyDir.
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["driftloop"]
CMD ["--help"]
