//! `cargo xtask check-manifests`: the deployment checked offline, without a cluster.
//!
//! - Each kustomization under deploy/ is rendered with `kubectl kustomize` (any kubectl from
//!   Debian's 1.20 on: the files use only what its old kustomize knows too).
//! - Every rendered object, and each plain manifest the harness applies itself, is validated
//!   with kubernetes-validate (PyPI, pinned in deploy/validate-requirements.txt, in a venv under
//!   target/) against a pinned Kubernetes version, strictly: an unknown field is an error.
//! - Invariants the schema cannot see are asserted here: the ConfigMap mounted 0600, RBAC
//!   limited to reading pods, the probes on the admin listener, the privileges and mounts the
//!   agent needs.
//! - With `--agent PATH` (what `cargo xtask test` passes), every flag and `EGRESS_*` variable the
//!   DaemonSet gives the agent must appear in `egress-agent run --help`: the DaemonSet's args are
//!   the one list of flags the deployment depends on.
//! - The kind harness script passes `bash -n` and shellcheck.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use serde::Deserialize as _;
use serde_json::Value;

use crate::{image::repo_root, setup};

/// The Kubernetes version the manifests are validated against.
pub const KUBERNETES_VERSION: &str = "1.32.0";

/// Kustomizations rendered and validated (relative to the repository root).
pub const KUSTOMIZATIONS: &[&str] = &["deploy/base", "deploy/overlays/kind"];

/// Manifests applied as they are (by the kind harness), validated as they are.
pub const PLAIN_MANIFESTS: &[&str] = &["deploy/overlays/kind/actor.yaml"];

/// Shell scripts linted with `bash -n` and shellcheck.
pub const SCRIPTS: &[&str] = &["deploy/kind/e2e.sh"];

/// The validator's pinned requirements (relative to the repository root).
const REQUIREMENTS: &str = "deploy/validate-requirements.txt";

/// The admin listener the probes must reach (the agent's `--admin-listen`).
pub const ADMIN_ADDR: &str = "127.0.0.1:15090";

/// Runs every check; `agent` is an agent binary whose `run --help` must know the DaemonSet's
/// flags (none: that check is skipped and the flags are printed for a person to compare).
pub fn check(agent: Option<&Path>) -> anyhow::Result<()> {
    let root = repo_root();
    let kubectl = kubectl()?;
    let validator = ensure_validator()?;
    let out_dir = root.join("target/manifests");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut flags = Vec::new();
    for dir in KUSTOMIZATIONS {
        let rendered = render(&kubectl, &root.join(dir))?;
        let file = out_dir.join(format!("{}.yaml", dir.replace('/', "_")));
        std::fs::write(&file, &rendered).with_context(|| format!("writing {}", file.display()))?;
        validate(&validator, &file)
            .with_context(|| format!("{dir} (rendered to {})", file.display()))?;
        let objects = parse(&rendered).with_context(|| format!("parsing the render of {dir}"))?;
        let mut problems = invariants(&objects);
        if dir.ends_with("kind") {
            problems.extend(kind_invariants(&objects));
        }
        if !problems.is_empty() {
            bail!("{dir}: {}", problems.join("\n  "));
        }
        for flag in daemonset_flags(&objects) {
            if !flags.contains(&flag) {
                flags.push(flag);
            }
        }
        println!(
            "manifests: {dir}: {} objects valid (Kubernetes {KUBERNETES_VERSION}, strict)",
            objects.len()
        );
    }
    for file in PLAIN_MANIFESTS {
        validate(&validator, &root.join(file)).with_context(|| file.to_string())?;
        println!("manifests: {file} valid");
    }
    lint_scripts()?;
    match agent {
        Some(agent) => {
            let out = Command::new(agent)
                .args(["run", "--help"])
                .output()
                .with_context(|| format!("running {} run --help", agent.display()))?;
            let help = String::from_utf8_lossy(&out.stdout);
            let missing = missing_flags(&flags, &help);
            if !out.status.success() || !missing.is_empty() {
                bail!(
                    "the DaemonSet gives the agent flags or variables that `{} run --help` does \
                     not list: {} (fix deploy/base/daemonset.yaml or the agent's RunArgs)",
                    agent.display(),
                    missing.join(" ")
                );
            }
            println!("manifests: the agent knows every flag the DaemonSet passes");
        }
        None => println!(
            "manifests: flags the DaemonSet passes (not checked: give --agent PATH): {}",
            flags.join(" ")
        ),
    }
    Ok(())
}

/// The kubectl to render with: `$EGRESS_KUBECTL`, else `kubectl` on PATH.
pub fn kubectl() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("EGRESS_KUBECTL") {
        return Ok(PathBuf::from(path));
    }
    if setup::which("kubectl") {
        return Ok(PathBuf::from("kubectl"));
    }
    bail!(
        "kubectl is not on PATH: it renders the kustomizations under deploy/ (offline). Run \
         `cargo xtask setup` (installs Debian's kubernetes-client) or install any kubectl"
    )
}

/// `kubectl kustomize DIR`.
pub fn render(kubectl: &Path, dir: &Path) -> anyhow::Result<String> {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .with_context(|| format!("running {} kustomize", kubectl.display()))?;
    if !out.status.success() {
        bail!(
            "{} kustomize {} failed: {}",
            kubectl.display(),
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).context("kustomize printed non-UTF-8")
}

fn venv_dir() -> PathBuf {
    repo_root().join("target/manifest-venv")
}

/// The installed validator, if the venv holds exactly the pinned requirements.
pub fn validator() -> Option<PathBuf> {
    let venv = venv_dir();
    let wanted = std::fs::read_to_string(repo_root().join(REQUIREMENTS)).ok()?;
    let stamp = std::fs::read_to_string(venv.join(".egress-requirements")).ok()?;
    let bin = venv.join("bin/kubernetes-validate");
    (stamp == wanted && bin.is_file()).then_some(bin)
}

/// The validator, installing it into target/manifest-venv first when it is missing or its pins
/// changed (needs python3 with venv, and PyPI).
pub fn ensure_validator() -> anyhow::Result<PathBuf> {
    // One installer at a time (the unit tests run on several threads).
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _installing = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(bin) = validator() {
        return Ok(bin);
    }
    let venv = venv_dir();
    let requirements = repo_root().join(REQUIREMENTS);
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    println!(
        "manifests: installing kubernetes-validate into {}",
        venv.display()
    );
    let _ = std::fs::remove_dir_all(&venv);
    setup::run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv)).context(
        "creating the validator's venv: install python3 with its venv module \
         (`apt-get install python3-venv`, or run `cargo xtask setup`)",
    )?;
    setup::run_cmd(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(&requirements),
    )
    .context("installing the pinned kubernetes-validate from PyPI")?;
    std::fs::write(venv.join(".egress-requirements"), wanted)?;
    validator().context("kubernetes-validate is not in the venv after installing it")
}

/// Validates a file of one or more manifests, strictly, against [`KUBERNETES_VERSION`]; the
/// error holds the validator's findings.
pub fn validate(validator: &Path, file: &Path) -> anyhow::Result<()> {
    let out = Command::new(validator)
        .args([
            "--strict",
            "--quiet",
            "--kubernetes-version",
            KUBERNETES_VERSION,
        ])
        .arg(file)
        .output()
        .with_context(|| format!("running {}", validator.display()))?;
    if !out.status.success() {
        bail!(
            "kubernetes-validate rejected {}:\n{}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The objects of a multi-document YAML text (empty documents skipped).
pub fn parse(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let mut objects = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value = Value::deserialize(doc)?;
        if !value.is_null() {
            objects.push(value);
        }
    }
    Ok(objects)
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

fn agent_container(daemonset: &Value) -> Option<&Value> {
    daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == "egress-agent")
}

/// What the deployment must hold that a schema cannot check; each problem says what is wrong.
pub fn invariants(objects: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut problem = |p: String| problems.push(p);
    // RBAC: reading pods, nothing else, in every role the deployment brings.
    for role in objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
    {
        let name = role["metadata"]["name"].as_str().unwrap_or("?");
        let rules = role["rules"].as_array().cloned().unwrap_or_default();
        let pods_read_only = rules.len() == 1 && {
            let rule = &rules[0];
            let strings = |v: &Value| -> Vec<String> {
                let mut s: Vec<String> = v
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                s.sort();
                s
            };
            strings(&rule["apiGroups"]) == [""]
                && strings(&rule["resources"]) == ["pods"]
                && strings(&rule["verbs"]) == ["get", "list", "watch"]
                && rule.get("resourceNames").is_none()
                && rule.get("nonResourceURLs").is_none()
        };
        if !pods_read_only {
            problem(format!(
                "{} {name}: its rules must be exactly pods (core group) get, list, watch; got {}",
                role["kind"].as_str().unwrap_or("role"),
                serde_json::to_string(&rules).unwrap_or_default()
            ));
        }
    }
    let Some(ds) = find(objects, "DaemonSet", "egress-agent") else {
        problem("no DaemonSet egress-agent".into());
        return problems;
    };
    let pod = &ds["spec"]["template"]["spec"];
    for (field, want) in [
        ("hostNetwork", Value::Bool(true)),
        ("hostPID", Value::Bool(true)),
        ("dnsPolicy", "ClusterFirstWithHostNet".into()),
        ("priorityClassName", "system-node-critical".into()),
        ("serviceAccountName", "egress-agent".into()),
    ] {
        if pod[field] != want {
            problem(format!(
                "DaemonSet pod {field} must be {want}, is {}",
                pod[field]
            ));
        }
    }
    if !pod["terminationGracePeriodSeconds"].is_u64() {
        problem("DaemonSet pod has no terminationGracePeriodSeconds".into());
    }
    if !pod["tolerations"].as_array().is_some_and(|t| {
        t.iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none())
    }) {
        problem("DaemonSet pod must tolerate every taint (operator: Exists, no key)".into());
    }
    let strategy = &ds["spec"]["updateStrategy"];
    if strategy["type"] != "RollingUpdate" || strategy["rollingUpdate"]["maxUnavailable"] != 1 {
        problem(format!(
            "DaemonSet updateStrategy must be RollingUpdate with maxUnavailable 1, is {strategy}"
        ));
    }
    // The config volume: 0600.
    let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
    match volumes
        .iter()
        .find(|v| v["configMap"]["name"] == "egress-agent")
    {
        Some(v) if v["configMap"]["defaultMode"] == 384 => {}
        Some(v) => problem(format!(
            "the ConfigMap volume's defaultMode must be 384 (0600), is {}",
            v["configMap"]["defaultMode"]
        )),
        None => problem("the DaemonSet mounts no ConfigMap egress-agent".into()),
    }
    for (volume, host) in [
        ("bpffs", "/sys/fs/bpf"),
        ("cgroup", "/sys/fs/cgroup"),
        ("proc", "/proc"),
        ("netns", "/run/netns"),
        ("run", "/run/egress-agent"),
    ] {
        if !volumes
            .iter()
            .any(|v| v["name"] == volume && v["hostPath"]["path"] == host)
        {
            problem(format!("volume {volume} must be hostPath {host}"));
        }
    }
    let Some(agent) = agent_container(ds) else {
        problem("the DaemonSet has no container egress-agent".into());
        return problems;
    };
    if agent["securityContext"]["privileged"] != true {
        problem("the agent container must be privileged".into());
    }
    let mounts = agent["volumeMounts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for (volume, path, propagation) in [
        ("bpffs", "/sys/fs/bpf", Some("Bidirectional")),
        ("cgroup", "/host/sys/fs/cgroup", None),
        ("proc", "/host/proc", None),
        ("netns", "/run/netns", Some("HostToContainer")),
        ("run", "/run/egress-agent", None),
        ("config", "/etc/egress-agent", None),
    ] {
        let ok = mounts.iter().any(|m| {
            m["name"] == volume
                && m["mountPath"] == path
                && propagation.is_none_or(|p| m["mountPropagation"] == p)
        });
        if !ok {
            problem(format!(
                "the agent must mount {volume} at {path}{}",
                propagation.map_or(String::new(), |p| format!(" with mountPropagation {p}"))
            ));
        }
    }
    let args: Vec<&str> = agent["args"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let arg = |flag: &str| {
        args.iter()
            .position(|a| *a == flag)
            .and_then(|i| args.get(i + 1).copied())
    };
    if args.first() != Some(&"run") {
        problem(format!(
            "the agent's args must start with `run`, are {args:?}"
        ));
    }
    for (flag, want) in [
        ("--admin-listen", ADMIN_ADDR),
        ("--discovery", "kubernetes"),
        ("--proc-root", "/host/proc"),
        ("--config", "/etc/egress-agent/config.toml"),
    ] {
        if arg(flag) != Some(want) {
            problem(format!(
                "the agent's args must have {flag} {want}, have {:?}",
                arg(flag)
            ));
        }
    }
    let (host, port) = ADMIN_ADDR.split_once(':').unwrap_or_default();
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &agent[probe]["httpGet"];
        if get["path"] != path
            || get["host"] != host
            || get["port"].as_u64().map(|p| p.to_string()).as_deref() != Some(port)
        {
            problem(format!(
                "{probe} must be httpGet {host}:{port}{path} (the admin listener), is {get}"
            ));
        }
    }
    let node_name = agent["env"].as_array().and_then(|env| {
        env.iter()
            .find(|e| e["name"] == "EGRESS_NODE_NAME")
            .map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone())
    });
    if node_name != Some("spec.nodeName".into()) {
        problem("EGRESS_NODE_NAME must come from the downward API's spec.nodeName".into());
    }
    let resources = &agent["resources"];
    for (what, key) in [
        ("requests", "cpu"),
        ("requests", "memory"),
        ("limits", "memory"),
    ] {
        if resources[what][key].is_null() {
            problem(format!("the agent container has no resources.{what}.{key}"));
        }
    }
    problems
}

/// What the kind overlay adds: the locally built image, never pulled.
pub fn kind_invariants(objects: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(ds) = find(objects, "DaemonSet", "egress-agent") else {
        return vec!["no DaemonSet egress-agent".into()];
    };
    let pod = &ds["spec"]["template"]["spec"];
    for list in ["initContainers", "containers"] {
        for c in pod[list].as_array().cloned().unwrap_or_default() {
            if c["image"] != crate::image::DEFAULT_TAG || c["imagePullPolicy"] != "Never" {
                problems.push(format!(
                    "kind: container {} must run image {} with imagePullPolicy Never, has {} / {}",
                    c["name"],
                    crate::image::DEFAULT_TAG,
                    c["image"],
                    c["imagePullPolicy"]
                ));
            }
        }
    }
    problems
}

/// The flags (`--name`) and `EGRESS_*` variables the DaemonSet gives the agent.
pub fn daemonset_flags(objects: &[Value]) -> Vec<String> {
    let Some(agent) = find(objects, "DaemonSet", "egress-agent").and_then(agent_container) else {
        return Vec::new();
    };
    let mut flags: Vec<String> = agent["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .filter(|a| a.starts_with("--"))
                .map(|a| a.split('=').next().unwrap_or(a).to_string())
                .collect()
        })
        .unwrap_or_default();
    flags.extend(
        agent["env"]
            .as_array()
            .map(|env| {
                env.iter()
                    .filter_map(|e| e["name"].as_str())
                    .filter(|n| n.starts_with("EGRESS_"))
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
    );
    flags
}

/// The flags and variables that `help` (clap's `run --help`) does not list.
pub fn missing_flags(flags: &[String], help: &str) -> Vec<String> {
    flags
        .iter()
        .filter(|flag| {
            // A whole flag: `--proc` must not be found inside `--proc-root`.
            !help.match_indices(flag.as_str()).any(|(i, m)| {
                help[i + m.len()..]
                    .chars()
                    .next()
                    .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            })
        })
        .cloned()
        .collect()
}

/// `bash -n` and shellcheck on [`SCRIPTS`].
pub fn lint_scripts() -> anyhow::Result<()> {
    if !setup::which("shellcheck") {
        bail!(
            "shellcheck is not on PATH: run `cargo xtask setup` (or `apt-get install shellcheck`)"
        );
    }
    for script in SCRIPTS {
        let path = repo_root().join(script);
        setup::run_cmd(Command::new("bash").arg("-n").arg(&path))?;
        setup::run_cmd(Command::new("shellcheck").arg(&path))?;
        println!("manifests: {script}: bash -n and shellcheck clean");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The base's own files, parsed as they are (no kubectl needed).
    fn base_objects() -> Vec<Value> {
        let mut objects = Vec::new();
        for file in ["namespace.yaml", "rbac.yaml", "daemonset.yaml"] {
            let text = std::fs::read_to_string(repo_root().join("deploy/base").join(file)).unwrap();
            objects.extend(parse(&text).unwrap());
        }
        objects
    }

    fn daemonset(objects: &mut [Value]) -> &mut Value {
        objects
            .iter_mut()
            .find(|o| o["kind"] == "DaemonSet")
            .unwrap()
    }

    fn tools() -> (PathBuf, PathBuf) {
        let kubectl = kubectl().unwrap_or_else(|e| panic!("{e:#}"));
        // Installed on first use (python3 with venv, and PyPI); without them the test fails.
        let validator = ensure_validator().unwrap_or_else(|e| {
            panic!(
                "kubernetes-validate cannot be installed in target/manifest-venv: {e:#}; these \
                 tests do not pass without it"
            )
        });
        (kubectl, validator)
    }

    #[test]
    fn the_base_holds_the_invariants() {
        let objects = base_objects();
        assert_eq!(invariants(&objects), Vec::<String>::new());
    }

    #[test]
    fn each_broken_invariant_is_reported() {
        type Breaker = Box<dyn Fn(&mut Vec<Value>)>;
        let cases: Vec<(&str, Breaker)> = vec![
            (
                "defaultMode must be 384",
                Box::new(|o| {
                    let v = &mut daemonset(o)["spec"]["template"]["spec"]["volumes"][0];
                    v["configMap"]["defaultMode"] = 420.into();
                }),
            ),
            (
                "exactly pods (core group) get, list, watch",
                Box::new(|o| {
                    let role = o.iter_mut().find(|o| o["kind"] == "ClusterRole").unwrap();
                    role["rules"][0]["verbs"] =
                        serde_json::json!(["get", "list", "watch", "delete"]);
                }),
            ),
            (
                "exactly pods (core group) get, list, watch",
                Box::new(|o| {
                    let role = o.iter_mut().find(|o| o["kind"] == "ClusterRole").unwrap();
                    role["rules"][0]["resources"] = serde_json::json!(["pods", "secrets"]);
                }),
            ),
            (
                "readinessProbe must be httpGet 127.0.0.1:15090/readyz",
                Box::new(|o| {
                    let c = &mut daemonset(o)["spec"]["template"]["spec"]["containers"][0];
                    c["readinessProbe"]["httpGet"]["port"] = 8080.into();
                }),
            ),
            (
                "livenessProbe must be httpGet",
                Box::new(|o| {
                    let c = &mut daemonset(o)["spec"]["template"]["spec"]["containers"][0];
                    c["livenessProbe"]["httpGet"]["path"] = "/readyz".into();
                }),
            ),
            (
                "mountPropagation Bidirectional",
                Box::new(|o| {
                    let c = &mut daemonset(o)["spec"]["template"]["spec"]["containers"][0];
                    for m in c["volumeMounts"].as_array_mut().unwrap() {
                        if m["name"] == "bpffs" {
                            m.as_object_mut().unwrap().remove("mountPropagation");
                        }
                    }
                }),
            ),
            (
                "EGRESS_NODE_NAME",
                Box::new(|o| {
                    let c = &mut daemonset(o)["spec"]["template"]["spec"]["containers"][0];
                    c["env"] = serde_json::json!([]);
                }),
            ),
            (
                "--admin-listen 127.0.0.1:15090",
                Box::new(|o| {
                    let c = &mut daemonset(o)["spec"]["template"]["spec"]["containers"][0];
                    for a in c["args"].as_array_mut().unwrap() {
                        if a == "127.0.0.1:15090" {
                            *a = "0.0.0.0:15090".into();
                        }
                    }
                }),
            ),
            (
                "privileged",
                Box::new(|o| {
                    let c = &mut daemonset(o)["spec"]["template"]["spec"]["containers"][0];
                    c["securityContext"]["privileged"] = false.into();
                }),
            ),
            (
                "maxUnavailable 1",
                Box::new(|o| {
                    daemonset(o)["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] =
                        3.into();
                }),
            ),
        ];
        for (want, break_it) in cases {
            let mut objects = base_objects();
            break_it(&mut objects);
            let problems = invariants(&objects);
            assert!(
                problems.iter().any(|p| p.contains(want)),
                "expected a problem containing {want:?}, got {problems:#?}"
            );
        }
    }

    #[test]
    fn the_daemonsets_flags_are_listed_and_checked_against_help() {
        let flags = daemonset_flags(&base_objects());
        for want in [
            "--discovery",
            "--admin-listen",
            "--access-log",
            "--proc-root",
            "--config",
            "EGRESS_NODE_NAME",
        ] {
            assert!(flags.iter().any(|f| f == want), "{want} not in {flags:?}");
        }
        let help = "      --proc-root <PROC_ROOT>\n          [env: EGRESS_PROC_ROOT=]\n      --config <CONFIG>\n";
        let flags: Vec<String> = [
            "--proc",
            "--proc-root",
            "--config",
            "EGRESS_PROC_ROOT",
            "EGRESS_NODE_NAME",
        ]
        .map(String::from)
        .into();
        assert_eq!(missing_flags(&flags, help), ["--proc", "EGRESS_NODE_NAME"]);
    }

    #[test]
    fn every_manifest_renders_and_validates() {
        let (kubectl, validator) = tools();
        for dir in KUSTOMIZATIONS {
            let rendered = render(&kubectl, &repo_root().join(dir)).unwrap();
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), &rendered).unwrap();
            validate(&validator, file.path()).unwrap_or_else(|e| panic!("{dir}: {e:#}"));
            let objects = parse(&rendered).unwrap();
            assert_eq!(invariants(&objects), Vec::<String>::new(), "{dir}");
            assert!(
                find(&objects, "ConfigMap", "egress-agent").is_some(),
                "{dir}"
            );
        }
        let kind =
            parse(&render(&kubectl, &repo_root().join("deploy/overlays/kind")).unwrap()).unwrap();
        assert_eq!(kind_invariants(&kind), Vec::<String>::new());
        let config = find(&kind, "ConfigMap", "egress-agent").unwrap();
        assert!(
            config["data"]["config.toml"]
                .as_str()
                .unwrap()
                .contains("squid.egress-e2e.svc.cluster.local:3128"),
            "the kind overlay's config names the e2e squid"
        );
        for file in PLAIN_MANIFESTS {
            validate(&validator, &repo_root().join(file))
                .unwrap_or_else(|e| panic!("{file}: {e:#}"));
        }
    }

    #[test]
    fn a_broken_manifest_fails_validation() {
        let (kubectl, validator) = tools();
        let rendered = render(&kubectl, &repo_root().join("deploy/base")).unwrap();
        let write = |objects: &[Value]| {
            let text: String = objects
                .iter()
                .map(|o| format!("---\n{}", serde_yaml_ng::to_string(o).unwrap()))
                .collect();
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), text).unwrap();
            file
        };
        // As rendered, it passes: the failures below are the edits'.
        let objects = parse(&rendered).unwrap();
        validate(&validator, write(&objects).path()).unwrap();

        let mut unknown = objects.clone();
        daemonset(&mut unknown)["spec"]["template"]["spec"]["hostPIDs"] = true.into();
        let err = validate(&validator, write(&unknown).path()).unwrap_err();
        assert!(format!("{err:#}").contains("hostPIDs"), "{err:#}");

        let mut wrong_type = objects.clone();
        daemonset(&mut wrong_type)["spec"]["template"]["spec"]["volumes"][0]["configMap"]["defaultMode"] =
            "0600".into();
        let err = validate(&validator, write(&wrong_type).path()).unwrap_err();
        assert!(format!("{err:#}").contains("defaultMode"), "{err:#}");

        let mut no_selector = objects;
        daemonset(&mut no_selector)["spec"]
            .as_object_mut()
            .unwrap()
            .remove("selector");
        let err = validate(&validator, write(&no_selector).path()).unwrap_err();
        assert!(format!("{err:#}").contains("selector"), "{err:#}");
    }

    #[test]
    fn the_kind_harness_is_lint_clean() {
        lint_scripts().unwrap_or_else(|e| panic!("{e:#}"));
    }
}
