//! Builds the kernel programs (egress-ebpf) for bpfel-unknown-none with aya-build and leaves
//! the object at `$OUT_DIR/egress`, which the agent embeds. This is the only way the object is
//! built: `cargo xtask build-ebpf` runs this script too.
//!
//! The eBPF build needs bpf-linker and a Rust toolchain with the library source (`-Z
//! build-std=core`): Debian's `rustc-web` + `rust-web-src` linked into rustup as `debian-web`
//! (what `cargo xtask setup` installs), or rustup's nightly with `rust-src`. Without them a
//! plain `cargo build` still succeeds with a warning and an empty object; the agent then says
//! so when asked to load it. `EGRESS_EBPF_REQUIRED=1` (set by the xtask) makes a missing
//! toolchain an error instead; `EGRESS_EBPF_TOOLCHAIN` names the rustup toolchain to use.
use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, anyhow, bail};
use aya_build::Toolchain;

const REQUIRED: &str = "EGRESS_EBPF_REQUIRED";
const TOOLCHAIN: &str = "EGRESS_EBPF_TOOLCHAIN";
const OBJECT: &str = "egress";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={REQUIRED}");
    println!("cargo:rerun-if-env-changed={TOOLCHAIN}");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join(OBJECT);
    let required = env::var(REQUIRED).is_ok_and(|v| v == "1");

    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let toolchain = if skip {
        Err("AYA_BUILD_SKIP is set".to_string())
    } else {
        detect_toolchain()
    };
    let toolchain = match toolchain {
        Ok(toolchain) => toolchain,
        Err(why) => {
            if required {
                bail!(
                    "cannot build the eBPF object: {why}. Run `cargo xtask setup` (Debian) or \
                     install bpf-linker and `rustup toolchain install nightly --component rust-src`"
                );
            }
            println!(
                "cargo:warning=egress-agent is built WITHOUT its eBPF object ({why}); \
                 `egress-agent run` will refuse to start. Run `cargo xtask build-ebpf`."
            );
            fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
            return Ok(());
        }
    };

    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .iter()
        .find(|p| p.name.as_str() == "egress-ebpf")
        .ok_or_else(|| anyhow!("egress-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    let toolchain = match &toolchain {
        Found::Nightly => Toolchain::Nightly,
        Found::Custom(name) => {
            // A stable compiler (Debian's rustc-web) needs this for `-Z build-std`; aya-build
            // passes it on to the nested cargo.
            // SAFETY: build scripts are single-threaded at this point.
            unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
            Toolchain::Custom(name)
        }
    };
    // aya-build forwards every line of the nested cargo as a cargo warning, which cargo then
    // replays on every build. Keep those lines for a failed build only.
    let (result, lines) = capture_stdout(&out_dir, || aya_build::build_ebpf([package], toolchain))?;
    for line in &lines {
        if !line.starts_with("cargo:warning=") || result.is_err() {
            println!("{line}");
        }
    }
    result.context("building egress-ebpf")?;
    if fs::metadata(&object).map(|m| m.len()).unwrap_or(0) == 0 {
        bail!("aya-build produced no {}", object.display());
    }
    Ok(())
}

/// Runs `f` with this process's stdout (fd 1) sent to a file, and returns its lines.
fn capture_stdout<T>(
    out_dir: &std::path::Path,
    f: impl FnOnce() -> T,
) -> anyhow::Result<(T, Vec<String>)> {
    use std::{io::Write as _, os::fd::AsRawFd as _};
    let path = out_dir.join("aya-build.log");
    let file = fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    std::io::stdout().flush()?;
    // SAFETY: plain fd duplication; fd 1 is restored before returning.
    let saved = unsafe { libc::dup(1) };
    if saved < 0 || unsafe { libc::dup2(file.as_raw_fd(), 1) } < 0 {
        bail!("redirecting stdout: {}", std::io::Error::last_os_error());
    }
    let value = f();
    std::io::stdout().flush()?;
    // SAFETY: as above.
    unsafe {
        libc::dup2(saved, 1);
        libc::close(saved);
    }
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok((value, text.lines().map(str::to_owned).collect()))
}

enum Found {
    Nightly,
    Custom(String),
}

/// A rustup toolchain that can build `core` for the bpf target, and bpf-linker.
fn detect_toolchain() -> Result<Found, String> {
    println!("cargo:rerun-if-env-changed=PATH");
    which("bpf-linker").ok_or("bpf-linker is not on PATH")?;
    which("rustup").ok_or("rustup is not on PATH")?;
    let candidates: Vec<String> = match env::var(TOOLCHAIN) {
        Ok(name) if !name.is_empty() => vec![name],
        _ => vec!["debian-web".into(), "nightly".into()],
    };
    for name in &candidates {
        if has_library_source(name) {
            return Ok(if name == "nightly" {
                Found::Nightly
            } else {
                Found::Custom(name.clone())
            });
        }
    }
    Err(format!(
        "no rustup toolchain among {candidates:?} has the Rust library source \
         (lib/rustlib/src/rust/library)"
    ))
}

fn has_library_source(toolchain: &str) -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
    else {
        return false;
    };
    if !out.status.success() {
        return false;
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    sysroot
        .join("lib/rustlib/src/rust/library/Cargo.lock")
        .is_file()
}

fn which(program: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}
