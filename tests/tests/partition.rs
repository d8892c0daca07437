//! The network to half the swarm cut for 5 s. Each relay of the cut half runs over an emulated link
//! that the test cuts (every datagram in or out dropped: the node and its state live on, as when a
//! cable is pulled or a home router reboots), then restores. The survivors keep playing without a
//! gap; the cut half loses what falls due during the cut and then resumes, in order, with nothing
//! forged, and a relay that rejoins is playing again within a few seconds of the network coming back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crowdsurf_peer::net::LinkModel;
use crowdsurf_tests::Swarm;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_the_network_to_half_the_swarm_for_five_seconds() {
    let mut swarm = Swarm::start(0, 9).await;
    let relays = 10;
    for i in 0..relays {
        let cut = i % 2 == 1;
        swarm.add_relay_with(9_000 + i, |cfg| {
            if cut {
                cfg.endpoint.link = Some(LinkModel::default());
            }
        });
    }
    let cut_half: Vec<usize> = (0..relays as usize).filter(|i| i % 2 == 1).collect();
    let survivors: Vec<usize> = (0..relays as usize).filter(|i| i % 2 == 0).collect();
    swarm.publish(24).await;
    let before_cut = swarm.last();
    for &i in &cut_half {
        swarm.relays[i].handle.link().expect("an emulated link").set_cut(true);
    }
    swarm.publish(20).await; // 5 s
    let cut_ended = swarm.last();
    for &i in &cut_half {
        swarm.relays[i].handle.link().unwrap().set_cut(false);
    }
    let last = swarm.publish(32).await; // 8 s more
    swarm.settle(last, Duration::from_secs(5)).await;

    let tallies = swarm.tallies();
    assert_eq!(tallies.len(), relays as usize);
    for &i in &survivors {
        let t = &tallies[i];
        assert!(
            t.continuity() >= 0.995,
            "survivor {i}: continuity {:.4} ({} skipped)",
            t.continuity(),
            t.skipped.len()
        );
        assert!(t.delivered.last().is_some_and(|&s| s >= last), "survivor {i} did not reach the end");
    }
    for &i in &cut_half {
        let link = swarm.relays[i].handle.link().unwrap().stats();
        assert!(link.lost > 0, "cut relay {i}: nothing was dropped, the cut did not happen");
        let t = &tallies[i];
        let lost: Vec<u64> = t.skipped.clone();
        // Nothing is lost before the cut, and the relay is playing again within 4 s (16 chunks)
        // of the network coming back, then to the end without a gap.
        // The last chunk published before the cut was still on its way when the cut came (the cut
        // follows its publication by microseconds): it may be lost; nothing older may.
        let offsets: Vec<i64> = lost.iter().map(|&s| s as i64 - before_cut as i64).collect();
        assert!(lost.iter().all(|&s| s >= before_cut), "cut relay {i} lost {offsets:?} (seq − last before the cut)");
        let resumed = t.delivered.iter().copied().find(|&s| s > cut_ended);
        assert!(
            resumed.is_some_and(|s| s <= cut_ended + 16),
            "cut relay {i} did not resume within 4 s of the network coming back (first after: {resumed:?})"
        );
        let tail: Vec<u64> = t.delivered.iter().copied().filter(|&s| s >= resumed.unwrap()).collect();
        assert_eq!(tail, (resumed.unwrap()..=last).collect::<Vec<_>>(), "cut relay {i}: holes after resuming");
        let lost_in_cut = lost.iter().filter(|&&s| s >= before_cut && s <= cut_ended + 16).count();
        eprintln!(
            "cut relay {i}: {} delivered, {} skipped ({lost_in_cut} around the cut), resumed at +{} chunks, arrival p99 {:.0} ms",
            t.delivered.len(),
            lost.len(),
            resumed.unwrap() - cut_ended,
            swarm.relays[i].handle.stats().arrival_latency.p99_ms,
        );
    }
    let (_, forged) = swarm.summary();
    assert_eq!(forged, 0);
    let worst_survivor_p99 =
        survivors.iter().map(|&i| swarm.relays[i].handle.stats().arrival_latency.p99_ms).fold(0.0, f64::max);
    eprintln!("survivors: worst continuity {:.4}, worst arrival p99 {worst_survivor_p99:.0} ms", {
        survivors.iter().map(|&i| tallies[i].continuity()).fold(1.0, f64::min)
    });
    swarm.stop().await;
}
