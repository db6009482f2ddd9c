//! `cargo xtask <task>`: the project's tasks. `setup` installs what the build and tests need
//! on a fresh Debian machine; `build-ebpf` builds the kernel object (through egress-agent's
//! build.rs, the one way it is built); `test` runs every test tier; `demo` shows a real actor's
//! traffic captured end to end; `bench` measures every capture path against direct connections
//! and squid; `image` builds the agent's container image; `check-manifests` validates deploy/
//! offline; `kind-e2e` runs the end-to-end harness on a kind cluster.
mod bench;
mod build;
mod demo;
mod image;
mod kind;
mod manifests;
mod setup;
mod test;

use std::path::PathBuf;

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
    /// Build the agent's container image from the Dockerfile with docker or podman.
    Image {
        /// The image's NAME[:TAG].
        #[arg(long, default_value = image::DEFAULT_TAG)]
        tag: String,
        /// The engine; default: docker if its daemon answers, else podman.
        #[arg(long, value_enum)]
        engine: Option<image::Engine>,
    },
    /// Render deploy/'s kustomizations and validate them offline (kubernetes-validate, pinned
    /// Kubernetes version, strict), check their invariants and lint the kind harness.
    CheckManifests {
        /// An egress-agent binary whose `run --help` must list every flag the DaemonSet passes.
        #[arg(long)]
        agent: Option<PathBuf>,
    },
    /// End-to-end on a kind cluster: build and load the image, deploy the agent, a squid PEP, an
    /// upstream and an actor pod, check squid saw the actor's identity; delete the cluster.
    /// Needs Docker (or Podman), kind and kubectl.
    KindE2e {
        /// The engine; default: docker if its daemon answers, else podman.
        #[arg(long, value_enum)]
        engine: Option<image::Engine>,
        /// Keep the cluster afterwards (for a look; delete it with `kind delete cluster --name
        /// egress-e2e`).
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf { release } => build::build_ebpf(release).map(|_| ()),
        Task::Test { filter } => test::run(filter.as_deref()),
        Task::Demo => demo::run(),
        Task::Bench { args } => bench::run(&args),
        Task::Image { tag, engine } => image::run(&tag, engine).map(|_| ()),
        Task::CheckManifests { agent } => manifests::check(agent.as_deref()),
        Task::KindE2e { engine, keep } => kind::run(engine, keep),
    }
}
