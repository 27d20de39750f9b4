#!/bin/bash
# Every module mutation-tested through fresh_module.sh rather than `mutmut run` (mutation/README.md says why for
# each), with the tests that reached 100% there. Some modules: `bash mutation/fresh_all.sh commands/eval hub`.
# Each writes /tmp/fresh_<name>.txt; the survivors left are the ones in equivalent.txt (help prose and the like).
set -e
cd "$(dirname "$0")/.."
T=tests/mutation
HELP=tests/mutation/test_cli_mutants.py  # its help test checks every flag of every command
ALL="config hub commands/serve commands/generate commands/merge commands/quantize commands/convert commands/eval
     commands/finetune commands/train commands/bench eval/lm_eval_backend train/plot train/memory
     fastlinear frozen events server/app bench/__init__ eval/scoring bench/report server/background bench/worker
     bench/llamacpp cpu_kernels"

run() { echo "== $1"; bash mutation/fresh_module.sh "src/ventoux/$1.py" "${@:2}"; }

for module in ${*:-$ALL}; do
  case $module in
    config) run "$module" tests/test_config.py $T/test_config_mutants.py ;;
    hub) run "$module" $T/test_hub_mutants.py tests/test_hub.py ;;
    commands/serve) run "$module" $T/test_serve_command_mutants.py tests/test_server.py -k "cli_serve or test_serve_command" ;;
    commands/generate) run "$module" $T/test_generate_command_mutants.py tests/test_cli.py ;;
    commands/merge) run "$module" tests/test_lora_files.py $HELP -k "merge or help_names" ;;
    commands/quantize) run "$module" $T/test_quantize_command_mutants.py $HELP tests/test_quantize.py \
      tests/test_hardening.py -k "quantize or help_names" ;;
    commands/convert) run "$module" $T/test_convert_command_mutants.py $HELP tests/test_weights.py \
      tests/test_hardening.py tests/test_hub.py -k "convert or info or help_names or (test_weights and cli_errors)" ;;
    commands/eval) run "$module" $T/test_eval_command_mutants.py $HELP tests/test_eval.py \
      -k "test_eval_command or help_names or out_and_data or same_name" ;;
    commands/finetune) run "$module" $T/test_train_commands_mutants.py $HELP tests/test_finetune.py \
      -k "test_train_commands or help_names or validate_only_summary" ;;
    commands/train) run "$module" $T/test_train_commands_mutants.py $HELP -k "test_train_commands or help_names" ;;
    commands/bench) run "$module" $T/test_bench_command_mutants.py $HELP tests/test_bench.py \
      -k "test_bench_command or help_names or rejects_bad" ;;
    eval/lm_eval_backend) run "$module" $T/test_lm_eval_mutants.py tests/test_lm_eval.py ;;
    train/plot) run "$module" $T/test_train_plot_memory_mutants.py ;;
    train/memory) run "$module" $T/test_train_plot_memory_mutants.py tests/test_train.py tests/test_finetune.py \
      -k "memory or large_tensors or lean_memory" ;;
    fastlinear) run "$module" $T/test_fastlinear_mutants.py tests/test_fastlinear.py ;;
    frozen) run "$module" $T/test_fastlinear_mutants.py $T/test_qlinear_mutants.py tests/test_lora.py ;;
    events) run "$module" $T/test_events_mutants.py tests/test_generate.py tests/test_engine.py $T/test_batch_mutants.py ;;
    server/app) run "$module" $T/test_server_mutants.py tests/test_server.py ;;
    bench/__init__) run "$module" $T/test_bench_mutants.py tests/test_bench.py ;;
    eval/scoring) run "$module" $T/test_scoring_mutants.py $T/test_eval_mutants.py tests/test_eval.py ;;
    bench/report) run "$module" $T/test_report_mutants.py $T/test_bench_mutants.py $T/test_bench_command_mutants.py ;;
    server/background) run "$module" $T/test_background_mutants.py ;;
    bench/worker) run "$module" $T/test_worker_mutants.py ;;
    bench/llamacpp) run "$module" $T/test_llamacpp_mutants.py tests/test_bench.py \
      -k "llamacpp_mutants or built_from_source or march_native" ;;
    cpu_kernels) run "$module" $T/test_cpu_kernels_mutants.py tests/test_cpu_kernels.py tests/test_fastattention.py \
      tests/test_fastnorm.py tests/test_fastblock.py tests/test_fastlinear.py $T/test_fastlinear_mutants.py \
      $T/test_qlinear_mutants.py tests/test_quantize.py ;;
    *) echo "no fresh_module run for $module; the others: $ALL" >&2; exit 2 ;;
  esac
done
