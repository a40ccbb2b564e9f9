#!/usr/bin/env bash
# The GPU check: one prepared script, run on a machine with one CUDA GPU (never needed by the tests).
#
#   OUT=/some/dir ./scripts/gpu_check.sh          # writes gpu_check.log (and the bench tables) under $OUT
#
# 1. the machine: torch, transformers, the GPU;
# 2. the MoE layer on the GPU: the fast (grouped) expert path against the eager path, forward and
#    gradients, and the training-step benchmark (issue 11) at the issue's shapes and at a larger one;
# 3. recipes on the GPU in bf16 on the bundled suite base (upit_lora, upit_ffn, nvidia_granular; tiny
#    sizes): each runs end to end or its failure is recorded, and the exported model's logits are
#    compared with the same config run on the CPU in fp32.
# Each part has its own time limit so one failure cannot eat the others' time. Uses the machine's
# own torch/transformers; packages it lacks (pydantic) may be carried as wheels in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
LOG="$OUT/gpu_check.log"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
part() { echo; echo "=== $1 ($(date +%T))"; }
{
part "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'gpu', torch.cuda.get_device_name(0))"

part "MoE layer: fast path vs eager on cuda (forward and gradients)"
UPCYCLE_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_moe_fast.py 2>&1 | tail -15

part "MoE training-step benchmark, issue shapes, bf16"
timeout 150 python3 bench/bench_moe_train.py --device cuda --dtype bf16 --repeats 5 --steps 5 2>&1 | tee "$OUT/bench_moe_bf16_small.txt"
part "MoE training-step benchmark, larger shapes (hidden 1024, intermediate 2816, seq 1024, batch 8), bf16"
timeout 150 python3 bench/bench_moe_train.py --device cuda --dtype bf16 --hidden 1024 --intermediate 2816 --heads 8 \
    --seq 1024 --batch 8 --repeats 5 --steps 5 --vocab 8192 2>&1 | tee "$OUT/bench_moe_bf16_large.txt"

part "recipes on cuda (bf16, precision auto) and on this machine's cpu (fp32), same config, compared"
# SmolLM2 cannot be carried to the GPU machine (its GGUF is over the 64 MiB a run may carry), so the
# recipes run on the bundled suite base; train.precision=auto means bf16 on a bf16-capable GPU, fp32 on CPU.
# The suite's code domain runs model-written code: in the sandbox if bwrap works on that machine; it
# is a disposable machine scoring a toy model, so without one the check opts in (and says so).
python3 -c "from upcycle.eval.sandbox import isolation; import sys; i = isolation(); print('sandbox:', i); sys.exit(isinstance(i, str))" \
    || { export UPCYCLE_ALLOW_UNSAFE_CODE_EVAL=1; echo "sandbox: none here, code scored unsandboxed (disposable machine)"; }
tiny="data.suite.train_per_domain=12 data.suite.test_per_domain=4 eval_max_items=4 --quiet"
for recipe in upit_lora upit_ffn nvidia_granular; do
    echo "--- $recipe on cpu (fp32)"
    CUDA_VISIBLE_DEVICES= timeout 240 python3 -m upcycle.cli run "recipes/$recipe.yaml" out="$OUT/runs/$recipe-cpu" $tiny 2>&1 | tail -4
    echo "--- $recipe on cuda (bf16)"
    timeout 200 python3 -m upcycle.cli run "recipes/$recipe.yaml" out="$OUT/runs/$recipe-cuda" $tiny \
        ${GPU_CHECK_CUDA_OVERRIDES:-} 2>&1 | tail -4
    echo "--- $recipe: exported logits and scores, cuda bf16 vs cpu fp32"
    timeout 60 python3 bench/gpu_compare.py "$OUT/runs/$recipe-cpu" "$OUT/runs/$recipe-cuda"
    echo "compare exit $?"
done
part "done"
} 2>&1 | tee "$LOG"
