//! Bakes an rpath to libtorch into every binary so `cargo run` / `cargo test`
//! need no LD_LIBRARY_PATH.
fn main() {
    if let Ok(p) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&p).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH");
}
