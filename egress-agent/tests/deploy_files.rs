//! The config and policy files the Kubernetes deployment ships (deploy/base, the kind overlay)
//! parse with the agent's own parsers, including the examples commented out in them: a
//! ConfigMap an agent would refuse at start-up never ships.
use std::path::{Path, PathBuf};

use egress_agent::{config, policy::Policy};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn parse_config(text: &str) -> config::File {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, text).unwrap();
    config::File::read(&file).unwrap_or_else(|e| panic!("{e}\n--- the file:\n{text}"))
}

#[test]
fn the_configmaps_config_files_parse() {
    for path in ["base/config.toml", "overlays/kind/config.toml"] {
        let file = config::File::read(&deploy(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(
            file.policy.as_deref(),
            Some(Path::new("/etc/egress-agent/policy.toml")),
            "{path}: the policy is where the DaemonSet mounts it"
        );
        assert!(file.actors.is_empty(), "{path}: actors come from discovery");
    }
    let kind = config::File::read(&deploy("overlays/kind/config.toml")).unwrap();
    assert_eq!(
        kind.pep.and_then(|p| p.address).as_deref(),
        Some("squid.egress-e2e.svc.cluster.local:3128")
    );
}

#[test]
fn the_commented_pep_examples_parse_when_uncommented() {
    let text = std::fs::read_to_string(deploy("base/config.toml")).unwrap();
    // The one-line form.
    let line = text
        .lines()
        .find(|l| l.starts_with("# pep = "))
        .expect("base/config.toml has a `# pep = ...` example");
    let string_form = parse_config(&format!("{text}\n{}\n", &line[2..]));
    assert!(string_form.pep.and_then(|p| p.address).is_some());
    // The table form: from `# [pep]` to the first line that is not a commented TOML line.
    let table: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != "# [pep]")
        .take_while(|l| l.starts_with("# ") && !l[2..].starts_with(' '))
        .map(|l| &l[2..])
        .collect();
    assert!(
        table.len() >= 3,
        "base/config.toml has a `# [pep]` example: {table:?}"
    );
    let table_form = parse_config(&format!("{text}\n{}\n", table.join("\n")));
    let pep = table_form.pep.expect("[pep] parsed");
    assert!(pep.address.is_some() && pep.tls.is_some());
}

#[test]
fn the_configmaps_policies_parse() {
    for path in ["base/policy.toml", "overlays/kind/policy.toml"] {
        let policy = Policy::load(&deploy(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        // The example template allows GitHub over HTTPS and nothing else is allowed by default.
        let coder = policy.template("team-a", "coder");
        assert!(coder.decide_name("api.github.com", 443).allowed, "{path}");
        assert!(!coder.decide_name("api.github.com", 80).allowed, "{path}");
        assert!(
            !policy
                .template("other", "x")
                .decide_name("github.com", 443)
                .allowed,
            "{path}"
        );
    }
}
