//! `cargo xtask bench`: builds the agent (release, with its eBPF object) and the bench and
//! load-generator binaries (release), then runs the bench as root. Arguments after `--` go to
//! the bench (`cargo xtask bench -- --help`).
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{build, setup};

/// Runs the bench with `args`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!(
            "cargo xtask bench needs root: it creates network namespaces and cgroups, loads eBPF \
             programs and runs squid and nginx. Run it as root (e.g. `sudo -E cargo xtask bench`)."
        );
    }
    setup::run()?;
    let built = build::build_ebpf(true)?;
    let cargo = env!("CARGO");
    setup::run_cmd(
        Command::new(cargo)
            .args([
                "build",
                "--release",
                "--package",
                "egress-tests",
                "--bin",
                "egress-bench",
                "--bin",
                "egress-load",
            ])
            .env("EGRESS_EBPF_REQUIRED", "1")
            .env("EGRESS_EBPF_TOOLCHAIN", &built.toolchain),
    )?;
    let dir = built
        .agent
        .parent()
        .context("the agent binary has no directory")?
        .to_path_buf();
    println!("\n== bench (the agent, squid and nginx on this machine; see docs/benchmarks.md)");
    setup::run_cmd(
        Command::new(dir.join("egress-bench"))
            .args(args)
            .env("EGRESS_AGENT_BIN", &built.agent)
            .env("EGRESS_LOAD_BIN", dir.join("egress-load")),
    )
}
