#!/usr/bin/env bash
# A fleet without Docker: several `ozwell-asgi serve` hosts (one per port) sharing one PostgreSQL database (the key
# store) and one Redis (the rate limiter), hashing keys under one shared OZWELL_SECRET. A key's budget holds across
# all of them: N hosts admit exactly its rpm per window, not N times it.
#
#   bash examples/fleet.sh                      # start the hosts and wait; Ctrl-C stops them all
#   OZWELL_FLEET_CHECK=1 bash examples/fleet.sh # create a key with --rpm 5, send 8 requests across the hosts,
#                                               # expect 5 x 200 and 3 x 429, stop the hosts; exit 0 or 1
#
# Environment (defaults in brackets):
#   OZWELL_FLEET_PG           key store URL [postgresql://postgres@127.0.0.1:5432/test]
#   OZWELL_FLEET_REDIS        limiter URL [redis://127.0.0.1:6379/0]
#   OZWELL_FLEET_PORTS        one host per port, on 127.0.0.1 ["8001 8002"]
#   OZWELL_LIMITER_NAMESPACE  prefix of the limiter's counters in Redis [ozwell]
#   OZWELL_SECRET             the key-hashing secret, >= 16 bytes [a random one for this run only: keys created
#                             under it stop working when the next run picks another; export your own]
#   OZWELL_ASGI               the command to run [ozwell-asgi from PATH], e.g. "python -m ozwell_asgi"
#   OZWELL_FLEET_CHECK        1: run the check described above
set -euo pipefail

PG_URL=${OZWELL_FLEET_PG:-postgresql://postgres@127.0.0.1:5432/test}
REDIS_URL=${OZWELL_FLEET_REDIS:-redis://127.0.0.1:6379/0}
read -r -a PORTS <<<"${OZWELL_FLEET_PORTS:-8001 8002}"
read -r -a OZWELL <<<"${OZWELL_ASGI:-ozwell-asgi}"
CHECK=${OZWELL_FLEET_CHECK:-0}

if ((${#PORTS[@]} == 0)); then
    echo "fleet: OZWELL_FLEET_PORTS is empty" >&2
    exit 2
fi
if [[ -z ${OZWELL_SECRET:-} ]]; then
    OZWELL_SECRET=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
    echo "fleet: OZWELL_SECRET is not set; using a random one for this run" >&2
fi
# Every host (and the `keys` commands) reads the same settings from the environment.
export OZWELL_SECRET
export OZWELL_STORE_URL=$PG_URL
export OZWELL_LIMITER_URL=$REDIS_URL
export OZWELL_LIMITER_NAMESPACE=${OZWELL_LIMITER_NAMESPACE:-ozwell}

PIDS=()

stop_hosts() {
    local pid i
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true # uvicorn shuts down gracefully on SIGTERM
    done
    for pid in "${PIDS[@]}"; do
        for ((i = 0; i < 150; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}
trap stop_hosts EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Create the key first in CHECK mode: that also creates the store's tables before the hosts start together.
KEY=
if [[ $CHECK == 1 ]]; then
    KEY=$("${OZWELL[@]}" keys create --name fleet-check --rpm 5 | tail -1)
fi

for port in "${PORTS[@]}"; do
    "${OZWELL[@]}" serve --host 127.0.0.1 --port "$port" --log-level warning &
    PIDS+=("$!")
done

# Wait until every host answers (401 to a request without a key).
for index in "${!PORTS[@]}"; do
    url="http://127.0.0.1:${PORTS[$index]}/v1/models"
    for ((i = 0; ; i++)); do
        if ! kill -0 "${PIDS[$index]}" 2>/dev/null; then
            echo "fleet: the host on port ${PORTS[$index]} exited" >&2
            exit 1
        fi
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)
        [[ $code == 401 ]] && break
        if ((i >= 600)); then
            echo "fleet: the host on port ${PORTS[$index]} did not answer within 60 s" >&2
            exit 1
        fi
        sleep 0.1
    done
done
echo "fleet: ${#PORTS[@]} hosts up on ports ${PORTS[*]} (keys: $PG_URL, limits: $REDIS_URL)" >&2

if [[ $CHECK != 1 ]]; then
    echo "fleet: Ctrl-C stops them" >&2
    status=0
    wait -n || status=$?
    echo "fleet: a host exited (status $status); stopping the others" >&2
    exit "$status"
fi

# Windows are clock-aligned minutes: keep the 8 requests clear of a minute boundary.
second=$(date +%S)
if ((10#$second >= 55)); then
    sleep $((61 - 10#$second))
fi
ok=0
limited=0
for ((i = 0; i < 8; i++)); do
    port=${PORTS[$((i % ${#PORTS[@]}))]}
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 \
        -H "Authorization: Bearer $KEY" "http://127.0.0.1:$port/v1/models" || true)
    echo "request $((i + 1)) -> port $port: $code"
    case $code in
    200) ok=$((ok + 1)) ;;
    429) limited=$((limited + 1)) ;;
    esac
done
if ((ok == 5 && limited == 3)); then
    echo "OK: 5 x 200 and 3 x 429 across ${#PORTS[@]} hosts"
    exit 0
fi
echo "FAIL: expected 5 x 200 and 3 x 429, got $ok x 200 and $limited x 429"
exit 1
