#!/usr/bin/env bash
# Rebuild .peers/ (git-ignored): the PyTorch peers of the training benchmark, unpacked for the lent GPU
# machine (Python 3.12, torch 2.11 + CUDA 13), which has no bitsandbytes or Unsloth and no network:
#   .peers/bnb      bitsandbytes 0.50.2, only its CUDA 13.0 library
#   .peers/unsloth  Unsloth + unsloth_zoo 2026.10.9 and the pure-Python packages they import that the
#                   machine lacks (trl, datasets, dill, multiprocess); the web UI ("studio") left out
# Carry it with the device call (carry [".peers"]) and put both on PYTHONPATH (docs/BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
W=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$W" bitsandbytes==0.50.2 unsloth==2026.10.9 unsloth_zoo==2026.10.9 \
  trl==1.15.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19
rm -rf .peers && mkdir -p .peers/bnb .peers/unsloth
unzip -q "$W"/bitsandbytes-*.whl -d .peers/bnb
find .peers/bnb/bitsandbytes -name 'libbitsandbytes_cuda*.so' ! -name 'libbitsandbytes_cuda130.so' -delete
for w in "$W"/unsloth-*.whl "$W"/unsloth_zoo-*.whl "$W"/trl-*.whl "$W"/datasets-*.whl "$W"/dill-*.whl \
         "$W"/multiprocess-*.whl; do
  unzip -q -o "$w" -d .peers/unsloth
done
rm -rf .peers/unsloth/studio .peers/unsloth/unsloth_cli "$W"
find .peers -type d \( -name tests -o -name __pycache__ \) -prune -exec rm -rf {} +
du -sh .peers/bnb .peers/unsloth
