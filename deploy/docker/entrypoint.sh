#!/usr/bin/env sh
# Container entry point: size ONNX Runtime's thread pool from the container's CPU quota
# (cgroup v2 cpu.max, or v1 cfs files), not from the host's core count, unless
# PARLEY_THREADS is set. Then exec the server, so it receives SIGTERM directly.
set -eu
cgroup="${CGROUP_ROOT:-/sys/fs/cgroup}"

quota_cpus() {
  if [ -r "$cgroup/cpu.max" ]; then
    read -r quota period < "$cgroup/cpu.max"
  elif [ -r "$cgroup/cpu/cpu.cfs_quota_us" ]; then
    quota=$(cat "$cgroup/cpu/cpu.cfs_quota_us")
    period=$(cat "$cgroup/cpu/cpu.cfs_period_us")
  else
    return 1
  fi
  if [ "$quota" = "max" ] || [ "$quota" -le 0 ]; then
    return 1
  fi
  # Round up: a quota of 1.5 CPUs gets 2 threads.
  echo $(( (quota + period - 1) / period ))
}

if [ -z "${PARLEY_THREADS:-}" ]; then
  PARLEY_THREADS=$(quota_cpus || nproc)
  export PARLEY_THREADS
fi
if [ "${PARLEY_PRINT_THREADS:-}" = "1" ]; then
  echo "$PARLEY_THREADS"
  exit 0
fi
exec python3 -m server "$@"
