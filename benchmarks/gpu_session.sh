#!/usr/bin/env bash
# One GPU session's measurements, as run on the lent GPU machine (see benchmarks/README.md):
#   bash benchmarks/gpu_session.sh multi    # >= 2 GPUs: FSDP LoRA, FSDP full FT on 1 and 2 GPUs, ZeRO-3 offload
#       (MODES picks others of bench_multi_gpu.py: train-lora-ddp[-compiled], train-lora-zero2, train-full-zero2;
#        REPEATS alternates the 1- and 2-GPU runs)
#   bash benchmarks/gpu_session.sh saves    # 2 GPUs: what FSDP LoRA and full fine-tuning save, and LoRA's resume
#   bash benchmarks/gpu_session.sh profile-ddp  # 2 GPUs: the recipe's LoRA step on 1 and 2 processes, DDP variants
#   bash benchmarks/gpu_session.sh profile  # 1 GPU: the recipe's LoRA step as is, with cuDNN attention, compiled
#   bash benchmarks/gpu_session.sh single   # 1 GPU: decoding and training against the official code
#   bash benchmarks/gpu_session.sh quant    # 1 GPU: QLoRA, 4-bit / 8-bit chat (benchmarks/bench_quant.py)
#   bash benchmarks/gpu_session.sh speed    # 1 GPU: issue #21's DPO step of the 6B shape, issue #23's `thuglm train`
#       rows beside the official code (b1 with checkpointing eager and compiled, b16 compiled, batch_size auto)
#       (PARTS picks and orders them, DEADLINE_S bounds the call, RUN_ID names the rows; the official side needs
#        .official and .whl_bench/official, else it is left out)
# Wheels the machine lacks are carried in .whl (datasets, trl, bitsandbytes), .whl_ds (DeepSpeed and its needs),
# .whl_fp8 (torchao, for `precision: fp8`); the
# official code and its transformers 4.34.1 wheels in .official and .whl_bench/official (git-ignored, never
# committed): `bash benchmarks/device_wheels.sh official` fetches them here first.
# Logs and result rows go to $OUT (or ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site .whl/*.whl \
    $( [ -d .whl_ds ] && ls .whl_ds/*.whl ) $( [ -d .whl_fp8 ] && ls .whl_fp8/*.whl ) || exit 1
export PYTHONPATH=$site:$PWD/src
commit=${COMMIT:-unknown}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

df -h /tmp "$PWD" | tail -n +2
build_6b_folder() {  # the 6B-shape folder every 1-GPU mode trains (built once a machine)
    python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from common import build_6b_folder; from pathlib import Path; build_6b_folder(Path('/tmp/thuglm-multi-gpu') / 'glm6b')"
}
install_official_site() {  # the official code's transformers 4.34.1 and its pins, apart from thuglm's
    mkdir -p /tmp/official_site && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/official_site .whl_bench/official/*.whl
}
seconds_left() {  # before the call's deadline (DEADLINE_S, 570 s from the script's start)
    echo $(( ${DEADLINE_S:-570} - SECONDS ))
}
capped() {  # the smaller of a part's own cap ($1) and the seconds left before the deadline ($limit)
    echo $(( limit < $1 ? limit : $1 ))
}

case "${1:-}" in
multi)
    python3 benchmarks/bench_multi_gpu.py --record "$OUT/rows_multi.jsonl" --commit "$commit" \
        --modes ${MODES:-train-lora-fsdp train-full-fsdp train-full-zero3-offload} --gpus ${GPUS:-1 2} \
        --repeats ${REPEATS:-1} 2>&1 \
        | tee "$OUT/multi.log" | grep -vE "^\s" | tail -40
    ;;
saves)
    python3 benchmarks/check_fsdp_saves.py --record "$OUT/rows_saves.jsonl" --commit "$commit" > "$OUT/saves.log" 2>&1
    tail -12 "$OUT/saves.log"
    ;;
profile-ddp)  # where the second GPU's ~29 ms a step go: the recipe's LoRA step on 1 and 2 processes, profiled
    # (Chrome traces of the first process to $OUT), then DDP and Trainer settings tried one at a time. VARIANTS picks
    # some ("1:ARGS;2:ARGS;..."), each started while DEADLINE_S (570) seconds are not up.
    build_6b_folder
    echo "6B folder ready at ${SECONDS} s"
    steps="max_steps=40 logging_steps=5"
    default="1:--trace $OUT/trace_1gpu.json.gz $steps;2:--trace $OUT/trace_2gpu.json.gz $steps;1:--no-profile $steps;\
2:--no-profile $steps;2:--no-profile $steps --ddp gradient_as_bucket_view=true;\
2:--no-profile $steps --ddp static_graph=true;2:--no-profile $steps --trainer average_tokens_across_devices=false;\
2:--no-profile $steps --ddp bucket_cap_mb=200;1:--no-profile $steps compile=true;2:--no-profile $steps compile=true"
    IFS=';' read -ra variants <<< "${VARIANTS:-$default}"
    export NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,GRAPH
    for variant in "${variants[@]}"; do
        limit=$(seconds_left); (( limit > 200 )) && limit=200
        if (( limit < 45 )); then echo "skipped (deadline): $variant"; continue; fi
        gpus=${variant%%:*}; args=${variant#*:}
        echo "== $gpus GPU(s): $args" | tee -a "$OUT/ddp.log"
        if [ "$gpus" = 1 ]; then
            CUDA_VISIBLE_DEVICES=0 timeout $limit python3 benchmarks/profile_recipe.py $args >> "$OUT/ddp.log" 2>&1
        else
            CUDA_VISIBLE_DEVICES=0,1 timeout $limit python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
                benchmarks/profile_recipe.py $args >> "$OUT/ddp.log" 2>&1
        fi
        grep -hE "^profile of|^run:" "$OUT/ddp.log" | tail -n $([[ $args == *--trace* ]] && echo 2 || echo 1)
        echo "   at ${SECONDS} s"
    done
    grep -m4 -E " via (P2P|SHM|NET|NVLS)" "$OUT/ddp.log"
    ;;
profile)
    for variant in "" --sdpa-with-cudnn compile=true; do
        echo "== profile_recipe.py $variant"
        CUDA_VISIBLE_DEVICES=0 timeout ${PROFILE_TIMEOUT_S:-150} python3 benchmarks/profile_recipe.py $variant \
            > "$OUT/profile_lora${variant:+_${variant//[^a-z]/}}.log" 2>&1
        grep -hE "^profile of|^run:" "$OUT"/profile_lora${variant:+_${variant//[^a-z]/}}.log
    done
    ;;
single)
    # The recipe on GPU 1 (full fine-tuning as on a 24 GB card, then LoRA, each profiled), meanwhile the
    # against-the-official benchmarks on GPU 0.
    (export CUDA_VISIBLE_DEVICES=1
     timeout 200 python3 benchmarks/profile_recipe.py method=full optimizer=adafactor optimizer_in_backward=true \
         gradient_checkpointing=true batch_size=1 > "$OUT/profile_full.log" 2>&1
     timeout 150 python3 benchmarks/profile_recipe.py > "$OUT/profile_lora.log" 2>&1) &
    export CUDA_VISIBLE_DEVICES=0
    install_official_site
    python3 benchmarks/bench_decode.py --record "$OUT/rows_decode.jsonl" --commit "$commit" --no-numerics \
        --grid '[[1, 32, 128]]' --variants dynamic,static-compiled,static-compiled-late-stop --repeats 5 \
        --official-code .official --official-site /tmp/official_site --work-dir /tmp > "$OUT/decode.log" 2>&1
    grep -A12 "^impl" "$OUT/decode.log"
    python3 benchmarks/bench_train.py --record "$OUT/rows_train.jsonl" --commit "$commit" \
        --official-site /tmp/official_site --official-dir .official --modes lora,full --seconds 6 \
        --only "${TRAIN_PLANS:?TRAIN_PLANS: a JSON list of plans}" > "$OUT/train.log" 2>&1
    grep -A20 "^impl " "$OUT/train.log" | tail -20
    wait
    grep -hE "^profile of|^run:|Error" "$OUT/profile_full.log" "$OUT/profile_lora.log" | tail -8
    ;;
quant)
    # 1 GPU: the small-GPU goals (benchmarks/bench_quant.py): QLoRA against bf16 LoRA through thuglm train (b1, seq
    # 2048, checkpointing), int4/int8/bf16 chat decoding against the official bf16 code, 4-/8-bit logits error.
    # Needs the bitsandbytes wheel in .whl (pip download bitsandbytes==0.50.2 --no-deps -d .whl).
    official=()
    if [ -d .official ] && [ -d .whl_bench/official ]; then  # the official bf16 code to compare decoding with
        install_official_site
        official=(--official-code .official --official-site /tmp/official_site)
    fi
    python3 benchmarks/bench_quant.py --record "$OUT/rows_quant.jsonl" --commit "$commit" "${official[@]}" \
        --work-dir /tmp/bench_quant ${QUANT_ARGS:-} > "$OUT/quant.log" 2>&1
    grep '^{"run_id"' "$OUT/quant.log" | cut -c1-400
    ;;
speed)
    # Parts in the order given (PARTS; default: all, most wanted first), each under its own cap and the call's
    # DEADLINE_S (570 s): one that cannot start with 45 s left is skipped and said so, for a second call to pick up.
    run_id=${RUN_ID:-speed-$(date -u +%Y%m%dT%H%M%S)}
    rows="$OUT/0-rows_speed.jsonl"  # first by name: only the first 8 files under $OUT come back
    folder_ready=false  # the 6B folder is built before the first part that trains it, outside that part's cap: a
                        # short call of parts that need none (the kernels' check, the official code) spends no time on it
    # `thuglm train` itself, each run its median step after the third (profile_recipe.py --no-profile).
    curve_run="data.format=alpaca packing=true batch_size=16 max_steps=200 compile=true learning_rate=2e-4 \
warmup_ratio=0 lora.dropout=0"
    alpaca_file=$PWD/src/thuglm/resources/alpaca/instructions.json  # the bundled SFT rows
    alpaca="data.files=$alpaca_file data.format=alpaca"
    curve="data.files=$alpaca_file $curve_run"
    python3 benchmarks/make_sft_stream.py /tmp/sft_stream.json
    sft_curve="data.files=/tmp/sft_stream.json $curve_run"
    tutorial="lora.target_modules=[dense,dense_h_to_4h,dense_4h_to_h] lora.dropout=0.1"
    declare -A recipe=(
        [lora-bf16-b1-ckpt]="batch_size=1 gradient_checkpointing=true max_steps=40"
        [lora-bf16-b1-ckpt-compiled]="batch_size=1 gradient_checkpointing=true compile=true max_steps=60"
        # the same with the compiled parts' kernels replayed as CUDA graphs (inductor's triton.cudagraphs, what
        # torch.compile's mode reduce-overhead sets): the host-bound b1 step without its launches, if cudagraph trees
        # take the checkpoint's recomputation (never tried: it may fall back to launches, or fail)
        [lora-bf16-b1-ckpt-compiled-cudagraphs]="batch_size=1 gradient_checkpointing=true compile=true max_steps=60 \
--inductor triton.cudagraphs=true"
        [lora-bf16-b16-compiled]="batch_size=16 compile=true max_steps=30"
        # issue #23's long rows through thuglm train (goal: 16,384+ tokens a row under 24 GiB), past ChatGLM-6B's
        # 2,048 positions with rope_scaling (position interpolation); the benchmark alone had measured them before
        [lora-bf16-b1-ckpt-s16384]="batch_size=1 gradient_checkpointing=true max_seq_len=16384 rope_scaling=linear \
max_steps=10"
        [lora-bf16-b1-ckpt-s20480]="batch_size=1 gradient_checkpointing=true max_seq_len=20480 rope_scaling=linear \
max_steps=10"
        # the same with flex_attention (masked blocks skipped: 1.42x SDPA at 16,384 in bench_train.py, and less
        # memory); if it pays through the CLI too, attn_implementation auto takes it for rows this long
        [lora-bf16-b1-ckpt-s16384-flex]="batch_size=1 gradient_checkpointing=true max_seq_len=16384 \
rope_scaling=linear max_steps=10 attn_implementation=flex_attention"
        [lora-bf16-b1-ckpt-s20480-flex]="batch_size=1 gradient_checkpointing=true max_seq_len=20480 \
rope_scaling=linear max_steps=10 attn_implementation=flex_attention"
        [lora-bf16-auto]="batch_size=auto global_batch_size=32 compile=true max_steps=20"
        # what the b1 step's time and memory are made of: the loss's chunk size, LoRA's dropout
        [lora-bf16-b1-ckpt-chunk64]="batch_size=1 gradient_checkpointing=true max_steps=40 --loss-chunk-mib 64"
        [lora-bf16-b1-ckpt-chunk256]="batch_size=1 gradient_checkpointing=true max_steps=40 --loss-chunk-mib 256"
        [lora-bf16-b1-ckpt-loss-eager]="batch_size=1 gradient_checkpointing=true max_steps=40 --loss-eager"
        [lora-bf16-b1-ckpt-dropout0]="batch_size=1 gradient_checkpointing=true max_steps=40 lora.dropout=0"
        # the large-batch step: the benchmark's best batch, and LoRA's dropout there
        [lora-bf16-b24-compiled]="batch_size=24 compile=true max_steps=30"
        [lora-bf16-b16-compiled-dropout0]="batch_size=16 compile=true max_steps=30 lora.dropout=0"
        # batches padded to their longest row (as before), and without the epoch's last, shorter batch
        [lora-bf16-b16-compiled-ragged]="batch_size=16 compile=true max_steps=30 --pad-to-longest"
        [lora-bf16-b16-compiled-droplast]="batch_size=16 compile=true max_steps=30 --trainer dataloader_drop_last=true"
        # the official side's adapters (the tutorial's three linears, dropout 0.1): the same work on both sides
        [lora-bf16-b16-compiled-tutorial]="batch_size=16 compile=true max_steps=30 $tutorial"
        [lora-bf16-b24-compiled-tutorial]="batch_size=24 compile=true max_steps=30 $tutorial"
        # the attention kernel at large batches: flex_attention (compiled, masked blocks skipped; what
        # attn_implementation auto takes here since run speed-20261207T130800), SDPA's memory-efficient kernel (14 %
        # of the b16 step's GPU time in the H100 profile) and its cuDNN kernel
        [lora-bf16-b16-compiled-flex]="batch_size=16 compile=true max_steps=30 attn_implementation=flex_attention"
        [lora-bf16-b16-compiled-sdpa]="batch_size=16 compile=true max_steps=30 attn_implementation=sdpa"
        [lora-bf16-b16-compiled-cudnn]="batch_size=16 compile=true max_steps=30 attn_implementation=sdpa --sdpa-with-cudnn"
        [lora-bf16-b24-compiled-flex]="batch_size=24 compile=true max_steps=30 attn_implementation=flex_attention"
        # Inductor's own tuning of the compiled layers: Triton matmul templates tried beside cuBLAS (with the bias,
        # GELU and LoRA's sum fused into their epilogues), and the fused pointwise kernels' launch settings searched
        [lora-bf16-b16-compiled-autotune]="batch_size=16 compile=true max_steps=30 --inductor max_autotune_gemm=true"
        [lora-bf16-b16-compiled-coordesc]="batch_size=16 compile=true max_steps=30 \
--inductor coordinate_descent_tuning=true"
        # unpacked SFT rows (alpaca's default: each batch padded to its longest row, a new length each batch), as auto
        # chooses (SDPA since run speed-20261207T150313) and with each kernel named
        [lora-bf16-b16-compiled-alpaca-unpacked]="batch_size=16 compile=true max_steps=40 $alpaca packing=false"
        [lora-bf16-b16-compiled-alpaca-unpacked-sdpa]="batch_size=16 compile=true max_steps=40 $alpaca packing=false \
attn_implementation=sdpa"
        [lora-bf16-b16-compiled-alpaca-unpacked-flex]="batch_size=16 compile=true max_steps=40 $alpaca packing=false \
attn_implementation=flex_attention"
        # SFT rows (the bundled alpaca instructions packed, prompts not counted)
        [lora-bf16-b16-compiled-alpaca]="batch_size=16 compile=true max_steps=30 $alpaca packing=true"
        # issue #23's FP8 speed: the b16 step with the frozen base's matmuls in FP8, with either attention kernel
        [lora-fp8-b16-compiled]="batch_size=16 compile=true max_steps=30 precision=fp8"
        [lora-fp8-b16-compiled-flex]="batch_size=16 compile=true max_steps=30 precision=fp8 \
attn_implementation=flex_attention"
        [lora-fp8-b16-compiled-sdpa]="batch_size=16 compile=true max_steps=30 precision=fp8 attn_implementation=sdpa"
        # thuglm's default logging (a log, and its host-device syncs, every 10 steps instead of every step: what users
        # run; the other parts log every step), and without the one sync a step left then (on_nan's check)
        [lora-bf16-b16-compiled-log10]="batch_size=16 compile=true max_steps=50 logging_steps=10"
        [lora-bf16-b16-compiled-log10-nocheck]="batch_size=16 compile=true max_steps=50 logging_steps=10 \
--nan-check-off"
        [lora-fp8-b16-compiled-log10]="batch_size=16 compile=true max_steps=50 logging_steps=10 precision=fp8"
        [lora-bf16-b1-ckpt-log10]="batch_size=1 gradient_checkpointing=true max_steps=60 logging_steps=10"
        [lora-bf16-b1-ckpt-log10-nocheck]="batch_size=1 gradient_checkpointing=true max_steps=60 logging_steps=10 \
--nan-check-off"
        # LoRA's dropout drawn inside the adapters' products (lora.fused_dropout) instead of as peft draws it (a dropped
        # copy of each adapted input, kept for the backward); run speed-20261207T172652 ran the fused one as the
        # default under the names above and peft's as `-unfused`
        [lora-bf16-b16-compiled-log10-fused]="batch_size=16 compile=true max_steps=50 logging_steps=10 \
lora.fused_dropout=true"
        [lora-bf16-b1-ckpt-log10-fused]="batch_size=1 gradient_checkpointing=true max_steps=60 logging_steps=10 \
lora.fused_dropout=true"
        [lora-bf16-b16-compiled-alpaca-unpacked-fused]="batch_size=16 compile=true max_steps=40 $alpaca packing=false \
lora.fused_dropout=true"
        # issue #23's FP8 loss goal: 200 steps of one fixed SFT stream (the bundled instructions packed to 512 tokens,
        # a seeded order), bf16 against fp8; LoRA's dropout off in both, so that only the arithmetic differs
        # (needs .whl_fp8; each ~190 s on an H100)
        [fp8-curve-bf16]="$curve precision=bf16 attn_implementation=sdpa"
        [fp8-curve-fp8]="$curve precision=fp8 attn_implementation=sdpa"
        # the same stream in bf16 with another attention kernel (flex_attention: the same arithmetic, other rounding):
        # how far two bf16 curves drift apart on this memorising stream, the floor the FP8 comparison is read against
        [fp8-curve-bf16-flex]="$curve precision=bf16 attn_implementation=flex_attention"
        # the same comparison on a stream that is not memorised (make_sft_stream.py: 60,000 distinct rows learnt by
        # rule, ~4,000 packed rows, none seen twice in 200 steps of 16), with its own bf16 floor (the other kernel)
        [sft-curve-bf16]="$sft_curve precision=bf16"
        [sft-curve-fp8]="$sft_curve precision=fp8"
        [sft-curve-bf16-sdpa]="$sft_curve precision=bf16 attn_implementation=sdpa")
    declare -A cap=([fp8-curve-bf16]=300 [fp8-curve-fp8]=300 [fp8-curve-bf16-flex]=300 [sft-curve-bf16]=300
                    [sft-curve-fp8]=300 [sft-curve-bf16-sdpa]=300 [lora-bf16-b16-compiled-autotune]=320)
    for part in ${PARTS:-dpo lora-bf16-b1-ckpt official lora-bf16-b1-ckpt-compiled lora-bf16-b16-compiled lora-bf16-auto}; do
        if [[ $part != lora-dropout-* && $part != official ]] && ! $folder_ready && (( $(seconds_left) >= 45 ))
        then
            if build_6b_folder; then folder_ready=true; echo "6B folder ready at ${SECONDS} s"
            else echo "6B folder not built (its error above), at ${SECONDS} s"; fi
        fi
        limit=$(seconds_left)  # after the build, whose time counts against the part it delays
        if (( limit < 45 )); then echo "skipped (deadline): $part"; continue; fi
        echo "== $part at ${SECONDS} s"
        case "$part" in
        dpo)  # issue #21's DPO step of the 6B shape
            timeout $(capped 200) python3 benchmarks/bench_dpo.py --record "$rows" \
                --commit "$commit" --steps 10 --model-folder /tmp/thuglm-multi-gpu/glm6b > "$OUT/dpo.log" 2>&1
            grep -E "^ROW|Error" "$OUT/dpo.log" | cut -c1-400
            ;;
        memory-b1)  # what is alive at the b1-with-checkpointing step's peak (memory_peak.py)
            timeout $(capped 150) python3 benchmarks/profile_recipe.py --no-profile \
                --memory-snapshot /tmp/memory-b1-ckpt.pickle precision=bf16 batch_size=1 \
                gradient_checkpointing=true max_steps=5 > "$OUT/memory-b1.log" 2>&1
            grep -A34 "^memory snapshot" "$OUT/memory-b1.log" || tail -5 "$OUT/memory-b1.log"
            ;;
        profile-b1)  # where the b1-with-checkpointing step's time goes (torch.profiler)
            timeout $(capped 150) python3 benchmarks/profile_recipe.py precision=bf16 \
                batch_size=1 gradient_checkpointing=true > "$OUT/profile-b1.log" 2>&1
            grep -A40 "^profile of" "$OUT/profile-b1.log" | cut -c1-200
            ;;
        profile-b16-compiled)  # where the large-batch compiled step's time goes
            timeout $(capped 200) python3 benchmarks/profile_recipe.py precision=bf16 \
                batch_size=16 compile=true > "$OUT/profile-b16-compiled.log" 2>&1
            grep -A40 "^profile of" "$OUT/profile-b16-compiled.log" | cut -c1-200
            ;;
        lora-dropout-check)  # the fused dropout's kernels against the mask applied by hand, and each adapter's time
            timeout $(capped 150) python3 benchmarks/check_lora_dropout.py > "$OUT/lora-dropout-check.log" 2>&1
            grep -E "^check|^adapter|^lora|Error" "$OUT/lora-dropout-check.log" | cut -c1-400
            ;;
        lora-dropout-sweep)  # the same, then every launch setting of its three kernels at b16 (the Launch to ship;
                             # ~80 Triton builds: minutes)
            timeout $(capped 360) python3 benchmarks/check_lora_dropout.py --sweep > "$OUT/lora-dropout-sweep.log" 2>&1
            grep -E "^check|^adapter|^lora|^sweep .*(default|best)|Error" "$OUT/lora-dropout-sweep.log" | cut -c1-400
            ;;
        official)  # the official code's b1-with-checkpointing and b8 rows
            if [ ! -d .official ] || [ ! -d .whl_bench/official ]; then echo "skipped: no .official"; continue; fi
            install_official_site
            timeout $(capped 240) python3 benchmarks/bench_train.py --impl official \
                --record "$rows" --commit "$commit" --run-id "$run_id" --official-site /tmp/official_site \
                --official-dir .official --modes lora --seconds 8 \
                --only '[{"mode": "lora", "seq": 512, "batch": 1, "grad_ckpt": true},
                         {"mode": "lora", "seq": 512, "batch": 8, "grad_ckpt": false}]' > "$OUT/official.log" 2>&1
            grep -A4 "^impl " "$OUT/official.log" | tail -4
            ;;
        *)
            if [ -z "${recipe[$part]:-}" ]; then echo "unknown part: $part" >&2; continue; fi
            timeout $(capped "${cap[$part]:-${SPEED_TIMEOUT_S:-200}}") python3 benchmarks/profile_recipe.py --no-profile \
                --record "$rows" --run-id "$run_id" --commit "$commit" --mode "$part" precision=bf16 \
                ${recipe[$part]} > "$OUT/$part.log" 2>&1
            grep -hE "^run:|Error|error" "$OUT/$part.log" | tail -3
            ;;
        esac
    done
    echo "done at ${SECONDS} s"
    # The rows in the output too: only the first few files under $OUT come back from the lent machine.
    if [ -f "$rows" ]; then python3 -c "import json, sys
for row in map(json.loads, open(sys.argv[1])):
    print(json.dumps({key: row.get(key) for key in ('run_id', 'device', 'impl', 'mode', 'batch', 'grad_ckpt', 'compile',
                                                   'tokens_per_s', 'run_tokens_per_s', 'peak_gib', 'status')}))" "$rows"
    fi
    ;;
*)
    echo "usage: $0 multi|saves|profile|profile-ddp|single|quant|speed" >&2
    exit 2
    ;;
esac
