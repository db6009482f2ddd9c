//! The bench's short run (`egress_tests::bench`, `Profile::quick`): every path set up as
//! `cargo xtask bench` sets it up, a fraction of a second per figure, every body byte checked
//! against the pattern, every path checked to go through what it names. Nothing here is a
//! timing assertion: the figures are printed, not judged.

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
    let short = r.short.expect("short run");
    assert_eq!(short.ok, profile.short);
    assert_eq!(
        (short.sockets_left, short.conns_left),
        (0, 0),
        "map entries left after {} connections",
        short.ok
    );
}
