#!/bin/bash
# One self-training round on Kvasir (seed 0, 100-image pool of the cpu-quick profile), round 0 reused from
# `python -m benchmarks.paper --profile cpu-quick --dataset kvasir --seeds 0 --variants medsmile` (its run folder).
# usage: benchmarks/issue9/run_round_variant.sh NAME --key value ...   then: python benchmarks/issue9/eval_round_variant.py NAME
name=$1; shift
src=/work/main/results/cpu-quick/kvasir/seed0/medsmile
out=/work/main/results/issue9/kvasir_seed0/$name
mkdir -p $out/run && cp -r $src/run/round_0 $out/run/
cd /work/main/bundle
OMP_NUM_THREADS=1 /usr/bin/time -v python -m monai.bundle run --config_file "['configs/medsmile.json','configs/profiles/cpu-quick.json']" \
  --datalist $src/datalist.json --dataset_dir /work/shared/data \
  --reference_image /work/shared/data/kvasir_seg/images/cju6x35ervu2808015c7eoqe4.jpg \
  --reference_label /work/shared/data/kvasir_seg/masks/cju6x35ervu2808015c7eoqe4.png \
  --output_dir $out/run --model_path $out/models/model.pt --seed 0 --num_rounds 1 --export_torchscript false "$@" > $out/log.txt 2>&1
echo "exit $?" >> $out/log.txt
