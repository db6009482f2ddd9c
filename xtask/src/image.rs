//! `cargo xtask image`: builds the agent's container image from the repository's Dockerfile
//! with docker or podman, whichever is there and has a working engine.
use std::{path::Path, process::Command};

use anyhow::bail;

use crate::setup;

/// The tag `image` gives by default, and the one the kind overlay deploys.
pub const DEFAULT_TAG: &str = "egress-agent:dev";

/// A container engine that builds images.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// Docker (BuildKit).
    Docker,
    /// Podman (buildah).
    Podman,
}

impl Engine {
    /// The engine's command.
    pub fn program(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
        }
    }
}

/// What a probe found of one engine on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Its command is not on PATH.
    Missing,
    /// Its command is there but `ENGINE info` failed (no daemon, no permission); the reason.
    NoEngine(String),
    /// `ENGINE info` succeeded.
    Ready,
}

/// Probes an engine by running `ENGINE info` (the client alone cannot build).
pub fn probe(engine: Engine) -> Probe {
    if !setup::which(engine.program()) {
        return Probe::Missing;
    }
    match Command::new(engine.program()).arg("info").output() {
        Ok(out) if out.status.success() => Probe::Ready,
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let line = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            Probe::NoEngine(format!(
                "`{} info` failed: {}",
                engine.program(),
                line.trim()
            ))
        }
        Err(e) => Probe::NoEngine(format!("running `{} info`: {e}", engine.program())),
    }
}

/// The engine to use: the one asked for, else docker, else podman; an error naming both and
/// what to install when none works. `probe` is [`probe`] outside tests.
pub fn pick(requested: Option<Engine>, probe: impl Fn(Engine) -> Probe) -> anyhow::Result<Engine> {
    let candidates = match requested {
        Some(engine) => vec![engine],
        None => vec![Engine::Docker, Engine::Podman],
    };
    let mut why = Vec::new();
    for engine in candidates {
        match probe(engine) {
            Probe::Ready => return Ok(engine),
            Probe::Missing => why.push(format!("{} is not installed", engine.program())),
            Probe::NoEngine(reason) => why.push(reason),
        }
    }
    bail!(
        "no container engine to build with: {}.\nInstall Docker (Docker Engine or Docker \
         Desktop, with its daemon running) or Podman (`apt-get install podman` on Debian), \
         then run this again (choose one with --engine docker|podman).",
        why.join("; ")
    )
}

/// The arguments of the build command (after the engine's program).
pub fn build_args(tag: &str, repo: &Path) -> Vec<String> {
    vec![
        "build".into(),
        "--file".into(),
        repo.join("Dockerfile").display().to_string(),
        "--tag".into(),
        tag.into(),
        repo.display().to_string(),
    ]
}

/// The build command for `engine`.
pub fn build_command(engine: Engine, tag: &str, repo: &Path) -> Command {
    let mut cmd = Command::new(engine.program());
    cmd.args(build_args(tag, repo));
    if engine == Engine::Docker {
        // The Dockerfile's cache mounts need BuildKit (the default since Docker 23).
        cmd.env("DOCKER_BUILDKIT", "1");
    }
    cmd
}

/// The repository's root (where the Dockerfile is).
pub fn repo_root() -> &'static Path {
    // xtask/ sits in the root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
}

/// Builds the image; returns the engine that built it.
pub fn run(tag: &str, engine: Option<Engine>) -> anyhow::Result<Engine> {
    if tag.is_empty() {
        bail!("--tag is empty: give NAME[:TAG], e.g. {DEFAULT_TAG}");
    }
    let engine = pick(engine, probe)?;
    println!("image: building {tag} with {}", engine.program());
    setup::run_cmd(&mut build_command(engine, tag, repo_root()))?;
    println!("image: built {tag}");
    Ok(engine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_command_names_the_dockerfile_tag_and_context() {
        let repo = Path::new("/src/egress");
        assert_eq!(
            build_args("egress-agent:dev", repo),
            [
                "build",
                "--file",
                "/src/egress/Dockerfile",
                "--tag",
                "egress-agent:dev",
                "/src/egress"
            ]
        );
        let cmd = build_command(Engine::Podman, "r.example/egress-agent:1", repo);
        assert_eq!(cmd.get_program(), "podman");
        let docker = build_command(Engine::Docker, "t", repo);
        assert!(
            docker
                .get_envs()
                .any(|(k, v)| k == "DOCKER_BUILDKIT" && v == Some("1".as_ref()))
        );
    }

    #[test]
    fn docker_first_then_podman_and_a_clear_error_without_either() {
        let ready = |e: Engine| {
            if e == Engine::Podman {
                Probe::Ready
            } else {
                Probe::Missing
            }
        };
        assert_eq!(pick(None, ready).unwrap(), Engine::Podman);
        assert_eq!(pick(None, |_| Probe::Ready).unwrap(), Engine::Docker);
        let err = pick(Some(Engine::Docker), ready).unwrap_err().to_string();
        assert!(err.contains("docker is not installed"), "{err}");
        let err = pick(None, |e: Engine| match e {
            Engine::Docker => Probe::NoEngine("`docker info` failed: cannot connect".into()),
            Engine::Podman => Probe::Missing,
        })
        .unwrap_err()
        .to_string();
        for want in [
            "`docker info` failed",
            "podman is not installed",
            "Install Docker",
            "Podman",
        ] {
            assert!(err.contains(want), "{want:?} missing from: {err}");
        }
    }

    #[test]
    fn the_dockerfile_builds_the_agent_with_its_ebpf_object() {
        let text = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
        for want in [
            "FROM debian:bookworm AS builder",
            "rustc-web rust-web-src",
            "rustup toolchain link debian-web /usr",
            "--features llvm-22",
            "EGRESS_EBPF_REQUIRED=1",
            "--package egress-agent",
            "FROM debian:bookworm-slim",
            "nftables iproute2 ca-certificates",
        ] {
            assert!(text.contains(want), "Dockerfile lacks {want:?}");
        }
        // The same bpf-linker as `cargo xtask setup`.
        assert!(
            text.contains(&format!("BPF_LINKER_VERSION={}", setup::BPF_LINKER_VERSION)),
            "the Dockerfile's bpf-linker differs from setup's"
        );
        let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).unwrap();
        assert!(ignore.lines().any(|l| l.trim() == "target/"));
    }
}
