#!/bin/bash
# Second device run: the paper-size budget (518 px, full-size decoder, 10 epochs, 1 round) on polyp seed 0,
# one-label run and supervised ceiling side by side.
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
R=$PWD; L=/tmp/logs; mkdir -p $L /tmp/res
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$R/.dev/shim
python3 - <<'PY'
import os, shutil
from safetensors.torch import load_file, save_file
os.makedirs("/tmp/enc", exist_ok=True)
for f in ("config.json", "provenance.json"):
    shutil.copy(".dev/enc/" + f, "/tmp/enc/" + f)
save_file({k: v.float().contiguous() for k, v in load_file(".dev/enc/model_fp16.safetensors").items()}, "/tmp/enc/model.safetensors")
PY
b() { timeout 205 python3 -m benchmarks.paper --profile paper --pool_size 100 --test_size 50 --dataset polyp --seeds 0 --data_root .dev/data --results_dir /tmp/res$1 --variants $1 --set encoder_weights=/tmp/enc num_rounds=1 epochs=10 export_torchscript=false; }
b medsmile > $L/medsmile.log 2>&1 &
b supervised > $L/supervised.log 2>&1 &
wait
for f in $L/*.log; do echo "== $f"; grep "^{\|Error\|Killed\|Engine run finished" $f | cut -c1-900; done
find /tmp/res* -name "polyp.json" -exec python3 -c "import json,sys;r=json.load(open(sys.argv[1]));print(sys.argv[1], r.get('supervised'), [x.get('medsmile',{}).get('test') for x in r['runs']], [x.get('round0_test') for x in r['runs']])" {} \;
