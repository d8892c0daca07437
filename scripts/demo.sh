#!/usr/bin/env bash
# The real thing on this machine: the broadcaster's test source (clock burned in), a handful of relays,
# and the player — in a window when there is a display, otherwise on the local HTTP gateway with the
# URL to open in mpv or VLC. Ctrl-C (or closing the window) stops everything this script started.
#
#   scripts/demo.sh                 # RELAYS=4 LATENCY=1s HTTP=127.0.0.1:8080 SIZE=1280x720 by default
#   RELAYS=8 LATENCY=500ms scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

RELAYS=${RELAYS:-4}
LATENCY=${LATENCY:-1s}
HTTP=${HTTP:-127.0.0.1:8080}
SIZE=${SIZE:-1280x720}
BIN=target/release

echo "== building release binaries"
cargo build --release -p crowdsurf-broadcaster -p crowdsurf-peer -p crowdsurf-player

work=$(mktemp -d -t crowdsurf-demo.XXXXXX)
pids=()
cleanup() {
    trap - EXIT INT TERM
    echo
    echo "== stopping"
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill -INT "${pids[$i]}" 2>/dev/null || true
    done
    sleep 1
    for pid in "${pids[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "== broadcaster (test source, $SIZE, logs in $work/broadcaster.log)"
"$BIN/crowdsurf-broadcaster" --key "$work/stream.key" --listen 127.0.0.1:0 --ticket-file "$work/ticket" \
    --size "$SIZE" >"$work/broadcaster.out" 2>"$work/broadcaster.log" &
pids+=($!)
for _ in $(seq 100); do
    [ -s "$work/ticket" ] && break
    sleep 0.1
done
[ -s "$work/ticket" ] || { echo "the broadcaster did not start; its log:"; cat "$work/broadcaster.log"; exit 1; }
ticket=$(cat "$work/ticket")
echo "   ticket: $ticket"

echo "== $RELAYS relays"
for i in $(seq "$RELAYS"); do
    "$BIN/crowdsurf-peer" "$ticket" --listen 127.0.0.1:0 --latency "$LATENCY" --quiet \
        >"$work/relay$i.log" 2>&1 &
    pids+=($!)
done
sleep 1

if [ -n "${DISPLAY:-}" ] && [ -z "${DEMO_NO_WINDOW:-}" ]; then
    echo "== player in a window (F fullscreen, O overlay, Q quit); the overlay's clock beside the burned-in one shows the latency"
    "$BIN/crowdsurf-player" "$ticket" --latency "$LATENCY" --listen 127.0.0.1:0 &
    player=$!
    pids+=($player)
    wait "$player" || true
else
    echo "== no display: player on the HTTP gateway"
    "$BIN/crowdsurf-player" "$ticket" --latency "$LATENCY" --listen 127.0.0.1:0 --http "$HTTP" &
    player=$!
    pids+=($player)
    echo
    echo "   watch:  mpv http://$HTTP/stream.ts      (or: vlc http://$HTTP/stream.ts)"
    echo "   HLS:    http://$HTTP/live.m3u8          figures: http://$HTTP/stats"
    echo "   Ctrl-C stops the demo."
    echo
    wait "$player" || true
fi
