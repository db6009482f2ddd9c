//! `cargo xtask <task>`: the project's tasks. `setup` installs what the build and tests need
//! on a fresh Debian machine; `build-ebpf` builds the kernel object (through egress-agent's
//! build.rs, the one way it is built); `test` runs every test tier; `demo` shows a real actor's
//! traffic captured end to end; `bench` measures every capture path against direct connections
//! and squid.
mod bench;
mod build;
mod demo;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "egress project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything the build and the tests need (idempotent; Debian, as root).
    Setup,
    /// Build the eBPF object and the agent; print the object's path and programs.
    BuildEbpf {
        /// Build the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run every test tier: unit, in-process, privileged integration (needs root).
    Test {
        /// Only run integration tests whose name contains this.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Capture a real actor's traffic end to end and show what each layer saw (needs root).
    Demo,
    /// Measure every capture path against direct connections and squid (needs root).
    /// Arguments after `--` go to the bench, e.g. `cargo xtask bench -- --quick`.
    Bench {
        /// Arguments for the bench binary.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf { release } => build::build_ebpf(release).map(|_| ()),
        Task::Test { filter } => test::run(filter.as_deref()),
        Task::Demo => demo::run(),
        Task::Bench { args } => bench::run(&args),
    }
}
