#!/usr/bin/env bash
# Everything the GPU suite carries to a machine without network, prepared where pip works (run from anywhere):
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]    # default 3.12 (the GPU image's python3)
#
# .whl/       the wheels the GPU image lacks (it has torch, transformers, peft, accelerate, numpy, pillow, pyyaml,
#             safetensors, tokenizers, tqdm, huggingface-hub): bitsandbytes with only the CUDA library that torch's CUDA needs
#             (the full wheel ships one per CUDA version and is too big to carry), pydantic and its needs, and
#             transformers / peft at the versions CI tests with (+ the regex and typing-extensions they need),
#             so the GPU run executes the same code.
# .gpu_data/  the first 64 train and 8 test rows of VQA-RAD with their images (from ../shared/data/vqa_rad).
# Both folders are git-ignored; the whole working tree that travels must stay under 64 MiB (printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
CUDA_LIB=${CUDA_LIB:-cuda130}   # torch 2.11+cu130 on the GPU image; cuda126 / cuda128 for other torch builds
PIP=${PIP:-python3 -m pip}
rm -rf .whl && mkdir -p .whl
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  bitsandbytes==0.50.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 regex==2026.11.19 transformers==5.24.0 peft==0.21.2
# Keep only libbitsandbytes_${CUDA_LIB}.so and the CPU one in the bitsandbytes wheel (it ships one per CUDA, ROCm and
# XPU version); the RECORD is rewritten so the wheel stays valid.
python3 - "$CUDA_LIB" <<'PY'
import base64, hashlib, pathlib, sys, zipfile
keep = sys.argv[1]
(src,) = pathlib.Path(".whl").glob("bitsandbytes-*.whl")
tmp = src.with_suffix(".tmp")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    names = [n for n in zin.namelist()
             if not (n.endswith(".so") and "/libbitsandbytes_" in n and not n.endswith(("_cpu.so", f"_{keep}.so")))]
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    lines = []
    for n in names:
        if n == record:
            continue
        data = zin.read(n)
        zout.writestr(zin.getinfo(n), data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{n},sha256={digest},{len(data)}")
    zout.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")
    kept = [n for n in names if n.endswith(".so")]
tmp.replace(src)
print("bitsandbytes libraries kept:", ", ".join(kept))
PY
if [ -d ../shared/data/vqa_rad ]; then
  rm -rf .gpu_data && python3 benchmarks/vqa_rad_subset.py ../shared/data/vqa_rad .gpu_data/vqa_rad
fi
ls -la .whl
du -sh .whl .gpu_data 2>/dev/null || true
echo "travelling tree (tracked + untracked-not-ignored + .whl + .gpu_data):"
{ git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1; du -cb .whl .gpu_data | tail -1; } \
  | awk '{s += $1} END {printf "%.1f MiB (limit 64 MiB)\n", s / 2^20}'
