#!/usr/bin/env bash
# A release `genecis` for the GPU machine: linked against PyTorch 2.11's
# libtorch (what that machine's python3 holds), stripped, into
# device/genecis (ignored by git; carry it). Usage: scripts/device_build.sh
#
# What differs from the normal build:
# - libtorch 2.11.0+cu130 from a second venv (DEVICE_VENV, default
#   ~/.cache/genecis-rs/venv211) instead of .venv's 2.13;
# - tch 0.24 (its torch-sys generates bindings for torch 2.11; 0.26's
#   wrapper names ops 2.11 lacks and does not compile against it): the
#   build runs on a copy of the sources whose Cargo.toml asks for 0.24;
# - its own target folder (DEVICE_TARGET), seeded from the normal release
#   folder when it exists, so only torch-sys, tch and genecis rebuild;
# - no rpath to this machine: scripts/gpu_check.sh points
#   LD_LIBRARY_PATH at the device's torch/lib.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/genecis-rs
VENV=${DEVICE_VENV:-$CACHE/venv211}
SRC=$CACHE/device-src
TARGET=${DEVICE_TARGET:-$CACHE/target-dev211}
MAIN_TARGET=${CARGO_TARGET_DIR:-$CACHE/target}

if ! "$VENV/bin/python" -c 'import torch; assert torch.__version__.startswith("2.11.0")' 2>/dev/null; then
  echo "device_build: installing torch==2.11.0 into $VENV (libtorch of the GPU machine)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --disable-pip-version-check -q "torch==2.11.0"
fi
# The CUDA crt/cccl headers of its toolkit, for the NCCL half of c10d.cpp.
if ! "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("nvidia") else 1)' 2>/dev/null \
  || [ ! -d "$("$VENV/bin/python" -c 'import os, nvidia; print(os.path.dirname(nvidia.__path__[0]))')/nvidia/cu13/include/crt" ]; then
  "$VENV/bin/pip" install --disable-pip-version-check -q --no-deps "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*"
fi
TORCH=$("$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)

# The sources, with tch 0.24.
rm -rf "$SRC" && mkdir -p "$SRC"
tar -C "$ROOT" --exclude=./target --exclude=./.venv --exclude=./.git --exclude=./device --exclude=./pipelines/runs -cf - . | tar -C "$SRC" -xf -
sed -i 's/^tch = "0.26"$/tch = "0.24"/' "$SRC/Cargo.toml"
grep -q '^tch = "0.24"$' "$SRC/Cargo.toml" || { echo "device_build: Cargo.toml's tch line changed; update this script" >&2; exit 1; }
if [ ! -d "$TARGET/release" ] && [ -d "$MAIN_TARGET/release" ]; then
  echo "device_build: seeding $TARGET from $MAIN_TARGET/release"
  mkdir -p "$TARGET" && cp -a "$MAIN_TARGET/release" "$TARGET/"
fi
cd "$SRC"
cargo update -q -p tch --precise 0.24.0
LIBTORCH="$TORCH" LIBTORCH_BYPASS_VERSION_CHECK=0 CARGO_TARGET_DIR="$TARGET" \
  cargo build --release --bin genecis
mkdir -p "$ROOT/device/lib"
cp "$TARGET/release/genecis" "$ROOT/device/genecis"
strip "$ROOT/device/genecis"
# Stripped it is ~140 MB, over the 64 MiB a device call carries: xz makes
# it ~32 MB; gpu_check.sh unpacks it there.
xz -T0 -6 -f -k "$ROOT/device/genecis"
# The one library outside libtorch and glibc it links: the system's
# libjpeg-turbo, which the GPU machine's image need not have.
cp -L "$(ldconfig -p | awk '/libjpeg.so.62 / {print $NF; exit}')" "$ROOT/device/lib/libjpeg.so.62"
# OpenAI's model code for the PyTorch side of the fine-tuning parity
# (the GPU machine cannot fetch it): a wheel to carry.
"$VENV/bin/pip" wheel --disable-pip-version-check -q --no-deps "openai-clip==1.0.1" -w "$ROOT/device/whl"
ls -la "$ROOT/device" "$ROOT/device/lib" "$ROOT/device/whl"
echo "device_build: device/genecis is linked against libtorch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'); carry device/genecis.xz, device/lib and device/whl, and run scripts/gpu_check.sh there"
