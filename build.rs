//! Checks that the converted spaCy model is in place, compiles the libjpeg
//! shim, and bakes an rpath to libtorch into every binary so `cargo run` / `cargo test`
//! need no LD_LIBRARY_PATH, and keeps libtorch_cuda linked (the linker's
//! --as-needed would drop it, and CUDA would then look unavailable).
fn main() {
    // JPEG decoding: a small C shim over the system's libjpeg-turbo
    // (Debian's libjpeg62-turbo-dev, which scripts/setup.sh installs).
    println!("cargo:rerun-if-changed=src/model/jpeg.c");
    if !std::path::Path::new("/usr/include/jpeglib.h").exists()
        && std::env::var_os("GENECIS_JPEG_INCLUDE").is_none()
    {
        panic!("jpeglib.h (libjpeg-turbo) is missing: run `make setup` (scripts/setup.sh installs Debian's libjpeg62-turbo-dev), or set GENECIS_JPEG_INCLUDE to its folder");
    }
    let mut cc = cc::Build::new();
    cc.file("src/model/jpeg.c").warnings(true);
    if let Some(inc) = std::env::var_os("GENECIS_JPEG_INCLUDE") {
        cc.include(inc);
    }
    cc.compile("genecis_jpeg");
    println!("cargo:rustc-link-lib=jpeg");
    println!("cargo:rerun-if-env-changed=GENECIS_JPEG_INCLUDE");

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
        // libtorch's process groups (src/model/c10d.cpp): its headers, and
        // gloo's, which the wheel does not ship (Debian's libgloo-dev).
        println!("cargo:rerun-if-changed=src/model/c10d.cpp");
        if !std::path::Path::new("/usr/include/gloo/config.h").exists() {
            panic!("gloo's headers (/usr/include/gloo) are missing: run `make setup` (scripts/setup.sh installs Debian's libgloo-dev)");
        }
        let inc = std::path::Path::new(&p).join("include");
        let mut cpp = cc::Build::new();
        cpp.cpp(true)
            .file("src/model/c10d.cpp")
            .include(&inc)
            .include(inc.join("torch/csrc/api/include"));
        // NCCL for CUDA tensors where the CUDA libtorch and the wheels'
        // nccl.h and CUDA headers are there (torch's own pip dependencies).
        println!("cargo::rustc-check-cfg=cfg(genecis_nccl)");
        let nvidia = std::path::Path::new(&p).join("../nvidia");
        let nccl_h = nvidia.join("nccl/include/nccl.h");
        let cuda_inc: Vec<std::path::PathBuf> = std::fs::read_dir(&nvidia)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path().join("include")))
                    .filter(|d| d.is_dir())
                    .collect()
            })
            .unwrap_or_default();
        let has_cuda_rt = cuda_inc
            .iter()
            .any(|d| d.join("cuda_runtime_api.h").exists());
        if std::path::Path::new(&p)
            .join("lib/libtorch_cuda.so")
            .exists()
            && nccl_h.exists()
            && has_cuda_rt
            && std::env::var_os("GENECIS_NO_NCCL").is_none()
        {
            for d in &cuda_inc {
                cpp.include(d);
            }
            cpp.define("USE_C10D_NCCL", None)
                .define("GENECIS_NCCL", None);
            println!("cargo:rustc-cfg=genecis_nccl");
        }
        println!("cargo:rerun-if-env-changed=GENECIS_NO_NCCL");
        cpp.define("USE_C10D_GLOO", None)
            .define("_GLIBCXX_USE_CXX11_ABI", "1")
            .flag("-std=c++17")
            .warnings(false)
            .extra_warnings(false)
            .flag("-w")
            .compile("genecis_c10d");
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
