# medseg: plan, train, predict and serve (DICOM node) in one image.
#
#   CPU (default):  docker build -t medseg .
#   CUDA:           docker build -t medseg:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#
# BASE_IMAGE is any Debian/Ubuntu image with apt and a python3 >= 3.11 package (CI builds from a
# debootstrapped bookworm imported as a local image: docker/build-and-test.sh). Nothing here relies
# on a large /dev/shm: training batches travel between processes through pipes, not shared memory.
ARG BASE_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------- build: a virtualenv in /opt/medseg
FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
# where torch comes from: the CPU-only wheels by default (PyPI's default torch is a multi-GB CUDA build)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# optional folder of local wheels (e.g. mounted with `podman build -v /opt/wheels:/wheels`)
ARG TORCH_FIND_LINKS=""
# optional CA bundle for pip behind a TLS-intercepting proxy (a file mounted at build time)
ARG CA_BUNDLE=""
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/medseg
ENV PATH=/opt/medseg/bin:$PATH
# torch is pinned (TORCH_VERSION); hadolint cannot see it through the optional --find-links
# hadolint ignore=DL3013
RUN if [ -n "${CA_BUNDLE}" ]; then export PIP_CERT="${CA_BUNDLE}"; fi \
 && pip install --index-url "${TORCH_INDEX_URL}" ${TORCH_FIND_LINKS:+--find-links "${TORCH_FIND_LINKS}"} \
        "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md /src/
COPY medseg /src/medseg
# torch is already satisfied, so this adds only medseg and its other dependencies (from PyPI; their
# lower bounds are in pyproject.toml)
# hadolint ignore=DL3013
RUN if [ -n "${CA_BUNDLE}" ]; then export PIP_CERT="${CA_BUNDLE}"; fi \
 && pip install /src \
 && python -c "import torch, medseg; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# ---------------------------------------------------------------- runtime: python3 + the virtualenv
FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin medseg \
 && mkdir -p /data /models /out /var/spool/medseg \
 && chown medseg:medseg /out /var/spool/medseg
COPY --from=build /opt/medseg /opt/medseg
ENV PATH=/opt/medseg/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg
USER 10001:10001
WORKDIR /home/medseg
# the DICOM node's default port (medseg serve)
EXPOSE 11112
ENTRYPOINT ["medseg"]
CMD ["--help"]
