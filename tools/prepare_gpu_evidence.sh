#!/usr/bin/env bash
# Fill .gpu-data/ (git-ignored) with what benchmarks/gpu_evidence.py needs on a GPU machine without a
# network: the data subset it reads through NBLIB_MIRROR and the wheels such a machine may lack.
#   NBLIB_MIRROR=../shared/data tools/prepare_gpu_evidence.sh      # PY_VERSION=3.11 for another Python
# Then run there with carry=[".gpu-data"] (see the docstring of benchmarks/gpu_evidence.py).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NBLIB_MIRROR:?set NBLIB_MIRROR to the offline data folder (e.g. ../shared/data)}"
PY_VERSION="${PY_VERSION:-3.12}"
PIP="${PIP:-.venv/bin/pip}"
OUT=.gpu-data
mkdir -p "$OUT/tokenizers" "$OUT/gutenberg" "$OUT/qa" "$OUT/wheels"
for f in tokenizers/gpt2.tiktoken gutenberg/pg55752.txt qa/alpaca_5000.json; do
  [ -f "$NBLIB_MIRROR/$f" ] || { echo "missing $NBLIB_MIRROR/$f: the mirror must hold it (see shared/data/README.md)" >&2; exit 1; }
  install -m 0644 "$NBLIB_MIRROR/$f" "$OUT/$f"
done
# bitsandbytes is pure Python + CUDA libraries (py3-none); tiktoken and regex are built per Python version.
"$PIP" download -q --no-deps --only-binary=:all: -d "$OUT/wheels" --python-version "$PY_VERSION" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 bitsandbytes==0.50.2 tiktoken==0.14.0 regex
du -sh "$OUT"
ls -l "$OUT"/*/
