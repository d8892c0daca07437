//! The simulator front end and the shared report: a small scenario gives a complete, consistent report
//! and plots.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crowdsurf_peer::report::{EventKind, write_plots};
use crowdsurf_peer::simulate::{SimScenario, run};

#[test]
fn a_small_simulation_gives_a_consistent_report_and_plots() {
    let sc = SimScenario {
        peers: 30,
        duration: Duration::from_secs(15),
        upload_mean: 6.0,
        slow_share: 0.0,
        delay_ms: 20.0,
        churn_per_min: 0.2,
        ..Default::default()
    };
    let a = run(&sc);
    assert_eq!(a.kind, "sim");
    assert!(a.published >= 58, "published {}", a.published);
    assert!(a.peers_total > 30, "churn should have added peers");
    assert!(a.events.iter().any(|e| e.kind == EventKind::Leave));
    assert_eq!(a.per_peer.len(), a.peers_total);
    assert!(a.depth_max >= 1 && a.depth_mean >= 1.0);
    // Every traced peer's bound is positive and below what it observed at the median, give or take.
    for p in a.per_peer.iter().filter(|p| p.lower_bound_ms.is_some() && p.arrival_latency.count > 0) {
        assert!(p.lower_bound_ms.unwrap() > 0.0);
    }
    assert!(a.latency_cdf.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1), "CDF not monotone");
    assert!(a.origin_upload_ratio > 0.5 && a.origin_upload_ratio < 4.0, "origin {}", a.origin_upload_ratio);
    // 15 s is longer than the warm-up, so there is a steady figure for the origin too.
    let steady = a.origin_upload_ratio_after_warm_up.expect("no origin figure after the warm-up");
    assert!(steady > 0.5 && steady < 4.0, "origin after the warm-up {steady}");
    assert!((0.0..=1.0).contains(&a.continuity) && (0.0..=1.0).contains(&a.push_share));
    // Seeded: the same scenario gives the same figures.
    let b = run(&sc);
    assert_eq!(a.arrival_latency, b.arrival_latency);
    assert_eq!(a.skipped_total, b.skipped_total);
    let dir = std::env::temp_dir().join(format!("cs-plots-{}", std::process::id()));
    write_plots(&a, &dir).unwrap();
    for f in ["latency_cdf.svg", "latency_over_time.svg", "latency_vs_depth.svg"] {
        let svg = std::fs::read_to_string(dir.join(f)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{f} is not an SVG");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    // The scenario block holds what shaped the run, so a report can be rerun from itself.
    let json: serde_json::Value = serde_json::to_value(&a).unwrap();
    let scenario = &json["scenario"];
    assert_eq!(scenario["upload_mean"], 6.0);
    assert_eq!(scenario["slow_share"], 0.0);
    assert_eq!(scenario["latency_ms"], 1000.0);
    assert_eq!(scenario["known_peers"], sc.known_peers);
    assert_eq!(scenario["ramp_s"], 2.0);
    assert_eq!(scenario["uniform_delay"], false);
    assert_eq!(scenario["keyint_ms"], sc.random_access_every * u64::from(sc.chunk_ms));
    assert_eq!(scenario["max_upload_bps"], serde_json::Value::Null);
    assert_eq!(scenario["feed"], "synthetic");
    assert_eq!(scenario["processes"], serde_json::Value::Null);
    // Events keep their plain names in the JSON.
    assert!(json["events"].as_array().unwrap().iter().any(|e| e["kind"] == "leave"));
    // A run shorter than the warm-up has no steady origin figure.
    let short = run(&SimScenario { duration: Duration::from_secs(4), ..sc });
    assert_eq!(short.origin_upload_ratio_after_warm_up, None);
}
