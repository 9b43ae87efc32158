#!/usr/bin/env bash
# A local Ray head node for development, bound to 127.0.0.1, with token authentication on.
#   cluster/local.sh start   start it in the background
#   cluster/local.sh run     run it in the foreground; Ctrl-C or SIGTERM stops it (used by the tests)
#   cluster/local.sh stop    stop it (note: `ray stop` stops every Ray node started on this machine)
#   cluster/local.sh status
# Ports and size: LTE_RAY_PORT (6379), LTE_RAY_DASHBOARD_PORT (8265), LTE_RAY_AGENT_PORT (52365, the
# dashboard agent that takes job submissions: a second cluster on the same machine needs its own),
# LTE_RAY_CPUS (logical CPUs, default: 4 per core, since heads take fractions of a CPU).
# Clients: RAY_AUTH_MODE=token; the token is ~/.ray/auth_token (created on first start).
set -euo pipefail
port=${LTE_RAY_PORT:-6379}
dash=${LTE_RAY_DASHBOARD_PORT:-8265}
agent=${LTE_RAY_AGENT_PORT:-52365}
cpus=${LTE_RAY_CPUS:-$(( $(nproc) * 4 ))}
export RAY_AUTH_MODE=token
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # keep Ray on the loopback address it is given

# The token is the cluster's only credential: readable by its owner alone.
[ -s ~/.ray/auth_token ] || (umask 077 && ray get-auth-token --generate >/dev/null)
chmod 600 ~/.ray/auth_token
args=(--head --node-ip-address=127.0.0.1 --port="$port" --num-cpus="$cpus"
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dash"
      --dashboard-agent-listen-port="$agent" --disable-usage-stats)
case "${1:-}" in
  start)
    ray start "${args[@]}"
    echo "submit jobs with: RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:$dash --working-dir . -- python jobs/train.py --config jobs/configs/digits.yaml"
    ;;
  run) exec ray start "${args[@]}" --block ;;
  stop) ray stop ;;
  status) ray status --address "127.0.0.1:$port" ;;
  *) echo "usage: $0 start|run|stop|status" >&2; exit 2 ;;
esac
