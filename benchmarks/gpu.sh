#!/usr/bin/env bash
# `python -m benchmarks.run --suite gpu` on a fresh GPU machine: installs what the benchmark
# needs, checks that JAX sees the GPU, then runs the suite (MSConvLSTM-Att train slices/s in
# bfloat16, the paper's 500-epoch schedule estimated from them, one 240x240x155 case's latency).
#
#   bash benchmarks/gpu.sh                 # on a CUDA machine, from the repository root or not
#   bash benchmarks/gpu.sh --dry-run       # the same logic, tiny, on a CPU-only machine
#
# Extra arguments go to benchmarks.run (see `python -m benchmarks.run --help`). The benchmark
# needs JAX (with its CUDA plugin), Flax, optax, Orbax, ml-collections, nibabel and numpy; not
# TensorFlow. On a machine without a package index, set WHEELS=DIR to a folder of downloaded
# wheels of the missing packages (pinned in pyproject.toml): they are installed without their
# dependencies into a private folder put first on PYTHONPATH, and JAX with its CUDA plugin must
# be there already. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
# The project's runtime defaults (msatt_jax/runtime.py) are XLA:CPU settings, measured on CPU.
export MSATT_RUNTIME_DEFAULTS=${MSATT_RUNTIME_DEFAULTS:-none}
dry_run=0
[[ " $* " == *" --dry-run "* ]] && dry_run=1

if [[ -n "${WHEELS:-}" ]]; then
  site=${SITE:-/tmp/msatt-site}
  "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" \
    "$WHEELS"/*.whl
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  "$py" -m pip install -q -e .
  if (( ! dry_run )) && ! "$py" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' \
      2>/dev/null; then
    # jax's CUDA plugin, built for the CUDA major version the driver supports.
    cuda=$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9]*' | grep -o '[0-9]*$' || true)
    if [[ -z "$cuda" ]]; then
      echo "No NVIDIA driver found (nvidia-smi); use --dry-run on a CPU machine." >&2
      exit 1
    fi
    if (( cuda >= 13 )); then extra=cuda13; else extra=cuda12; fi
    jax_version=$("$py" -c 'import jax; print(jax.__version__)')
    "$py" -m pip install -q "jax[$extra]==$jax_version"
  fi
fi

"$py" - <<'PY'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "nibabel",
             "numpy"):
  module = importlib.import_module(name)
  print(f"{name} {getattr(module, '__version__', '?')}", end="; ")
import jax
print("\nJAX devices:", jax.devices())
PY
if (( ! dry_run )); then
  "$py" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' || {
    echo "JAX does not see a GPU." >&2; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$py" -m benchmarks.run --suite gpu "$@"
