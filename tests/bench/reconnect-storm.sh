#!/bin/sh
# Reconnect storm (issue 17): N simulated agents connected to one
# flotte-server; the server is killed (SIGKILL) and started again on the
# same address; measures the time until every agent is back, the new
# server's peak RSS and CPU over that time, and whether any agent gave up.
# Not in CI (minutes, and a machine to itself); figures in BENCHMARKS.md.
#
# usage: reconnect-storm.sh [AGENTS]   (release binaries from $B)
set -eu
B=${B:-/work/target-bench/release}
N=${1:-10000}
D=/tmp/flotte-storm-$N
rm -rf "$D" "$D-server.log" "$D-loadgen.log"
"$B/flotte-server" init --data-dir "$D" --listen 127.0.0.1:0 >/dev/null
cat "$(dirname "$0")/loadgen-limits.toml" >>"$D/server.toml"
start_server() {
    rm -f "$D/server.address" "$D/metrics.address"
    "$B/flotte-server" run --data-dir "$D" --listen "${ADDRESS:-127.0.0.1:0}" \
        --metrics-listen "${METRICS:-127.0.0.1:0}" >>"$D-server.log" 2>&1 &
    SERVER_PID=$!
    while [ ! -s "$D/server.address" ] || [ ! -s "$D/metrics.address" ]; do sleep 0.05; done
    ADDRESS=$(cat "$D/server.address")
    METRICS=$(cat "$D/metrics.address")
}
connected() {
    curl -s "http://$METRICS/metrics" | awk '/^flotte_connected_agents /{print $2}'
}
start_server
# Sessions are not throttled by the load generator: real agents do not
# wait for each other.
"$B/flotte-loadgen" --profile "$D/admin" --server "$ADDRESS" --agents "$N" \
    --connect-concurrency "$N" --duration 3600s --settle 1s --connect-timeout 20m \
    >"$D-loadgen.log" 2>&1 &
LOADGEN_PID=$!
until grep -q "^established $N sessions" "$D-loadgen.log"; do
    kill -0 $LOADGEN_PID 2>/dev/null || { echo "the load generator stopped:"; cat "$D-loadgen.log"; exit 1; }
    sleep 0.5
done
grep "^established" "$D-loadgen.log"
until [ "$(connected)" = "$N" ]; do sleep 0.2; done
echo "all $N connected; killing the server (pid $SERVER_PID)"
kill -9 $SERVER_PID
wait $SERVER_PID 2>/dev/null || true
KILLED_AT=$(date +%s.%N)
start_server
STARTED_AT=$(date +%s.%N)
TICKS_AT_START=$(awk '{print $14 + $15}' /proc/$SERVER_PID/stat)
PEAK_RSS=0
BACK=0
while :; do
    RSS=$(awk '/^VmRSS/{print $2}' /proc/$SERVER_PID/status)
    [ "$RSS" -gt "$PEAK_RSS" ] && PEAK_RSS=$RSS
    BACK=$(connected || echo 0)
    [ "${BACK:-0}" = "$N" ] && break
    NOW=$(date +%s)
    if [ "$(echo "$NOW - $KILLED_AT > 600" | bc)" = 1 ]; then echo "not all back within 10 min: $BACK"; break; fi
    sleep 0.1
done
ALL_BACK_AT=$(date +%s.%N)
TICKS=$(( $(awk '{print $14 + $15}' /proc/$SERVER_PID/stat) - TICKS_AT_START ))
echo "server restarted $(echo "$STARTED_AT - $KILLED_AT" | bc) s after the kill"
echo "all $BACK agents back $(echo "$ALL_BACK_AT - $KILLED_AT" | bc) s after the kill, $(echo "$ALL_BACK_AT - $STARTED_AT" | bc) s after the restart"
echo "new server: peak RSS $((PEAK_RSS / 1024)) MiB, CPU $TICKS ticks of 1/$(getconf CLK_TCK) s until all were back"
grep -E 'VmRSS|VmHWM|Threads' /proc/$SERVER_PID/status
if kill -0 $LOADGEN_PID 2>/dev/null; then
    echo "the load generator (every agent's reconnect loop) still runs: no agent gave up"
    echo "session failures it printed: $(grep -c 'session of' "$D-loadgen.log")"
else
    echo "the load generator stopped:"; tail -5 "$D-loadgen.log"
fi
kill $LOADGEN_PID $SERVER_PID 2>/dev/null || true
wait 2>/dev/null || true
