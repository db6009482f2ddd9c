//! `cargo xtask build-ebpf`: builds egress-agent with `EGRESS_EBPF_REQUIRED=1`, so its build.rs
//! must build the eBPF object (with aya-build) or fail; then shows the object it embedded.
use std::{
    io::BufRead as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use crate::setup;

/// What a build produced.
pub struct Built {
    /// The agent binary.
    pub agent: PathBuf,
    /// The eBPF object embedded in it.
    pub object: PathBuf,
    /// The rustup toolchain that built the object.
    pub toolchain: String,
}

/// Builds the agent with its eBPF object and prints the object's path and programs.
pub fn build_ebpf(release: bool) -> anyhow::Result<Built> {
    let toolchain = setup::ensure_toolchain()?;
    let built = build_agent(release, &toolchain)?;
    println!("eBPF object: {}", built.object.display());
    for (name, section, size) in programs(&built.object)? {
        println!("  program {name:<22} section {section:<22} {size} bytes");
    }
    println!("agent: {}", built.agent.display());
    Ok(built)
}

fn build_agent(release: bool, toolchain: &str) -> anyhow::Result<Built> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "build",
        "--package",
        "egress-agent",
        "--message-format=json-render-diagnostics",
    ])
    .env("EGRESS_EBPF_REQUIRED", "1")
    .env("EGRESS_EBPF_TOOLCHAIN", toolchain)
    .stdout(Stdio::piped());
    if release {
        cmd.arg("--release");
    }
    let mut child = cmd.spawn().context("starting cargo build")?;
    let stdout = child.stdout.take().context("cargo stdout")?;
    let (mut out_dir, mut agent) = (None, None);
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let is_agent = msg["package_id"]
            .as_str()
            .is_some_and(|id| id.contains("egress-agent"));
        match msg["reason"].as_str() {
            Some("build-script-executed") if is_agent => {
                out_dir = msg["out_dir"].as_str().map(PathBuf::from);
            }
            Some("compiler-artifact") if is_agent && msg["target"]["kind"][0] == "bin" => {
                agent = msg["executable"].as_str().map(PathBuf::from);
            }
            _ => {}
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("building egress-agent with its eBPF object failed ({status})");
    }
    let object = out_dir
        .context("cargo reported no build-script output for egress-agent")?
        .join("egress");
    let agent = agent.context("cargo reported no egress-agent binary")?;
    if std::fs::metadata(&object).map(|m| m.len()).unwrap_or(0) == 0 {
        bail!("{} is empty: the eBPF build did not run", object.display());
    }
    Ok(Built {
        agent,
        object,
        toolchain: toolchain.to_string(),
    })
}

/// (function, section, size) of each program in the object.
fn programs(path: &PathBuf) -> anyhow::Result<Vec<(String, String, u64)>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = object::File::parse(&*data).context("parsing the eBPF object")?;
    let mut programs = Vec::new();
    for symbol in file.symbols() {
        if symbol.kind() != object::SymbolKind::Text || !symbol.is_global() {
            continue;
        }
        let Some(index) = symbol.section_index() else {
            continue;
        };
        let section = file.section_by_index(index)?.name()?.to_string();
        if section == ".text" {
            continue;
        }
        programs.push((symbol.name()?.to_string(), section, symbol.size()));
    }
    programs.sort();
    Ok(programs)
}
