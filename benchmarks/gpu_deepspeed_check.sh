#!/usr/bin/env bash
# GPU check of spear.train with DeepSpeed ZeRO-2 (and ZeRO-3) plus a freeze mask, a few steps each:
# prints throughput and peak memory, loads the exported HF dir, and checks that frozen layers are
# bit-identical to the base model and trained ones moved.
# Needs a CUDA GPU and `pip install 'spear-mm[deepspeed]'`. Usage:
#   benchmarks/gpu_deepspeed_check.sh [model_ref] [steps]      (default: smollm2_135m 20)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-smollm2_135m}
STEPS=${2:-20}
PY=${PY:-python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'" 
$PY -c "import deepspeed" || { echo "deepspeed missing: pip install 'spear-mm[deepspeed]'" >&2; exit 2; }
OUT=${OUT:-$(mktemp -d /tmp/spear-ds-check-XXXX)}
NL=$($PY -c "from spear.models import load_model, layer_map_for; m,_=load_model('$MODEL'); print(layer_map_for(m.config).num_layers)")
K=$(( NL >= 16 ? 8 : NL / 2 ))
for STAGE in zero2 zero3; do
  $PY -m spear.train trainer=deepspeed_$STAGE trainer.devices=1 trainer.max_steps=$STEPS \
      trainer.val_check_interval=$STEPS trainer.limit_val_batches=2 \
      model.ref=$MODEL freeze=last freeze.k=$K data.batch_size=8 data.block_size=512 \
      checkpoint.every_n_steps=$(( STEPS / 2 )) logger=csv trainer.enable_progress_bar=false \
      hydra.run.dir=$OUT/$STAGE
  $PY - "$OUT/$STAGE" "$MODEL" <<'PYEOF'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from spear.models import resolve_model_dir

run, ref = Path(sys.argv[1]), sys.argv[2]
s = json.loads((run / "train_summary.json").read_text())
print(json.dumps({k: s[k] for k in ("steps", "tokens_per_s", "peak_cuda_bytes", "peak_rss_bytes",
                                    "trainable_params", "frozen_params", "frozen_layers", "trainer")}))
model = AutoModelForCausalLM.from_pretrained(run / "model")  # loads as a plain HF dir
assert model.dtype == torch.float32, model.dtype
base_dir = resolve_model_dir(ref)
base = {}
for f in sorted(base_dir.glob("*.safetensors")):
    base.update(load_file(f))
trained = dict(model.state_dict())
frozen = set(s["frozen_parameter_names"])
same = [n for n in frozen if torch.equal(trained[n], base[n])]
moved = [n for n in base if n not in frozen and n.endswith("proj.weight") and not torch.equal(trained[n], base[n])]
print(f"{run.name}: {len(same)}/{len(frozen)} frozen tensors bit-identical, {len(moved)} trainable matrices moved")
assert len(same) == len(frozen) and moved, "freeze mask or export broken"
if model.config.tie_word_embeddings:
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
x = torch.randint(0, model.config.vocab_size, (1, 32))
print("loss on random tokens:", float(model(input_ids=x, labels=x).loss))
PYEOF
done
echo "deepspeed check OK: $OUT"
