use which::which;

/// Rebuild when bpf-linker changes, as the aya template does: cargo does not see the linker.
fn main() {
    let bpf_linker = which("bpf-linker")
        .unwrap_or_else(|err| panic!("bpf-linker not found: {err}; run `cargo xtask setup`"));
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
