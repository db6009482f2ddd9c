//! `cargo xtask kind-e2e`: the end-to-end harness on a kind cluster (deploy/kind/e2e.sh).
//!
//! It needs a container engine with a running daemon (kind's nodes are containers), kind and
//! kubectl. Where they are missing it stops before doing anything and says why, with a non-zero
//! exit: it never reports a pass it did not earn.
use std::process::Command;

use anyhow::bail;

use crate::{
    image::{self, Engine, Probe},
    setup,
};

/// The script that runs the harness once the image is built.
pub const SCRIPT: &str = "deploy/kind/e2e.sh";

/// The kind cluster's name (also in deploy/overlays/kind/kind-cluster.yaml).
pub const CLUSTER: &str = "egress-e2e";

/// The engine to run kind with, or why this machine cannot run the harness. `probe` and `have`
/// are [`image::probe`] and [`setup::which`] outside tests.
pub fn preflight(
    requested: Option<Engine>,
    probe: impl Fn(Engine) -> Probe,
    have: impl Fn(&str) -> bool,
) -> anyhow::Result<Engine> {
    let candidates = match requested {
        Some(engine) => vec![engine],
        None => vec![Engine::Docker, Engine::Podman],
    };
    let mut why = Vec::new();
    let mut engine = None;
    for candidate in candidates {
        match probe(candidate) {
            Probe::Ready => {
                engine = Some(candidate);
                break;
            }
            Probe::Missing => why.push(format!("{} is not installed", candidate.program())),
            Probe::NoEngine(reason) => why.push(reason),
        }
    }
    let Some(engine) = engine else {
        bail!(
            "cannot run here: no Docker engine ({}); kind needs one; this harness runs on a \
             workstation or CI runner with Docker (or Podman). Nothing was tested.",
            why.join("; ")
        );
    };
    let missing: Vec<&str> = ["kind", "kubectl"]
        .into_iter()
        .filter(|tool| !have(tool))
        .collect();
    if !missing.is_empty() {
        bail!(
            "cannot run here: {} not installed (kind: https://kind.sigs.k8s.io, `go install \
             sigs.k8s.io/kind@latest`; kubectl: your distribution or `cargo xtask setup`). \
             Nothing was tested.",
            missing.join(" and ")
        );
    }
    Ok(engine)
}

/// Runs the harness: preflight, the agent's image, then the script (which makes and always
/// deletes the cluster).
pub fn run(engine: Option<Engine>, keep: bool) -> anyhow::Result<()> {
    let engine = preflight(engine, image::probe, setup::which)?;
    image::run(image::DEFAULT_TAG, Some(engine))?;
    let mut cmd = Command::new("bash");
    cmd.arg(image::repo_root().join(SCRIPT))
        .env("ENGINE", engine.program())
        .env("CLUSTER", CLUSTER)
        .env("AGENT_IMAGE", image::DEFAULT_TAG);
    if keep {
        cmd.env("KEEP_CLUSTER", "1");
    }
    setup::run_cmd(&mut cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `LOGFORMAT` of tests/src/squid.rs, its Rust escapes and line continuations undone.
    fn tests_logformat() -> String {
        let source =
            std::fs::read_to_string(image::repo_root().join("tests/src/squid.rs")).unwrap();
        let marker = "const LOGFORMAT: &str = \"";
        let start = source.find(marker).unwrap() + marker.len();
        let literal = &source[start..start + source[start..].find("\";").unwrap()];
        let mut out = String::new();
        let mut lines = literal.split("\\\n");
        out.push_str(lines.next().unwrap());
        for continued in lines {
            out.push_str(continued.trim_start());
        }
        out.replace("\\t", "\t")
    }

    #[test]
    fn without_an_engine_it_says_it_cannot_run_here() {
        let no_daemon = |e: Engine| match e {
            Engine::Docker => {
                Probe::NoEngine("`docker info` failed: Cannot connect to the Docker daemon".into())
            }
            Engine::Podman => Probe::Missing,
        };
        let err = preflight(None, no_daemon, |_| true)
            .unwrap_err()
            .to_string();
        for want in [
            "cannot run here: no Docker engine (`docker info` failed",
            "kind needs one",
            "workstation or CI runner with Docker",
            "Nothing was tested",
        ] {
            assert!(err.contains(want), "{want:?} not in: {err}");
        }
        let err = preflight(None, |_| Probe::Ready, |t| t != "kind")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot run here: kind not installed"), "{err}");
        assert_eq!(
            preflight(None, |_| Probe::Ready, |_| true).unwrap(),
            Engine::Docker
        );
    }

    #[test]
    fn the_script_and_the_overlay_agree() {
        let root = image::repo_root();
        let script = std::fs::read_to_string(root.join(SCRIPT)).unwrap();
        let cluster =
            std::fs::read_to_string(root.join("deploy/overlays/kind/kind-cluster.yaml")).unwrap();
        assert!(cluster.contains(&format!("name: {CLUSTER}")));
        let actor = std::fs::read_to_string(root.join("deploy/overlays/kind/actor.yaml")).unwrap();
        for (var, annotation) in [
            ("ACTOR_ID", "egress.dev/actor-id"),
            ("TEMPLATE", "egress.dev/template"),
            ("TEMPLATE_NAMESPACE", "egress.dev/template-namespace"),
        ] {
            let value = script
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{var}=")))
                .unwrap_or_else(|| panic!("{var} not set in {SCRIPT}"));
            assert!(
                actor.contains(&format!("{annotation}: {value}\n")),
                "actor.yaml's {annotation} is not {value}"
            );
        }
        assert!(actor.contains("egress.dev/capture: \"true\""));
        // squid logs what the script's awk reads: the integration tests' logformat, exactly.
        let squid = std::fs::read_to_string(root.join("deploy/overlays/kind/squid.yaml")).unwrap();
        let logformat = squid
            .lines()
            .find_map(|l| l.trim_start().strip_prefix("logformat egress "))
            .expect("squid.yaml defines logformat egress");
        assert_eq!(logformat, tests_logformat());
        let fields: Vec<&str> = logformat.split('\t').collect();
        assert_eq!(
            (fields[2], fields[3], fields[6], fields[7], fields[8]),
            (
                "%rm",
                "%ru",
                "%{x-ate-actor-id}>h",
                "%{x-ate-actor-template}>h",
                "%{x-ate-actor-template-namespace}>h"
            ),
            "the script's awk reads $3 $4 $7 $8 $9"
        );
        // The cluster is deleted on every exit.
        assert!(script.contains("trap cleanup EXIT"));
        assert!(script.contains("kind delete cluster --name \"$CLUSTER\""));
    }
}
