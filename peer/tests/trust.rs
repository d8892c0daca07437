//! Trust: the same 100-peer scenario through the lab (real QUIC nodes over emulated links on loopback)
//! and through the simulator (the same state machine in virtual time). Where both reach, their latency
//! figures must agree; that is what lets us believe the simulator's 10,000-peer runs.
//!
//! The scenario: 100 relays and an origin, 2.5 Mbit/s in 250 ms chunks, every link 20 ms one way
//! (the simulator's uniform-delay mode, not its geography), 1 ms jitter, relay uploads drawn from the
//! same mix (mean `UPLOAD_MEAN` × the bitrate), the origin at 8x, 20 s of stream.
//!
//! What is compared: arrival latency p50 and p99 after the warm-up ([`WARM_UP_S`]), within 25 %. The
//! first seconds are printed but not judged: there the lab's 100 peers all do their QUIC handshakes
//! and congestion-control slow start at once (a fresh connection needs about three round trips for
//! a 78 kB chunk), which the simulator does not model; measured at 40 peers, seconds 0–1 had p50 540–
//! 640 ms in the lab against 255–345 ms in the simulator, and from second 2 on they are close.
//!
//! **CPU.** All 100 nodes share this process, and they need about one core (0.9 % of a core each).
//! A run whose scheduler lag ([`Report::scheduler_lag`]) shows the nodes waiting for a CPU measured
//! the machine, not the swarm; the test then fails saying so instead of blaming the simulator. Run it
//! on a machine with at least one free core (`make trust`).
//!
//! Last quiet run (commit 8035648, load 1.2 before and 1.3 after, scheduler lag p99 2.7 ms): after
//! the warm-up lab p50 426 ms / p99 623 ms against the simulator's 372 / 544 (13 % apart each); over
//! the whole run 432 / 874 against 375 / 710; continuity 100 % in both, origin 2.06x and 2.02x.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crowdsurf_peer::lab::{self, LabConfig};
use crowdsurf_peer::report::{Report, WARM_UP_S};
use crowdsurf_peer::simulate::{self, SimScenario};

const PEERS: usize = 100;
const DURATION: Duration = Duration::from_secs(20);
const DELAY: Duration = Duration::from_millis(20);
const JITTER: Duration = Duration::from_millis(1);
/// 6x, not 3x: at 3x with 250 ms chunks the swarm does not hold 100 peers in either model (the
/// simulator delivers 86.5 % with seed 7, 33 % duplicates), so comparing them compared how two
/// overloaded systems fail (repair storms, timeouts) — timing details neither is meant to model. At 6x
/// the simulator delivers everything (p50 390 ms, p99 732 ms) and the comparison is about the model.
const UPLOAD_MEAN: f64 = 6.0;
const SLOW_SHARE: f64 = 0.0;
const ORIGIN_UPLOAD: f64 = 8.0;
const SEED: u64 = 7;
/// The initial peers join spread over this long in both (the lab's and the simulator's default).
const RAMP: Duration = Duration::from_secs(2);
/// Scheduler lag p99 above which the lab was short of CPU (quiet: 1 to 4 ms at 40 to 100 peers).
const MAX_LAG_P99_MS: f64 = 10.0;

fn lab_config() -> LabConfig {
    LabConfig {
        peers: PEERS,
        ramp: RAMP,
        duration: DURATION,
        bitrate_bps: 2_500_000,
        chunk_ms: 250,
        latency: Duration::from_secs(1),
        link_delay: DELAY,
        jitter: JITTER,
        upload_mean: Some(UPLOAD_MEAN),
        slow_share: SLOW_SHARE,
        origin_upload: Some(ORIGIN_UPLOAD),
        seed: SEED,
        progress: None,
        ..Default::default()
    }
}

fn sim_scenario() -> SimScenario {
    SimScenario {
        peers: PEERS,
        duration: DURATION,
        bitrate_bps: 2_500_000,
        chunk_ms: 250,
        latency: Duration::from_secs(1),
        delay_ms: DELAY.as_secs_f64() * 1000.0,
        uniform_delay: true,
        jitter_ms: JITTER.as_secs_f64() * 1000.0,
        upload_mean: UPLOAD_MEAN,
        slow_share: SLOW_SHARE,
        origin_upload: ORIGIN_UPLOAD,
        ramp: RAMP,
        seed: SEED,
        ..Default::default()
    }
}

fn line(name: &str, r: &Report) -> String {
    let w = &r.arrival_latency_after_warm_up;
    format!(
        "{name}: p50 {:.0} ms p90 {:.0} ms p99 {:.0} ms | after {WARM_UP_S:.0} s p50 {:.0} ms p99 {:.0} ms | continuity {:.3} % | origin {:.2}x | duplicates {:.1} % | push {:.1} % | depth {:.1} | bound ratio p50 {:.2} | startup p50 {:.2} s | wall {:.1} s",
        r.arrival_latency.p50_ms,
        r.arrival_latency.p90_ms,
        r.arrival_latency.p99_ms,
        w.p50_ms,
        w.p99_ms,
        r.continuity * 100.0,
        r.origin_upload_ratio,
        r.duplicate_ratio * 100.0,
        r.push_share * 100.0,
        r.depth_mean,
        r.bound_ratio_p50,
        r.startup_p50_s,
        r.wall_s,
    )
}

fn agree(what: &str, lab: f64, sim: f64) -> Result<(), String> {
    let diff = (lab - sim).abs() / sim.max(lab).max(1.0);
    if diff <= 0.25 {
        Ok(())
    } else {
        Err(format!("{what}: lab {lab:.0} ms, sim {sim:.0} ms ({:.0} % apart)", diff * 100.0))
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(|_| "unknown".into(), |l| l.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs 100 real QUIC nodes in one process for 20 s and needs about one free core; `make trust`"]
async fn lab_and_simulator_agree_on_100_peers() {
    let sim = simulate::run(&sim_scenario());
    eprintln!("{}", line("sim", &sim));
    eprintln!("load before the lab: {}", load_average());
    let lab = lab::run(lab_config()).await.unwrap();
    eprintln!("{}", line("lab", &lab));
    let lag = lab.scheduler_lag.clone().unwrap();
    eprintln!(
        "lab CPU per peer: {:.2} % of a core; scheduler lag p50 {:.1} ms p99 {:.1} ms max {:.0} ms; load after: {}",
        lab.cpu_per_peer.unwrap_or(0.0) * 100.0,
        lag.p50_ms,
        lag.p99_ms,
        lag.max_ms,
        load_average()
    );
    assert!(
        lag.p99_ms <= MAX_LAG_P99_MS,
        "the lab was short of CPU (scheduler lag p99 {:.1} ms > {MAX_LAG_P99_MS} ms): its figures measure this \
         machine, not the swarm; run again with a core free",
        lag.p99_ms
    );
    let (l, s) = (&lab.arrival_latency_after_warm_up, &sim.arrival_latency_after_warm_up);
    let errors: Vec<String> = [agree("p50", l.p50_ms, s.p50_ms), agree("p99", l.p99_ms, s.p99_ms)]
        .into_iter()
        .filter_map(Result::err)
        .collect();
    assert!(errors.is_empty(), "lab and simulator disagree after the warm-up: {}", errors.join("; "));
}
