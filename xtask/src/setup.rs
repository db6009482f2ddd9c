//! `cargo xtask setup`: everything a fresh Debian bookworm machine needs, installed only when
//! missing, so running it again is cheap.
//!
//! The eBPF crate needs `-Z build-std=core` for bpfel-unknown-none, i.e. a compiler plus its
//! *matching* library source, and bpf-linker. Two ways are supported:
//! - Debian's `rustc-web` + `rust-web-src` (1.96, LLVM 22) registered with rustup as the
//!   `debian-web` toolchain, and bpf-linker built against Debian's llvm-22 (what this installs);
//! - rustup's nightly with the `rust-src` component (used when present, e.g. on a developer
//!   machine with internet access).
use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

/// Debian packages: the eBPF toolchain, and the real peers the tests and demo run.
const PACKAGES: &[&str] = &[
    // eBPF toolchain: compiler + library source + the LLVM bpf-linker links against.
    "rustc-web",
    "rust-web-src",
    "cargo-web",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // Build of C-based crates.
    "gcc",
    "pkg-config",
    // Real peers and tools for tests, demo and operators.
    "squid-openssl",
    "curl",
    "openssl",
    "iproute2",
    "nftables",
    "bpftool",
    "util-linux",
    "procps",
    // veth-mode tests: actors run in gVisor (ptrace platform, Debian's 2022 build) so their
    // packets leave through its own netstack and a veth, as they do on a gVisor node.
    "runsc",
    // A private DNS server inside a test namespace; `-base` has no system service to start.
    "dnsmasq-base",
    // `dig`, to ask that DNS server directly (readiness checks and DNS assertions).
    "bind9-dnsutils",
    // nghttpx: an HTTP/2 CONNECT proxy in front of squid, the PEP of the HTTP/2 tests.
    "nghttp2-proxy",
    // The bench's upstream (plain HTTP and HTTPS, sendfile); `-light` is the smallest build.
    "nginx-light",
    // The deployment's checks (cargo xtask check-manifests): the kind harness's lint, and the
    // venv kubernetes-validate is installed into.
    "shellcheck",
    "python3-venv",
];

/// Renders the kustomizations offline where no kubectl is on PATH (Debian's kubectl 1.20; its
/// old kustomize is enough for deploy/).
const KUBECTL_PACKAGE: &str = "kubernetes-client";

/// bpf-linker release known to build against llvm-22 here.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// The rustup toolchain name given to Debian's rustc-web.
pub const DEBIAN_TOOLCHAIN: &str = "debian-web";

/// Free space a cold `cargo xtask test` wants for its target dir, with room: measured at its
/// largest, a fresh clone's target dir held 3.1 GiB (see docs/testing.md).
const COLD_BUILD_GIB: u64 = 6;

/// Runs the whole setup.
pub fn run() -> anyhow::Result<()> {
    report_disk();
    let toolchain = ensure_toolchain()?;
    ensure_bpffs()?;
    crate::manifests::ensure_validator()?;
    println!("setup: done (eBPF toolchain: {toolchain})");
    Ok(())
}

/// Says how much space the target dir's filesystem has, and warns when a cold build may not
/// fit: a full disk shows up much later, as a linker killed by SIGBUS.
fn report_disk() {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate::image::repo_root().join("target"));
    // The filesystem it will be on: its nearest existing ancestor's.
    let dir = target
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(crate::image::repo_root());
    let Some(free_kib) = Command::new("df")
        .args(["-Pk", "--"])
        .arg(dir)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            // POSIX format: the second line's fourth field is the space available, in KiB.
            out.lines()
                .nth(1)
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<u64>().ok())
        })
    else {
        println!(
            "setup: could not read the free space under {}",
            dir.display()
        );
        return;
    };
    let free_gib = free_kib / (1024 * 1024);
    println!("setup: {free_gib} GiB free under {}", dir.display());
    if free_gib < COLD_BUILD_GIB {
        println!(
            "setup: WARNING: a cold `cargo xtask test` needs about {COLD_BUILD_GIB} GiB for \
             {}; with less, the build may fail late (a linker killed by SIGBUS or `No space \
             left on device`). Free space or point CARGO_TARGET_DIR elsewhere.",
            target.display()
        );
    }
}

/// Installs what is missing and returns the rustup toolchain that builds the eBPF crate.
pub fn ensure_toolchain() -> anyhow::Result<String> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !which("kubectl") {
        missing.push(KUBECTL_PACKAGE);
    }
    let apt = Path::new("/usr/bin/apt-get").exists();
    if !missing.is_empty() {
        if !apt {
            if nightly_has_rust_src() && which("bpf-linker") {
                println!("setup: no apt-get; using rustup nightly with rust-src");
                return Ok("nightly".into());
            }
            bail!(
                "this is not a Debian machine (no apt-get) and rustup's nightly has no rust-src.\n\
                 Install: `rustup toolchain install nightly --component rust-src` and \
                 `cargo install bpf-linker`, plus squid (with OpenSSL), curl, openssl, iproute2, \
                 nftables, bpftool, runsc (gVisor), dnsmasq, dig, shellcheck, python3 with venv and \
                 kubectl from your distribution; \
                 then run this again."
            );
        }
        if !is_root() {
            bail!(
                "these Debian packages are missing: {}.\nRun `cargo xtask setup` as root, or \
                 install them with `sudo apt-get install -y {}`",
                missing.join(" "),
                missing.join(" ")
            );
        }
        println!("setup: installing {}", missing.join(" "));
        run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        // The squid and nginx packages may start system services; the tests and the bench
        // start their own, inside their namespaces.
        let _ = Command::new("sh")
            .args(["-c", "command -v systemctl >/dev/null && systemctl disable --now squid nginx 2>/dev/null; true"])
            .status();
    }
    if !which("rustup") {
        bail!(
            "rustup is not on PATH: install it from https://rustup.rs (the host crates build with rustup's stable)"
        );
    }
    let toolchain = if Path::new("/usr/lib/rustlib/src/rust/library/Cargo.lock").exists() {
        if !rustup_has_toolchain(DEBIAN_TOOLCHAIN) {
            println!("setup: registering Debian's rustc-web with rustup as `{DEBIAN_TOOLCHAIN}`");
            run_cmd(Command::new("rustup").args(["toolchain", "link", DEBIAN_TOOLCHAIN, "/usr"]))?;
        }
        DEBIAN_TOOLCHAIN.to_string()
    } else if nightly_has_rust_src() {
        "nightly".to_string()
    } else {
        bail!(
            "no Rust library source for the eBPF build: install Debian's `rustc-web rust-web-src \
             cargo-web` (run `cargo xtask setup` as root) or `rustup toolchain install nightly \
             --component rust-src`"
        );
    };
    if !bpf_linker_ok() {
        println!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against llvm-22 (about a minute)"
        );
        run_cmd(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    // Its own lock file: the versions verified with this compiler.
                    "--locked",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22"),
        )?;
    }
    Ok(toolchain)
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there (pins need it).
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
            && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "bpffs is not mounted at /sys/fs/bpf: run as root `mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf`"
        );
    }
    std::fs::create_dir_all("/sys/fs/bpf").context("creating /sys/fs/bpf")?;
    run_cmd(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    println!("setup: mounted bpffs at /sys/fs/bpf");
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
}

fn rustup_has_toolchain(name: &str) -> bool {
    Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name))
        })
}

fn nightly_has_rust_src() -> bool {
    Command::new("rustup")
        .args(["+nightly", "component", "list", "--installed"])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.starts_with("rust-src"))
        })
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether `program` is on PATH.
pub fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // The effective uid, read from /proc (keeps the xtask free of libc).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Runs a command, failing with its command line when it fails.
pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
