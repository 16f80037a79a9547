# jacaudit on CPU: docker build -t jacaudit . && docker run --rm -v "$PWD:/data" jacaudit inspect model.onnx
# A CUDA image: build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 (and run with --gpus all).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# torch from its own index first: the CPU wheel (the default index would pull the CUDA libraries)
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

WORKDIR /opt/jacaudit
COPY pyproject.toml README.md ./
COPY jacaudit ./jacaudit
RUN pip install --no-cache-dir /opt/jacaudit \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin jacaudit

# the models and data are mounted at /data; reports are written there (jacaudit-<command>/ by default)
USER 10001
WORKDIR /data
ENTRYPOINT ["jacaudit"]
CMD ["--help"]
