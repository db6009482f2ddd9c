//! `cargo xtask demo`: builds the agent and runs the demo binary of the tests crate, which
//! sets up a throw-away actor and shows its traffic captured end to end.
use std::process::Command;

use anyhow::bail;

use crate::{build, setup};

/// Runs the demo.
pub fn run() -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!(
            "cargo xtask demo needs root (it loads eBPF programs, creates cgroups and network namespaces, runs squid)"
        );
    }
    setup::run()?;
    let built = build::build_ebpf(false)?;
    setup::run_cmd(
        Command::new(env!("CARGO"))
            .args([
                "run",
                "--quiet",
                "--package",
                "egress-tests",
                "--bin",
                "egress-demo",
            ])
            .env("EGRESS_AGENT_BIN", &built.agent),
    )
}
