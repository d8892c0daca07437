# crowdsurf: the two commands are `make demo` and `make test`. Both install what is missing first.
SHELL := /bin/bash
# gcc/libc6-dev: the linker and build scripts (ring, ffmpeg-sys-next's version probe); libclang-dev:
# bindgen for the FFmpeg headers; ffmpeg (ffmpeg/ffprobe) and mpv: command-line tools the tests run;
# libsdl2-dev, libsdl2-ttf-dev and a font: the player's window and its overlay.
APT_PACKAGES := gcc libc6-dev pkg-config clang libclang-dev libavcodec-dev libavformat-dev libavutil-dev \
	libswscale-dev libswresample-dev libavfilter-dev libavdevice-dev ffmpeg mpv \
	libsdl2-dev libsdl2-ttf-dev fonts-dejavu-core
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup lint bench fuzz doc trust

## demo: the broadcaster's test source, 4 relays and the player on this machine — in a window when
## there is a display, else on http://127.0.0.1:8080/stream.ts for mpv/VLC (RELAYS=, LATENCY=, HTTP=)
demo: setup
	scripts/demo.sh

## test: the whole test suite (what CI runs)
test: setup
	cargo test --workspace --all-targets
	cargo test --workspace --doc

## setup: install missing system packages (apt-get, sudo when not root) and check for cargo
setup:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		if ! command -v apt-get >/dev/null; then \
			echo "no apt-get here: install these (or your system's equivalents) by hand:$$missing"; exit 1; \
		fi; \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup (https://rustup.rs):"; \
		echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh"; exit 1; }

## lint: formatting and clippy as CI checks them
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

## bench: micro-benchmarks (criterion)
bench: setup
	cargo bench -p crowdsurf-proto

## fuzz: run each fuzz target for FUZZ_SECONDS (default 60); needs `cargo install cargo-fuzz`
FUZZ_SECONDS ?= 60
fuzz:
	cd fuzz && for t in decode_message parse_ticket decode_chunk; do \
		RUSTC_BOOTSTRAP=1 cargo fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) -jobs=1 || exit 1; done

## trust: lab (100 real QUIC peers over emulated 20 ms links) against the simulator on the same scenario
trust:
	cargo test --release -p crowdsurf-peer --test trust -- --ignored --nocapture
