#!/usr/bin/env bash
# The GPU paths on a GPU, as one prepared run: encode parity (CPU vs GPU,
# fp32 and fp16 autocast, and against PyTorch), global ranking parity and
# speed, embed and fine-tune throughput against PyTorch. Writes
# OUT/gpu_check.json. Without a GPU it runs the CPU half and says that the
# GPU half did not run.
#
#   scripts/gpu_check.sh OUT [SIZE]        SIZE: full (default with a GPU) or small
#
# On the GPU machine: build here with scripts/device_build.sh, carry
# device/, run `scripts/gpu_check.sh $OUT`. Here: GENECIS_BIN=<release
# genecis> PYTHON=.venv/bin/python scripts/gpu_check.sh /tmp/gpu-check small
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_check.sh OUT [full|small]}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BIN=${GENECIS_BIN:-device/genecis}
if [ ! -x "$BIN" ] && [ -f "$BIN.xz" ]; then
  "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$BIN.xz" "$BIN"
  chmod +x "$BIN"
fi
[ -x "$BIN" ] || { echo "gpu_check: no binary at $BIN (scripts/device_build.sh, or set GENECIS_BIN)" >&2; exit 2; }
# The binary finds the machine's own libtorch (and libjpeg if carried).
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB:$PWD/device/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# OpenAI's model code (the PyTorch side of the fine-tuning parity), from
# the carried wheel where the machine has none.
if ! "$PY" -c 'import importlib.util as u; assert u.find_spec("clip")' 2>/dev/null; then
  ls device/whl/*.whl >/dev/null 2>&1 || { echo "gpu_check: no openai-clip here and no device/whl/*.whl (scripts/device_build.sh makes it)" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" device/whl/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
PYTHONUNBUFFERED=1 "$PY" scripts/gpu_check.py "$BIN" "$WORK" "$OUT" "${2:-}"
