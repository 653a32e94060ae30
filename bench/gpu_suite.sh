#!/usr/bin/env bash
# One command for a lent H100/H200: GPU tests, kernel benchmarks, end-to-end throughput.
# Installs nothing and reaches no network: it uses the Python environment already there
# (.venv if present, else $PYTHON, else python3) and writes results under bench/results/.
#
#   bash bench/gpu_suite.sh                 # everything
#   SKIP_8B=1 bash bench/gpu_suite.sh       # without the Llama-3-8B-shaped throughput runs
#   SKIP_TESTS=1 SKIP_KERNELS=1 ...         # without the GPU tests / the kernel benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
RESULTS=${RESULTS:-bench/results}
mkdir -p "$RESULTS"
status=0
step() { echo; echo "=== $*"; "$@" || { echo "!!! failed: $*"; status=1; }; }

nvidia-smi -L || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

# 1. The @gpu tests: compiled Triton kernels on CUDA (bf16 and fp32) against the twins.
[ -z "${SKIP_TESTS:-}" ] && step "$PY" -m pytest -q -m gpu tests/

# 2. Kernel benchmarks (do_bench medians, bandwidth vs a measured device copy).
[ -z "${SKIP_KERNELS:-}" ] && step "$PY" bench/kernels.py --out "$RESULTS/kernels.json"

# 3. End-to-end throughput on the embedded default model (if its package is installed), both kernel paths.
if "$PY" -c "from speedx.models.default_model import default_model_path; default_model_path()" 2>/dev/null; then
    step env SPEEDX_KERNELS=auto "$PY" bench/throughput.py --out "$RESULTS/throughput_gpu_default_triton.json"
    step env SPEEDX_KERNELS=torch "$PY" bench/throughput.py --skip-hf --out "$RESULTS/throughput_gpu_default_torch.json"
fi

# 4. A randomly initialised Llama-3-8B-shaped checkpoint (bench/throughput.py needs a model directory).
#    Random bf16 weights (16 GB, written once), config.json with the 8B shape, and a tiny byte-level
#    BPE tokenizer trained in place (nothing offline to copy), its ids padded up to vocab 128256 by
#    the config; the run ignores EOS, so the text is noise but the compute is the 8B model's.
MODEL_DIR=${MODEL_DIR:-/tmp/speedx-llama3-8b-random}
if [ -z "${SKIP_8B:-}" ]; then
    if [ ! -f "$MODEL_DIR/config.json" ]; then
        step "$PY" - "$MODEL_DIR" <<'EOF'
import json, sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
text = "the quick brown fox jumps over the lazy dog while a robot paints the sky in bright colors " * 50
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator([text], trainers.BpeTrainer(
    vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<s>assistant:{% endif %}")
fast.save_pretrained(out)

c = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
         rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False,
         bos_token_id=1, eos_token_id=2, hidden_act="silu", torch_dtype="bfloat16")
(out / "config.json").write_text(json.dumps(c, indent=2))
h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * 128

def rand(*shape):  # made on the GPU (fast), std 0.02 like HF's init
    return (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02).cpu()

save_file({"model.embed_tokens.weight": rand(c["vocab_size"], h), "lm_head.weight": rand(c["vocab_size"], h),
           "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}, str(out / "model-00.safetensors"))
for layer in range(c["num_hidden_layers"]):
    p = f"model.layers.{layer}."
    save_file({
        p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
        p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
        p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h), p + "mlp.down_proj.weight": rand(h, i),
        p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
    }, str(out / f"model-{layer + 1:02d}.safetensors"))
print("wrote", out)
EOF
    fi
    M8B="$PY bench/throughput.py --model $MODEL_DIR --repeats 1 --max-num-batched-tokens 8192"
    # nano-vllm's workload: 1,000 prompts, input and output lengths drawn from 100-1024, EOS ignored.
    step env SPEEDX_KERNELS=auto $M8B --workload random --num-prompts 1000 --out "$RESULTS/throughput_8b_random.json"
    # The fixed 1024-in / 1024-out grid, with transformers.generate timed on 16 of the prompts.
    step env SPEEDX_KERNELS=auto $M8B --workload fixed --num-prompts 256 --prompt-len 1024 --output-len 1024 \
        --hf-num-prompts 16 --out "$RESULTS/throughput_8b_1024x1024.json"
    # What CUDA graphs and the Triton kernels buy: the same short run eager, and on the PyTorch twins.
    for variant in "auto --enforce-eager" "torch --enforce-eager" "auto"; do
        set -- $variant
        step env SPEEDX_KERNELS=$1 $M8B --workload fixed --num-prompts 64 --prompt-len 256 --output-len 256 --skip-hf \
            ${2:-} --out "$RESULTS/throughput_8b_short_$1${2:+_eager}.json"
    done
fi

echo; echo "results in $RESULTS/ (exit status $status)"
exit $status
