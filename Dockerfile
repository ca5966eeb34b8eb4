# The image fireloop's Docker and Kubernetes work pools run flows in
# (deployments/work_pools/*.json name it fireloop:latest). Build it from the repository root:
#
#   docker build -t fireloop:latest .
#
# The flows run from /opt/fireloop, where the deployments' entrypoints (flows/<recipe>.py) and
# the runs directory (a volume: ledgers and checkpoints outlive the container) live. torch is
# the CPU build: against the Fireworks platform the GPUs are the platform's, and the flow's own
# torch work is the client-side loss. PREFECT_API_URL comes from the worker that starts the run.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DO_NOT_TRACK=1

WORKDIR /opt/fireloop

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX_URL" "torch>=2.4"

# What the flows import, and the metadata pip installs it from (tests/deployments/
# test_work_pools.py checks this list against pyproject.toml's packages).
COPY pyproject.toml README.md prefect.yaml ./
COPY sdk ./sdk
COPY algorithms ./algorithms
COPY tasks ./tasks
COPY flows ./flows
COPY deployments ./deployments
COPY backend ./backend
COPY fireloop ./fireloop

# The embedded platform too (`backend` extra), so a pool can run the tiny model with no
# platform configured; and the Dask task runner for reward and evaluation fan-out (the same
# pins as pyproject.toml's dev extra).
RUN pip install ".[backend]" prefect-dask==0.3.7 dask==2026.8.0 distributed==2026.8.0

RUN mkdir -p /opt/fireloop/runs
VOLUME ["/opt/fireloop/runs"]
