//! Link the `nodelet` binary with packed relative relocations (DT_RELR, glibc 2.36+, binutils 2.38+): the
//! dynamic loader reads 1.3 MiB of `.rela.dyn` at every start otherwise, and those pages stay resident.
fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
