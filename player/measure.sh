#!/usr/bin/env bash
# Measures the player on this machine: the broadcaster's test source, a few relays and a headless
# player, all on 127.0.0.1; RUNS runs for each latency, a fresh swarm each time. Prints startup
# time, display latency p50/p99/max, frames decoded/expected and skipped chunks of every run, then the
# medians. 640x360 by default: on a 2-core machine shared with builds a 720p test source cannot
# always encode in real time, and then it is the broadcaster that is measured, not the player.
#
#   player/measure.sh                               # RELAYS=4 RUNS=3 DURATION=30s LATENCIES="1s 500ms" SIZE=640x360
#   RELAYS=10 LATENCIES=500ms player/measure.sh
#
# Needs release binaries in $BIN (default target/release; cargo build --release -p crowdsurf-player
# -p crowdsurf-peer -p crowdsurf-broadcaster) and jq.
set -euo pipefail
cd "$(dirname "$0")/.."

RELAYS=${RELAYS:-4}
RUNS=${RUNS:-3}
DURATION=${DURATION:-30s}
LATENCIES=${LATENCIES:-1s 500ms}
SIZE=${SIZE:-640x360}
BIN=${BIN:-target/release}
command -v jq >/dev/null || { echo "needs jq"; exit 1; }

work=$(mktemp -d -t crowdsurf-measure.XXXXXX)
pids=()
stop_all() {
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill -INT "${pids[$i]}" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    pids=()
}
trap 'stop_all; rm -rf "$work"' EXIT INT TERM

one_run() { # latency run-number
    local latency=$1 n=$2 dir="$work/$1-$2"
    mkdir -p "$dir"
    "$BIN/crowdsurf-broadcaster" --key "$dir/stream.key" --listen 127.0.0.1:0 --ticket-file "$dir/ticket" \
        --size "$SIZE" >"$dir/broadcaster.out" 2>"$dir/broadcaster.log" &
    pids+=($!)
    for _ in $(seq 100); do
        [ -s "$dir/ticket" ] && break
        sleep 0.1
    done
    [ -s "$dir/ticket" ] || { echo "the broadcaster did not start:"; cat "$dir/broadcaster.log"; exit 1; }
    local ticket
    ticket=$(cat "$dir/ticket")
    for i in $(seq "$RELAYS"); do
        "$BIN/crowdsurf-peer" "$ticket" --listen 127.0.0.1:0 --latency "$latency" --quiet >"$dir/relay$i.log" 2>&1 &
        pids+=($!)
    done
    # Let the relays join and the push trees form before the player arrives.
    sleep 3
    "$BIN/crowdsurf-player" "$ticket" --headless --latency "$latency" --listen 127.0.0.1:0 \
        --duration "$DURATION" --stats-json "$dir/stats.json" 2>"$dir/player.log"
    stop_all
    jq -r --arg l "$latency" --arg n "$n" '[$l, $n,
        (.decode.startup_s * 1000 | round), .decode.display_latency.p50_ms, .decode.display_latency.p99_ms,
        .decode.display_latency.max_ms, .decode.frames_decoded, .decode.frames_expected,
        .decode.chunks_skipped, .decode.stalls] | @tsv' "$dir/stats.json" | tee -a "$work/results.tsv"
}

printf 'latency\trun\tstartup_ms\tp50_ms\tp99_ms\tmax_ms\tdecoded\texpected\tskipped\tstalls\n'
for latency in $LATENCIES; do
    for n in $(seq "$RUNS"); do
        one_run "$latency" "$n"
    done
done
echo
echo "medians over $RUNS runs ($RELAYS relays, $SIZE, $DURATION each):"
for latency in $LATENCIES; do
    awk -F'\t' -v l="$latency" '$1 == l' "$work/results.tsv" | sort -t$'\t' -k1,1 >"$work/one.tsv"
    median() { cut -f"$1" "$work/one.tsv" | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
    echo "  --latency $latency: startup $(median 3) ms, display latency p50 $(median 4) ms, p99 $(median 5) ms," \
        "max $(median 6) ms; skipped chunks (sum) $(cut -f9 "$work/one.tsv" | paste -sd+ | bc)," \
        "stalls (sum) $(cut -f10 "$work/one.tsv" | paste -sd+ | bc)"
done
