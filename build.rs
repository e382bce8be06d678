//! Link-time fixes for libtorch (see DEVELOPERS.md, "Stack").
//!
//! torch-sys links `torch_cuda` like any other library, so under the default `--as-needed` the
//! linker drops it (nothing references its symbols directly: CUDA kernels register themselves from
//! static initialisers) and CUDA is silently unavailable. We re-add it with `--no-as-needed` and
//! embed an rpath to the libtorch we built against, so the binary runs with LD_LIBRARY_PATH unset.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    // torch-sys publishes the lib dir it linked against (its `links = "tch"` metadata).
    let lib = match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(p) => PathBuf::from(p),
        Err(_) => panic!(
            "sdlora: torch-sys did not report a libtorch directory. Run scripts/setup (it installs \
             torch==2.11.0 into a venv and links .libtorch to it) or export LIBTORCH=/path/to/libtorch-2.11"
        ),
    };
    let lib = lib.canonicalize().unwrap_or_else(|_| {
        panic!(
            "sdlora: libtorch lib directory {} does not exist. Run scripts/setup, or export \
             LIBTORCH=/path/to/libtorch-2.11 (the folder holding lib/ and include/)",
            lib.display()
        )
    });
    if !lib.join("libtorch_cpu.so").exists() && !lib.join("libtorch_cpu.dylib").exists() {
        panic!(
            "sdlora: {} holds no libtorch_cpu library. Run scripts/setup or export LIBTORCH to a libtorch 2.11",
            lib.display()
        );
    }
    println!("cargo:rustc-link-search=native={}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
        println!("cargo:rustc-cfg=sdlora_linked_cuda");
    }
    println!("cargo:rustc-check-cfg=cfg(sdlora_linked_cuda)");
    // RUNPATH (new dtags) so a user's LD_LIBRARY_PATH may still override it.
    println!(
        "cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{}",
        lib.display()
    );
    println!("cargo:rustc-env=SDLORA_LIBTORCH_LIB={}", lib.display());
    build_rng_shim(&lib);
    // The version libtorch says it is (build-version in a libtorch zip, version.py in a wheel).
    let root = lib.parent().map(PathBuf::from).unwrap_or_default();
    let version = std::fs::read_to_string(root.join("build-version"))
        .ok()
        .or_else(|| {
            std::fs::read_to_string(root.join("version.py"))
                .ok()
                .and_then(|s| {
                    s.lines().find_map(|l| {
                        l.strip_prefix("__version__ = ")
                            .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string())
                    })
                })
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SDLORA_LIBTORCH_VERSION={}", version.trim());
}

/// csrc/rng_state.cpp: libtorch's default-generator state, which tch does not expose.
fn build_rng_shim(lib: &std::path::Path) {
    println!("cargo:rerun-if-changed=csrc/rng_state.cpp");
    let root = lib.parent().expect("libtorch lib dir has a parent");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .file("csrc/rng_state.cpp")
        .compile("sdlora_rng");
}
