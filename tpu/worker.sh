#!/usr/bin/env bash
# Runs on every TPU VM worker, copied there by `tpu/pod setup`; `tpu/pod` calls it over ssh.
#   worker.sh setup            venv with the locked stack plus the libtpu the pinned jax pairs with
#   worker.sh start ARGS...    stop stale runs, free the TPU, start `python -m celerity_jax.main ARGS`
#   worker.sh state            running | exited N | preempted N | lost | idle
#   worker.sh logs [N]         the last N lines of this worker's current log
#   worker.sh stop             SIGTERM the run (it saves a checkpoint and exits 0)
set -euo pipefail
cd "$(dirname "$0")/.."
LOGS="${CELERITY_LOG_DIR:-$HOME/celerity_logs}"
TAG="[$(hostname)${TPU_WORKER_ID:+ worker $TPU_WORKER_ID}]"

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else "$@"; fi
}

run_pid() {
  local pid
  pid=$(cat "$LOGS/pid" 2>/dev/null) || return 1
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

setup() {
  local stamp
  stamp=$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
  if [ -x .venv/bin/python ] && [ "$(cat .venv/celerity_stamp 2>/dev/null)" = "$stamp" ]; then
    echo "$TAG environment up to date ($stamp)"
    return
  fi
  python3 -m venv .venv
  .venv/bin/pip install -q --no-deps -r requirements.lock -e .
  # the libtpu that the pinned jax declares in its `tpu` extra (jax 0.10.2: libtpu==0.0.42.*)
  local libtpu
  libtpu=$(.venv/bin/python -c 'import importlib.metadata as m
print(next(r.split(";")[0] for r in m.requires("jax") if r.startswith("libtpu")))')
  .venv/bin/pip install -q "$libtpu"
  echo "$stamp" > .venv/celerity_stamp
  echo "$TAG installed the locked stack and $libtpu"
}

stop_stale() {
  local pid
  if pid=$(run_pid); then
    echo "$TAG stopping a previous run (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  # runs started from this directory by other means (a manual launch, a lost babysitter)
  for pid in $(pgrep -f "celerity_jax.main" || true); do
    [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$PWD" ] && kill -KILL "$pid" 2>/dev/null || true
  done
  # any other process holding the TPU (a crashed notebook, another framework) blocks libtpu
  local devices
  devices=$(ls /dev/accel* /dev/vfio/[0-9]* 2>/dev/null || true)
  if [ -n "$devices" ] && command -v fuser >/dev/null; then
    # shellcheck disable=SC2086
    as_root fuser -k -KILL $devices 2>/dev/null || true
  fi
  as_root rm -f /tmp/libtpu_lockfile
}

start() {
  stop_stale
  mkdir -p "$LOGS"
  local log
  log="$LOGS/run-$(date -u +%Y%m%dT%H%M%S).log"
  ln -sfn "$log" "$LOGS/current.log"
  rm -f "$LOGS/exit"
  nohup bash -c '
    .venv/bin/python -m celerity_jax.main "$@" >> "'"$log"'" 2>&1 &
    echo $! > "'"$LOGS"'/pid"
    wait $!
    echo $? > "'"$LOGS"'/exit.partial" && mv "'"$LOGS"'/exit.partial" "'"$LOGS"'/exit"
  ' worker "$@" > /dev/null 2>&1 &
  for _ in $(seq 50); do [ -f "$LOGS/pid" ] && [ "$LOGS/pid" -nt "$log" ] && break; sleep 0.1; done
  echo "$TAG started: $*; log $log"
}

state() {
  if [ -f "$LOGS/exit" ]; then
    local code
    code=$(cat "$LOGS/exit")
    if [ "$code" = 0 ] && grep -q "run the same command to resume" "$LOGS/current.log"; then
      echo "$TAG preempted $code"
    else
      echo "$TAG exited $code"
    fi
  elif run_pid >/dev/null; then
    echo "$TAG running"
  elif [ -e "$LOGS/current.log" ]; then
    echo "$TAG lost"        # started, gone without an exit status: the VM restarted under it
  else
    echo "$TAG idle"
  fi
}

case "${1:-}" in
  setup) setup ;;
  start) shift; start "$@" ;;
  state) state ;;
  logs) tail -n "${2:-50}" "$LOGS/current.log" 2>/dev/null | sed "s/^/$TAG /" ;;
  stop) if pid=$(run_pid); then kill -TERM "$pid"; echo "$TAG sent SIGTERM to $pid"; fi ;;
  *) echo "usage: worker.sh setup|start ARGS...|state|logs [N]|stop" >&2; exit 2 ;;
esac
