# Shared by train.sbatch and train_multinode.sbatch (sourced, never run on its own).
# Slurm runs a copy of the batch script from its spool folder, so everything is found from
# $LMDIST_HOME and relative paths resolve against $SLURM_SUBMIT_DIR.

lmdist_setup() {
  cd "$SLURM_SUBMIT_DIR" || exit 1
  if [ -n "$LMDIST_VENV" ]; then source "$LMDIST_VENV/bin/activate" || exit 1; fi
  export ACCELERATE_CONFIG TRAIN_PY="$LMDIST_HOME/train.py"
  local gpus
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  export NPROC_PER_NODE=${NPROC_PER_NODE:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 2)}
  # Rendezvous at the first node's address as Slurm knows it (node names need not resolve), on a
  # port derived from the job id (kept across requeues, distinct between concurrent jobs).
  local first
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_ADDR
  MASTER_ADDR=$(scontrol show node "$first" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
  export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
  # A rank that hangs (rather than exits) fails the job after this many seconds in a collective.
  export LMDIST_COLLECTIVE_TIMEOUT=${LMDIST_COLLECTIVE_TIMEOUT:-900}
  # srun stopped inheriting --cpus-per-task in Slurm 22.05: pass the allocation on explicitly.
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
  # The same output_dir for every requeue of this job, unless the arguments name one.
  LMDIST_OUTPUT_ARGS=(--output_dir "runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}")
  local arg
  for arg in "$@"; do
    case "$arg" in --output_dir|--output_dir=*|--output-dir|--output-dir=*) LMDIST_OUTPUT_ARGS=() ;; esac
  done
  echo "lmdist: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s), $NPROC_PER_NODE processes per node, rendezvous $MASTER_ADDR:$MASTER_PORT"
}

# Ask the training workers on this node to checkpoint and stop (the launchers would die of SIGUSR1;
# one worker is enough: lmdist makes every rank stop at the same step).
lmdist_forward_stop() {
  echo "lmdist: $(date +%T) SIGUSR1 for job $SLURM_JOB_ID: asking the training processes on $(hostname) to checkpoint"
  local pid
  for pid in $(pgrep -f -- "$TRAIN_PY"); do
    if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -q '^LOCAL_RANK='; then kill -USR1 "$pid"; fi
  done
}

# lmdist_run NODES ARGS...: one launcher per node; each task computes its own machine rank.
lmdist_run() {
  local nodes=$1
  shift
  local total=$((nodes * NPROC_PER_NODE))
  export LMDIST_NODES=$nodes LMDIST_TOTAL_PROCS=$total
  # --kill-on-bad-exit: a failing rank ends the whole job now, not at the time limit.
  srun --kill-on-bad-exit=1 --nodes="$nodes" --ntasks-per-node=1 bash -c '
    devices=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
    echo "preflight: host $(hostname) node_rank $SLURM_NODEID devices $([ "${devices:-0}" -gt 0 ] && echo "$devices GPU" || echo "cpu") cores $(nproc) processes $NPROC_PER_NODE"
    launch=(accelerate launch --num_machines "$LMDIST_NODES" --num_processes "$LMDIST_TOTAL_PROCS"
            --machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT")
    if [ -n "$ACCELERATE_CONFIG" ]; then launch+=(--config_file "$ACCELERATE_CONFIG")
    else  # every value accelerate would otherwise default, and say so in a 5-line block in every log
      launch+=(--mixed_precision "${ACCELERATE_MIXED_PRECISION:-no}" --dynamo_backend no)
      if [ "$LMDIST_TOTAL_PROCS" -gt 1 ]; then launch+=(--multi_gpu --rdzv_backend static); fi
    fi
    exec "${launch[@]}" "$TRAIN_PY" "$@"
  ' lmdist-launcher "$@" "${LMDIST_OUTPUT_ARGS[@]}" &
  local srun_pid=$! status
  trap lmdist_forward_stop USR1
  while true; do  # a trapped signal interrupts wait: go back to waiting while srun runs
    wait "$srun_pid"
    status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
  done
  exit "$status"
}
