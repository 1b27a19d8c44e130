#!/usr/bin/env bash
# Regenerate every committed result the simulator produces (run from the repository root on a clean
# tree; CPU only, ~2 minutes on 2 cores). Use after any change that moves a simulated number, and
# commit the result in the same submission.
#   bash bench/regenerate_committed.sh [paper|tp|ra|gpu|batched|all]
set -euo pipefail
what=${1:-all}
K="python -m sim.cli"

if [ "$what" = paper ] || [ "$what" = all ]; then
  $K sweep configs/paper/sweeps --force --no-progress --jobs 2
  $K report results/paper
fi

if [ "$what" = tp ] || [ "$what" = all ]; then
  $K sweep configs/sweeps/tp_models.yaml --force --no-progress --jobs 2
  python bench/tp_models_cost.py results/tp_models > results/tp_models/cost_per_1k_turns.md
fi

if [ "$what" = ra ] || [ "$what" = all ]; then
  python bench/roundattn_simulate_table.py > /dev/null   # results/round_attention/simulate.md
fi

if [ "$what" = gpu ] || [ "$what" = all ]; then
  seeded=results/gpu/trace_slice.parquet
  real=results/gpu/trace_slice_sharegpt.parquet
  # validate RUN_DIR MEASURED TRACE PROFILE ISOLATED
  validate() {
    $K gpu validate --measured "$2" --trace "$3" --profile "$4" --isolated "$5" --out "$1" >/dev/null
    echo "validated $1"
  }
  G=results/gpu
  validate $G/eager_validation $G/eager_validation/trace_runs.csv $seeded $G/eager_validation/profile_run2.yaml $G/eager_validation/isolated.csv
  validate $G/run5_graph_prefill $G/run5_graph_prefill/trace_runs.csv $seeded $G/run5_graph_prefill/profile.yaml $G/run5_graph_prefill/isolated.csv
  validate $G/run6_graph_prefill $G/run6_graph_prefill/trace_runs.csv $seeded $G/run6_graph_prefill/profile.yaml $G/run6_graph_prefill/isolated.csv
  validate $G/run7_graph_prefill_7b $G/run7_graph_prefill_7b/trace_runs.csv $seeded $G/run7_graph_prefill_7b/profile.yaml none
  validate $G/run8_host_terms $G/run8_host_terms/trace_runs.csv $seeded $G/run8_host_terms/profile.yaml $G/run8_host_terms/isolated.csv
  validate $G/run9_shared_ssd $G/run9_shared_ssd/trace_runs.csv $seeded $G/run9_shared_ssd/profile.yaml $G/run9_shared_ssd/isolated.csv
  validate $G/run10_sharegpt $G/run10_sharegpt/trace_runs.csv $real $G/run10_sharegpt/profile.yaml none
  validate $G/run11_ssd $G/run11_ssd/trace_runs.csv $seeded $G/run11_ssd/profile.yaml none
  validate $G/run11_ssd/sharegpt $G/run11_ssd/sharegpt/trace_runs.csv $real $G/run11_ssd/profile.yaml none
  validate $G/run12_copy_overhead $G/run12_copy_overhead/trace_runs.csv $real $G/run12_copy_overhead/profile.yaml none
  # tensor-parallel one-turn runs: each call's trace slice, profile, model and TP degree
  tp_validate() {   # RUN_DIR PROFILE MODEL GPUS
    $K gpu validate --measured "$1/trace_runs.csv" --trace "$1/trace_tp.parquet" --profile "$2" --isolated none \
        --model "$3" --gpus "$4" --out "$1" >/dev/null
    echo "validated $1"
  }
  tp_validate $G/run17_tp4 $G/run17_tp4/profile_tp4.yaml llama3.1-70b 4
  tp_validate $G/run20_tp2 $G/run20_tp2/profile_tp2.yaml qwen2.5-32b 2
  tp_validate $G/run21_tp4 $G/run21_tp4/profile_tp4.yaml llama3.1-70b 4
  tp_validate $G/run27_tp4 $G/run27_tp4/profile_tp4.yaml llama3.1-70b 4
  tp_validate $G/run28_tp4 $G/run28_tp4/profile_tp4.yaml llama3.1-70b 4
fi

if [ "$what" = batched ] || [ "$what" = all ]; then
  # batched runs' comparisons (compare.json, scatter plots) from their committed tables, each with the
  # profiles its README names
  G=results/gpu
  compare() {   # RUN_DIR PROFILES
    python bench/gpu_batched_validate.py --compare "$1" --out "$1" --profile "$2" >/dev/null
    python bench/gpu_batched_step_decomp.py "$1" >/dev/null
    echo "compared $1"
  }
  compare $G/run25_batched_shapes_all calibrated=$G/run25_batched_shapes_all/profile_calibrated.yaml,run24=$G/run24_batched_shapes_fix/profile_calibrated.yaml
  compare $G/run26_batched_top8 calibrated=$G/run26_batched_top8/profile_calibrated.yaml,run25=$G/run25_batched_shapes_all/profile_calibrated.yaml
  compare $G/run31_batched_ssd_fresh calibrated=$G/run31_batched_ssd_fresh/profile_calibrated.yaml,run26=$G/run26_batched_top8/profile_calibrated.yaml
  compare $G/run32_batched_llama2_7b calibrated=$G/run32_batched_llama2_7b/profile_calibrated.yaml,committed=$G/run12_copy_overhead/profile.yaml
  compare $G/run33_batched_host_calib calibrated=$G/run33_batched_host_calib/profile_calibrated.yaml,run31=$G/run31_batched_ssd_fresh/profile_calibrated.yaml
  python bench/gpu_tp_batched_validate.py --compare $G/run29_tp4_batched_h200 --out $G/run29_tp4_batched_h200 >/dev/null
  python bench/gpu_batched_step_decomp.py $G/run29_tp4_batched_h200 >/dev/null
  echo "compared $G/run29_tp4_batched_h200"
fi
