#!/bin/bash
# One device run: CUDA check of the bundle's three jobs on its demo data, then issue-9 budget comparisons.
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3
R=$PWD; L=/tmp/logs; mkdir -p $L /tmp/res
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$R/.dev/shim
nvidia-smi -L
python3 -c "import torch,transformers,monai,ignite;print(torch.__version__,transformers.__version__,monai.__version__,ignite.__version__,torch.cuda.is_available())"
python3 - <<'PY'
import os, shutil
from safetensors.torch import load_file, save_file
os.makedirs("/tmp/enc", exist_ok=True)
for f in ("config.json", "provenance.json"):
    shutil.copy(".dev/enc/" + f, "/tmp/enc/" + f)
save_file({k: v.float().contiguous() for k, v in load_file(".dev/enc/model_fp16.safetensors").items()}, "/tmp/enc/model.safetensors")
PY
e1() {
  cd $R/bundle
  t=$(date +%s); timeout 420 python3 -m monai.bundle run --config_file configs/medsmile.json --encoder_weights /tmp/enc || echo E1-TRAIN-FAILED
  t1=$(date +%s); timeout 60 python3 -m monai.bundle run --config_file configs/inference.json || echo E1-INFER-FAILED
  t2=$(date +%s); timeout 60 python3 -m monai.bundle run --config_file configs/evaluate.json --pred_dir ./outputs/inference --truth_dir ./outputs/medsmile/demo_data/masks || echo E1-EVAL-FAILED
  t3=$(date +%s); echo "E1 times: train $((t1-t)) s, inference $((t2-t1)) s, evaluate $((t3-t2)) s"
  cp outputs/medsmile/summary.json /tmp/res/demo_summary.json; ls outputs/ outputs/inference | head; find outputs -name "*.json" -path "*eval*" -exec cp {} /tmp/res/ \;
}
bench() {  # profile dataset extra-args...
  p=$1; d=$2; shift 2
  timeout 470 python3 -m benchmarks.paper --profile $p --dataset $d --seeds 0 --variants medsmile supervised --data_root .dev/data --results_dir /tmp/res --set encoder_weights=/tmp/enc "$@"
}
e1 > $L/e1.log 2>&1 &
bench cpu-quick polyp > $L/quick_polyp.log 2>&1 &
bench cpu-quick isic2017 > $L/quick_isic.log 2>&1 &
bench paper polyp --pool_size 100 --test_size 50 --set encoder_weights=/tmp/enc num_rounds=1 epochs=20 > $L/paper_polyp.log 2>&1 &
bench paper isic2017 --pool_size 100 --test_size 50 --set encoder_weights=/tmp/enc num_rounds=1 epochs=20 > $L/paper_isic.log 2>&1 &
wait
nvidia-smi --query-gpu=memory.used --format=csv
cd $R; tar czf $OUT/results.tgz /tmp/res/*.json /tmp/res/*/*.json /tmp/res/*/*.md /tmp/logs /tmp/res/*/*/seed0/medsmile/log.txt 2>/dev/null
for f in $L/*.log; do echo "== $f"; grep -v "Loading weights\|nvImageCodec\|NvImgCodec" $f | tail -n 12; done
