#!/usr/bin/env bash
# Issue 7's GPU figures: MSConvLSTM-Att train slices/s at batch 32 and 64 in bfloat16, the
# paper's 500-epoch schedule estimated from them, and one 240x240x155 case's latency.
#
#   bash benchmarks/gpu.sh                 # on a CUDA machine, from the repository root or not
#   bash benchmarks/gpu.sh --dry-run       # the same logic, tiny, on a CPU-only machine
#
# Extra arguments go to `python -m benchmarks.gpu` (see --help). Set WHEELS=DIR to install from
# downloaded wheels on a machine without a package index.
set -euo pipefail
cd "$(dirname "$0")/.."

pip_install() {
  if [[ -n "${WHEELS:-}" ]]; then
    python -m pip install -q --no-index --find-links "$WHEELS" "$@"
  else
    python -m pip install -q "$@"
  fi
}

pip_install -e .
if [[ " $* " != *" --dry-run "* ]]; then
  if ! python -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
    # jax 0.10.2's CUDA plugin, built for the CUDA major version the driver supports.
    cuda=$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9]*' | grep -o '[0-9]*$' || true)
    if [[ -z "$cuda" ]]; then
      echo "No NVIDIA driver found (nvidia-smi); use --dry-run on a CPU machine." >&2
      exit 1
    fi
    if (( cuda >= 13 )); then extra=cuda13; else extra=cuda12; fi
    pip_install "jax[$extra]==0.10.2"
  fi
  python -c 'import jax; print("JAX devices:", jax.devices())'
  python -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' || {
    echo "JAX does not see a GPU after the install." >&2; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec python -m benchmarks.gpu "$@"
