#!/usr/bin/env bash
# What a GPU session carries to the lent machine, fetched here (never committed; .gitignore keeps the folders out):
#   bash benchmarks/device_wheels.sh            # .whl: the packages the machine's image lacks (datasets, trl, ...)
#   bash benchmarks/device_wheels.sh official   # also .official + .whl_bench/official: the official code's side
# The machine runs Python 3.12 on x86-64 (see the device tool's README); versions follow constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -E "^$1==" constraints.txt | head -1; }
download() {  # download FOLDER SPEC...: binary wheels for the machine's Python, no dependencies
    local folder=$1; shift
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$folder" "$@"
}
# The image has torch, transformers, peft, accelerate, pyarrow, pandas, xxhash and fsspec; datasets also needs dill
# and multiprocess, `task: dpo` needs trl, QLoRA / 4-bit chat bitsandbytes, precision fp8 torchao.
download .whl "$(pin datasets)" dill==0.4.1 multiprocess==0.70.19 "$(pin trl)" "$(pin bitsandbytes)"
download .whl_fp8 "$(pin torchao)"
if [ "${1:-}" = official ]; then
    # transformers 4.34.1 (the last the official modeling code runs under unpatched) and what it pins.
    download .whl_bench/official transformers==4.34.1 tokenizers==0.14.1 huggingface_hub==0.17.3 peft==0.5.0
    if [ ! -f .official/modeling_chatglm.py ]; then
        echo "also copy modeling_chatglm.py, configuration_chatglm.py (and quantization.py) of THUDM/chatglm-6b" \
             "(the search tool's fetch of github:greensheng/chatglm-6b) into .official/" >&2
    fi
fi
ls .whl .whl_fp8 ${1:+.whl_bench/official}
