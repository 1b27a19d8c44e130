#!/usr/bin/env bash
# Regenerate every committed result the simulator produces (run from the repository root on a clean
# tree; CPU only, ~2 minutes on 2 cores). Use after any change that moves a simulated number, and
# commit the result in the same submission.
#   bash bench/regenerate_committed.sh [paper|tp|ra|gpu|all]
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
fi
