"""Pool pseudo-label Dice per round and Kvasir test Dice of the round networks of run_round_variant.sh runs."""

import json
import os
import sys

sys.path.insert(0, "/work/main/bundle")
sys.path.insert(0, "/work/main")
import torch

torch.set_num_threads(1)
from benchmarks.paper import choose_split, pool_label_dice, test_per_round

root = "/work/shared/data"
for name in sys.argv[1:]:
    out = f"/work/main/results/issue9/kvasir_seed0/{name}"
    split = choose_split(root, "kvasir", 0, 100, 50)
    pool = pool_label_dice(os.path.join(out, "run"), root)
    test = test_per_round(out, root, split, 224)
    res = {"variant": name, "pool_dice": pool, "test": test}
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res), flush=True)
