//! Bakes an rpath to libtorch into every binary so `cargo run` / `cargo test`
//! need no LD_LIBRARY_PATH, and keeps libtorch_cuda linked (the linker's
//! --as-needed would drop it, and CUDA would then look unavailable).
fn main() {
    if let Ok(p) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&p).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        if lib.join("libtorch_cuda.so").exists() {
            println!(
                "cargo:rustc-link-arg=-Wl,--no-as-needed,-L{},-ltorch_cuda,--as-needed",
                lib.display()
            );
        }
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH");
}
