#!/usr/bin/env bash
# Entrypoint of the merflow images: one image, several roles, chosen by the first argument.
#
#   worker [ARGS...]   wait for the Prefect API, create the work pool if absent, then run a
#                      process worker on it (ARGS go to `prefect worker start`). The default.
#   serve [ARGS...]    wait for the Prefect API, then `merflow serve ARGS...` (served deployments)
#   server             the Prefect API and UI (PostgreSQL via PREFECT_SERVER_DATABASE_*)
#   healthcheck URL    exit 0 when URL/health answers 200 (compose healthchecks)
#   wait-api           wait for the Prefect API, then exit
#   anything else      run as a command, e.g. `merflow demo --out /data/demo`
#
# Environment (none of these start with MERFLOW_: merflow reads every MERFLOW_* variable as a
# setting and refuses names it does not know):
#   PREFECT_API_URL           the API, e.g. http://prefect-server:4200/api (worker, serve)
#   PREFECT_API_AUTH_STRING   user:password, when the server has PREFECT_SERVER_API_AUTH_STRING
#   WORKER_POOL               work pool to serve (default merflow-cpu)
#   WORKER_NAME               worker name (default <pool>-<hostname>)
#   WORKER_LIMIT              most flow runs at once on this worker (default: no limit)
#   WORKER_REQUIRE_GPU        1: refuse to start unless torch sees a CUDA device
#   API_WAIT_SECONDS          how long to wait for the API (default 180)
set -euo pipefail

log() { printf 'merflow-entrypoint: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 2
}

positive_int() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

auth_string() { printf '%s' "${PREFECT_API_AUTH_STRING:-${PREFECT_SERVER_API_AUTH_STRING:-}}"; }

# Exit 0 when "$1/health" answers 200; the same check (and auth header) merflow itself uses.
healthy() {
	python -c 'import sys; from flows.server import healthy
sys.exit(0 if healthy(sys.argv[1].rstrip("/"), sys.argv[2] or None, timeout=5.0) else 1)' \
		"$1" "$(auth_string)"
}

wait_for_api() {
	local url="${PREFECT_API_URL:-}" wait="${API_WAIT_SECONDS:-180}"
	[[ -n $url ]] || die "PREFECT_API_URL is not set; point it at the Prefect API, e.g." \
		"PREFECT_API_URL=http://prefect-server:4200/api"
	positive_int "$wait" || die "API_WAIT_SECONDS=$wait is not a positive whole number of seconds"
	local deadline=$((SECONDS + wait))
	until healthy "$url"; do
		if ((SECONDS >= deadline)); then
			die "no Prefect API answered at $url within $wait s; check the server" \
				"(docker compose logs prefect-server), PREFECT_API_URL and PREFECT_API_AUTH_STRING"
		fi
		sleep 2
	done
	log "Prefect API at $url is up"
}

ensure_pool() {
	local pool=$1
	if prefect work-pool inspect "$pool" >/dev/null 2>&1; then
		log "work pool $pool exists"
		return
	fi
	log "creating work pool $pool (type process)"
	# Another worker may create the same pool between our inspect and create: inspect again.
	prefect work-pool create "$pool" --type process >/dev/null ||
		prefect work-pool inspect "$pool" >/dev/null ||
		die "could not create work pool $pool; see the messages above"
}

require_gpu() {
	python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' ||
		die "WORKER_REQUIRE_GPU=1 but torch sees no CUDA device; start the container with a GPU" \
			"(compose: deploy.resources.reservations.devices; docker run --gpus all) or run the" \
			"cpu-worker instead"
}

run_worker() {
	local pool="${WORKER_POOL:-merflow-cpu}"
	local name="${WORKER_NAME:-$pool-$(hostname)}"
	[[ ${WORKER_REQUIRE_GPU:-0} != 1 ]] || require_gpu
	wait_for_api
	ensure_pool "$pool"
	# --with-healthcheck serves /health on PREFECT_WORKER_WEBSERVER_PORT (8080) for compose;
	# --install-policy never: the process worker ships with prefect, and nothing may prompt.
	local args=(worker start --pool "$pool" --type process --name "$name"
		--with-healthcheck --install-policy never)
	if [[ -n ${WORKER_LIMIT:-} ]]; then
		positive_int "$WORKER_LIMIT" || die "WORKER_LIMIT=$WORKER_LIMIT is not a positive whole number"
		args+=(--limit "$WORKER_LIMIT")
	fi
	log "starting worker $name on pool $pool"
	exec prefect "${args[@]}" "$@"
}

run_server() {
	local host="${PREFECT_SERVER_API_HOST:-0.0.0.0}" port="${PREFECT_SERVER_API_PORT:-4200}"
	# The same rule as `merflow server start`: beyond loopback, only with an auth string.
	case $host in
	127.* | localhost | ::1) ;;
	*)
		[[ -n ${PREFECT_SERVER_API_AUTH_STRING:-} ]] ||
			die "refusing to serve the Prefect API on $host without PREFECT_SERVER_API_AUTH_STRING" \
				"(user:password; clients set PREFECT_API_AUTH_STRING to the same)"
		;;
	esac
	# A server must not try to reach itself as a client (flows/server.py does the same).
	unset PREFECT_API_URL
	exec prefect server start --host "$host" --port "$port"
}

main() {
	local mode="${1:-worker}"
	[[ $# -eq 0 ]] || shift
	case $mode in
	worker) run_worker "$@" ;;
	serve)
		wait_for_api
		exec merflow serve "$@"
		;;
	server) run_server ;;
	healthcheck)
		[[ $# -ge 1 ]] || die "usage: healthcheck URL (the /health suffix is added)"
		healthy "$1"
		;;
	wait-api) wait_for_api ;;
	*) exec "$mode" "$@" ;;
	esac
}

main "$@"
