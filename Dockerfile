# syntax=docker/dockerfile:1
# The hyserve image: one binary, `hyserve`, run as a non-root user.
#
#   docker build -t ghcr.io/hyserve/hyserve:0.1.0 .
#
# Build arguments:
#   CUDA_LIBS=pypi (default) | none
#       pypi: the CUDA user-space libraries hyserve loads at run time for --device cuda
#       (NVRTC with the CUDA headers its kernels are compiled against, cuBLAS/cuBLASLt,
#       NCCL) are installed from PyPI into /opt/nvidia. none: no CUDA libraries (a CPU
#       image, or a RUNTIME_BASE that has them).
#   RUNTIME_BASE=debian:bookworm-slim (default)
#       The runtime stage's base. With an NVIDIA CUDA image that carries the toolkit
#       headers and NCCL (a `-devel` one, e.g. nvidia/cuda:13.0.2-devel-ubuntu24.04),
#       build with CUDA_LIBS=none: /usr/local/cuda/include is searched for cuda_bf16.h.
#
# The GPU driver library (libcuda) is not in the image: the NVIDIA container toolkit
# mounts it into GPU containers (on Kubernetes, through the NVIDIA device plugin or GPU
# operator).

ARG RUNTIME_BASE=debian:bookworm-slim
ARG CUDA_LIBS=pypi

# --- build -------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
# The system protoc, instead of the vendored one the proto crate would otherwise use.
ENV PROTOC=/usr/bin/protoc
WORKDIR /src
COPY . .
# Default features: the small default model is embedded (served when --model is absent).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
    && cp target/release/hyserve /usr/local/bin/hyserve \
    && strip /usr/local/bin/hyserve

# --- CUDA libraries from PyPI -----------------------------------------------------------
# The versions scripts/test.sh compiles the kernels with (CUDA 13.0), cuBLAS of the same
# release and the NCCL 2.28 the binary is built against. Wheels unpack to
# nvidia/cu13/{lib,include} and nvidia/nccl/lib; every library is linked into
# /opt/nvidia/lib, with the unversioned libnccl.so name hyserve opens.
FROM python:3.12-slim-bookworm AS cuda-libs-pypi
RUN python3 -m pip install --no-cache-dir --disable-pip-version-check --no-deps \
        --target /opt/nvidia \
        nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 \
        nvidia-cublas==13.0.2.14 nvidia-nccl-cu13==2.28.9 \
    && mkdir -p /opt/nvidia/lib \
    && find /opt/nvidia/nvidia -name 'lib*.so*' -exec ln -sf {} /opt/nvidia/lib/ \; \
    && ln -sf libnccl.so.2 /opt/nvidia/lib/libnccl.so \
    && test -e /opt/nvidia/lib/libnvrtc.so.13 \
    && test -e /opt/nvidia/lib/libcublasLt.so.13 \
    && test -e /opt/nvidia/lib/libnccl.so.2 \
    && test -e /opt/nvidia/nvidia/cu13/include/cuda_bf16.h

FROM debian:bookworm-slim AS cuda-libs-none
RUN mkdir -p /opt/nvidia/lib /opt/nvidia/nvidia/cu13/include

FROM cuda-libs-${CUDA_LIBS} AS cuda-libs

# --- runtime -----------------------------------------------------------------------------
FROM ${RUNTIME_BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 hyserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/cache/hyserve \
        --no-create-home --shell /usr/sbin/nologin hyserve \
    && mkdir -p /var/cache/hyserve/kernels \
    && chown -R 10001:10001 /var/cache/hyserve
COPY --from=cuda-libs /opt/nvidia /opt/nvidia
COPY --from=build /usr/local/bin/hyserve /usr/local/bin/hyserve
ENV LD_LIBRARY_PATH=/opt/nvidia/lib \
    HYSERVE_CUDA_INCLUDE=/opt/nvidia/nvidia/cu13/include \
    HYSERVE_HOME=/var/cache/hyserve \
    HYSERVE_KERNEL_CACHE=/var/cache/hyserve/kernels \
    HYSERVE_LOG=info \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /var/cache/hyserve
# 8000: OpenAI HTTP API and /metrics; 50051: gRPC; 9400: a worker's metrics and probes.
EXPOSE 8000 50051 9400
ENTRYPOINT ["hyserve"]
CMD ["serve", "--http-addr", "0.0.0.0:8000", "--grpc-addr", "0.0.0.0:50051"]
