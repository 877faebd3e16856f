#!/usr/bin/env bash
# The GPU runs behind BENCHMARKS.md's and README's GPU figures, in two parts that each fit a 10-minute slot.
#   bash benchmarks/gpu_runs.sh table OUT    shortcut results table (6 configs x 3 seeds, 6 at a time on the GPU),
#                                            the lip_resnet vs lip_vgg and the small-ViT fits, and the CPU ratios of
#                                            bench_harmonization pinned to 2 cores (taskset) beside them
#   bash benchmarks/gpu_runs.sh speed OUT    images/s at 224 px (bf16-mixed, channels_last) of resnet50, ViT-S/16 and
#                                            the 1-Lipschitz ResNet; the ClickMe monitor's overhead; explainers on CUDA
#   bash benchmarks/gpu_runs.sh issue24 OUT  the main recipe at full speed (issue 24), one call of about 8 minutes:
#                                            harmonized/plain of resnet50 (exact, frozen and ghost batch statistics) and
#                                            ViT-S/16 (fused attention with its double backward) at 224 px, bf16,
#                                            channels_last; the ViT-Tiny attention time/memory vs the math kernel;
#                                            the profiler's top kernels of the harmonized resnet50 step; the frozen
#                                            and ghost statistics' deviation from the exact step (and the exact step's
#                                            own, other images redrawn) at batch 64, 224 px
# OUT receives the logs. Needs the project's dependencies importable (PYTHONPATH) and a CUDA GPU.
set -u
part=$1
out=$2
mkdir -p "$out"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
csv=--trainer.logger=lightning.pytorch.loggers.CSVLogger

fit() {  # fit NAME CONFIG [overrides...]: one 10-epoch shortcut fit on the GPU, its metrics.csv kept as OUT/NAME.csv
  local name=$1 config=$2
  shift 2
  local start=$SECONDS
  python train.py fit --config "configs/shortcut/$config.yaml" --trainer.accelerator=gpu "$csv" \
    --trainer.enable_progress_bar=false --run.root /tmp/extra --run.experiment "$name" --run.version s0 "$@" \
    > "/tmp/extra_$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - start)) s" >> "$out/extra.txt"
  find "/tmp/extra/$name" -name metrics.csv -exec cp {} "$out/$name.csv" \;
}

if [ "$part" = table ]; then
  OMP_NUM_THREADS=2 taskset -c 14,15 python benchmarks/bench_harmonization.py --repeats 20 > "$out/harmonization_cpu2.txt" 2>&1 &
  taskset -c 0-11 python scripts/shortcut_table.py --root /tmp/table --seeds 0 1 2 --parallel 6 \
    --trainer.accelerator=gpu > "$out/table.txt" 2>&1 &
  table=$!
  taskset -c 12,13 bash -c "$(declare -f fit); out=$out csv=$csv; fit lip_resnet baseline_lipschitz \
    --model.init_args.backbone.class_path=align.models.lip_resnet; fit lip_vgg baseline_lipschitz; \
    fit harmonized_vit harmonized_vit"
  wait $table
  wait
elif [ "$part" = issue24 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/issue24.txt"
  for args in "resnet50" "resnet50 --batch-statistics frozen" "resnet50 --batch-statistics ghost" "vit_s16"; do
    # shellcheck disable=SC2086
    timeout 100 python benchmarks/bench_throughput.py --backbone $args --precision bf16-mixed --channels-last \
      --steps 60 --warmup 5 >> "$out/issue24.txt" 2>&1
  done
  timeout 60 python benchmarks/bench_attention.py --device cuda --repeats 20 >> "$out/issue24.txt" 2>&1
  timeout 60 python benchmarks/bench_attention.py --device cuda --repeats 10 --batch-size 64 --annotated 13 \
    >> "$out/issue24.txt" 2>&1
  timeout 100 python benchmarks/profile_harmonized.py --backbone resnet50 --precision bf16-mixed --channels-last \
    --plain --steps 3 --top 25 > "$out/profile_resnet50.txt" 2>&1
  timeout 60 python benchmarks/profile_harmonized.py --backbone resnet50 --precision bf16-mixed --channels-last \
    --batch-statistics frozen --steps 3 --top 25 > "$out/profile_resnet50_frozen.txt" 2>&1
  timeout 60 python benchmarks/profile_harmonized.py --backbone vit_s16 --precision bf16-mixed --steps 3 --top 25 \
    > "$out/profile_vit_s16.txt" 2>&1
  for mode in frozen ghost redrawn; do
    timeout 60 python benchmarks/frozen_statistics_deviation.py --backbone resnet50 --image-size 224 --batch-size 64 \
      --batches 3 --mode $mode >> "$out/frozen_deviation.txt" 2>&1
  done
elif [ "$part" = speed ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/speed.txt"
  for backbone in resnet50 vit_s16 lip_resnet; do
    timeout 150 python benchmarks/bench_throughput.py --backbone "$backbone" --precision bf16-mixed --channels-last \
      --steps 100 >> "$out/speed.txt" 2>&1
  done
  python scripts/make_clickme_shards.py /tmp/clickme --train-shards 8 --records-per-shard 64 --val-shards 1 \
    --imagenet-per-class 1 --num-classes 1000 >> "$out/speed.txt" 2>&1
  timeout 240 python benchmarks/bench_callbacks.py --config configs/clickme/harmonized_resnet50.yaml --max-epochs 5 -- \
    --trainer.logger=false --trainer.precision=bf16-mixed --data.init_args.batch_size=64 \
    --data.init_args.train_shards='/tmp/clickme/train-*.tfrecords' \
    --data.init_args.val_shards='/tmp/clickme/val-*.tfrecords' \
    --data.init_args.unannotated_dir=/tmp/clickme/imagenet > "$out/monitor.txt" 2>&1
  timeout 120 python benchmarks/bench_gpu.py > "$out/explainers.txt" 2>&1
fi
