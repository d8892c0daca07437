#!/usr/bin/env bash
# Takes docs/player.png: the broadcaster's test source, two relays and the player window with its
# overlay, on a virtual display (Xvfb), captured with ImageMagick's `import`.
# Needs: xvfb, imagemagick (apt). Usage: scripts/screenshot.sh [OUT.png]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/player.png}
for tool in Xvfb import; do
    command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install xvfb imagemagick"; exit 1; }
done
cargo build --release -p crowdsurf-broadcaster -p crowdsurf-peer -p crowdsurf-player
BIN=target/release
work=$(mktemp -d -t crowdsurf-shot.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

display=:$((90 + RANDOM % 100))
Xvfb "$display" -screen 0 1024x600x24 -nolisten tcp >/dev/null 2>&1 &
pids+=($!)
"$BIN/crowdsurf-broadcaster" --key "$work/stream.key" --listen 127.0.0.1:0 --ticket-file "$work/ticket" \
    --size 960x540 >/dev/null 2>"$work/broadcaster.log" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/ticket" ] && break; sleep 0.1; done
ticket=$(cat "$work/ticket")
for i in 1 2; do
    "$BIN/crowdsurf-peer" "$ticket" --listen 127.0.0.1:0 --quiet >/dev/null 2>&1 &
    pids+=($!)
done
sleep 1
SDL_AUDIODRIVER=dummy DISPLAY=$display "$BIN/crowdsurf-player" "$ticket" --listen 127.0.0.1:0 2>"$work/player.log" &
pids+=($!)
sleep 8
mkdir -p "$(dirname "$out")"
DISPLAY=$display import -window root "$out"
echo "saved $out"
