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
[ -x "$BIN" ] || { echo "gpu_check: no binary at $BIN (scripts/device_build.sh, or set GENECIS_BIN)" >&2; exit 2; }
# The binary finds the machine's own libtorch (and libjpeg if carried).
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB:$PWD/device/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PYTHONUNBUFFERED=1 "$PY" scripts/gpu_check.py "$BIN" "$WORK" "$OUT" "${2:-}"
