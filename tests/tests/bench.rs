//! The bench's short run (`egress_tests::bench`, `Profile::quick`): every path set up as
//! `cargo xtask bench` sets it up, a fraction of a second per figure, every body byte checked
//! against the pattern, every path checked to go through what it names (for the HTTP/2
//! pooling figure: pooled or not, under the actor's certificate). Nothing here is a timing
//! assertion: the figures are printed, not judged.

use egress_tests::bench::{self, Bench, Bins, Path, Profile};

#[test]
fn every_path_delivers_correct_bytes() {
    let profile = Profile {
        net: 90,
        ..Profile::quick()
    };
    let bins = Bins {
        load: env!("CARGO_BIN_EXE_egress-load").into(),
        agent: egress_tests::agent::agent_bin(),
    };
    let b = Bench::new(profile.clone(), bins);
    let r = b.run(&mut |line| eprintln!("bench: {line}"));
    drop(b);
    eprintln!("{}", bench::markdown(&r));
    // Every path ran every metric (an error in any run panics inside `run`).
    for path in Path::ALL {
        for metric in &profile.metrics {
            let samples = &r.samples[&(path, *metric)];
            assert_eq!(samples.len(), 1, "{} {}", path.name(), metric.name());
            assert!(
                samples[0].units > 0.0,
                "{} {}: nothing delivered",
                path.name(),
                metric.name()
            );
        }
    }
    for path in [
        Path::Egress,
        Path::EgressPep,
        Path::NftAgent,
        Path::SquidIntercept,
    ] {
        assert_eq!(r.idle[&path].open, profile.idle as u64, "{}", path.name());
    }
    // The HTTP/2 pooling figure: every row has its ratio, and the pooled path's agent
    // multiplexed its tunnels (the checks in `Bench::new` saw it per path; this is the run).
    let rows = bench::pooling(&r);
    assert!(!rows.is_empty());
    for row in &rows {
        assert!(
            row.h2_vs_mtls().is_some() && row.h2_vs_nghttpx_h1().is_some(),
            "pooling figure row without its ratio: {row:?}"
        );
    }
    let pool = r.pool.clone().expect("egress+h2's pool counters");
    assert!(
        pool.connections_opened >= 1 && pool.streams_opened > 10 * pool.connections_opened,
        "egress+h2 should carry many tunnels per HTTP/2 connection: {pool:?}"
    );
    let short = r.short.expect("short run");
    assert_eq!(short.ok, profile.short);
    assert_eq!(
        (short.sockets_left, short.conns_left),
        (0, 0),
        "map entries left after {} connections",
        short.ok
    );
}
