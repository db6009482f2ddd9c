//! Rebuild the object when bpf-linker changes (an undeclared dependency of the bpf target).
//! Built for the host (as egress-agent's build-dependency, for cache invalidation only) this
//! needs no bpf-linker at all.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
