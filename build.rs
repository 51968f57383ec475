//! Checks that the converted spaCy model is in place, and bakes an rpath to libtorch into every binary so `cargo run` / `cargo test`
//! need no LD_LIBRARY_PATH, and keeps libtorch_cuda linked (the linker's
//! --as-needed would drop it, and CUDA would then look unavailable).
fn main() {
    // The parse stage embeds the converted spaCy model (scripts/setup.sh).
    let model = std::path::Path::new(".spacy/en_core_web_sm.bin.gz");
    println!("cargo:rerun-if-changed=.spacy/en_core_web_sm.bin.gz");
    if !model.exists() {
        panic!(
            "{} is missing: run `make setup` (scripts/setup.sh installs spaCy's en_core_web_sm into .venv and converts it)",
            model.display()
        );
    }
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
