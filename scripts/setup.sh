#!/usr/bin/env bash
# Idempotent set-up: a project-local Python venv with the torch wheel that
# carries libtorch, and a stable `.libtorch` link that the build points at.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="2.13.0"
PY="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi

have=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)
if [ "${have%%+*}" != "$TORCH_VERSION" ]; then
  echo "setup: installing torch==$TORCH_VERSION into .venv (libtorch; about a minute)"
  .venv/bin/pip install --disable-pip-version-check -q "torch==$TORCH_VERSION"
fi

# Fixture generators for the model parity tests: OpenAI's model code and
# tokenizer (openai-clip, without its torchvision dependency), numpy, ftfy, regex.
if ! .venv/bin/python -c 'import numpy, ftfy, regex, PIL, importlib.util as u; assert u.find_spec("clip") and PIL.__version__ == "10.4.0"' 2>/dev/null; then
  echo "setup: installing parity-fixture packages into .venv"
  .venv/bin/pip install --disable-pip-version-check -q numpy ftfy regex "pillow==10.4.0"
  .venv/bin/pip install --disable-pip-version-check -q --no-deps openai-clip==1.0.1
fi

site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
target="$site/torch"
if [ "$(readlink .libtorch 2>/dev/null || true)" != "$target" ]; then
  ln -sfn "$target" .libtorch
fi
[ -f .libtorch/lib/libtorch_cpu.so ] || { echo "setup: .libtorch/lib/libtorch_cpu.so missing; remove .venv and rerun" >&2; exit 1; }
