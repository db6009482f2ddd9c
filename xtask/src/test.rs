//! `cargo xtask test`: every tier, in order. Tiers 1 and 2 (unit, in-process) need nothing
//! special; tier 3 (integration) needs root, the kernel features and the real peers, and fails
//! loudly without them rather than passing.
use std::process::Command;

use anyhow::bail;

use crate::{build, manifests, setup};

/// Runs setup, lints, unit and in-process tests, then the privileged integration tests.
pub fn run(filter: Option<&str>) -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!(
            "cargo xtask test needs root: the integration tests load eBPF programs, create \
             cgroups and network namespaces and run squid. Run it as root (e.g. `sudo -E cargo \
             xtask test`); nothing was tested."
        );
    }
    setup::run()?;
    let built = build::build_ebpf(false)?;
    let cargo = env!("CARGO");
    // The same eBPF build settings for every cargo run below: build.rs reruns (and rebuilds
    // the object) whenever they change.
    let ebpf_env = [
        ("EGRESS_EBPF_REQUIRED", "1"),
        ("EGRESS_EBPF_TOOLCHAIN", built.toolchain.as_str()),
    ];

    println!("\n== lint: cargo fmt --check, cargo clippy");
    setup::run_cmd(Command::new(cargo).args(["fmt", "--all", "--check"]))?;
    setup::run_cmd(
        Command::new(cargo)
            .args([
                "clippy",
                "--workspace",
                "--exclude",
                "egress-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .env("EGRESS_EBPF_REQUIRED", "1"),
    )?;

    println!(
        "\n== deploy: manifests rendered and validated offline, invariants, kind harness lint"
    );
    manifests::check(Some(&built.agent))?;

    println!("\n== tiers 1-2: unit and in-process tests");
    setup::run_cmd(
        Command::new(cargo)
            .args([
                "test",
                "--workspace",
                "--exclude",
                "egress-ebpf",
                "--exclude",
                "egress-tests",
            ])
            .env("EGRESS_EBPF_REQUIRED", "1"),
    )?;

    println!(
        "\n== tier 3: privileged integration tests (real kernel, cgroups, netns, squid, curl, openssl)"
    );
    let mut cmd = Command::new(cargo);
    cmd.args(["test", "--package", "egress-tests"])
        .env("EGRESS_AGENT_BIN", &built.agent)
        .envs(ebpf_env);
    cmd.arg("--");
    if let Some(filter) = filter {
        cmd.arg(filter);
    }
    setup::run_cmd(&mut cmd)?;
    println!("\nall tiers passed");
    Ok(())
}
