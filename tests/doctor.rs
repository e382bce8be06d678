//! The binary links libtorch (CUDA included when the libtorch has it) and runs with
//! LD_LIBRARY_PATH unset, thanks to build.rs's --no-as-needed and RUNPATH.
use std::process::Command;

fn sdlora() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sdlora"));
    c.env_remove("LD_LIBRARY_PATH");
    c
}

#[test]
fn doctor_runs_without_ld_library_path() {
    let out = sdlora().arg("doctor").output().expect("run sdlora doctor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "doctor failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("libtorch 2.11.0"),
        "doctor output lacks the libtorch version: {stdout}"
    );
    assert!(stdout.contains("CUDA available:"), "{stdout}");
}

#[test]
fn binary_needs_libtorch_cuda_and_has_runpath() {
    let lib = std::path::Path::new(env!("SDLORA_LIBTORCH_LIB"));
    let Ok(out) = Command::new("readelf")
        .arg("-d")
        .arg(env!("CARGO_BIN_EXE_sdlora"))
        .output()
    else {
        eprintln!("readelf not installed; skipping the ELF check");
        return;
    };
    let dynamic = String::from_utf8_lossy(&out.stdout);
    assert!(
        dynamic.contains("RUNPATH"),
        "no RUNPATH in the binary:\n{dynamic}"
    );
    if lib.join("libtorch_cuda.so").exists() {
        assert!(
            dynamic.contains("[libtorch_cuda.so]"),
            "libtorch_cuda.so is not NEEDED:\n{dynamic}"
        );
    }
}

#[test]
fn help_lists_subcommands() {
    let out = sdlora().arg("--help").output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    for sub in ["train", "inspect", "doctor"] {
        assert!(s.contains(sub), "--help lacks {sub}: {s}");
    }
}

#[test]
fn doctor_report_agrees_with_tch() {
    let r = sdlora::doctor::report().unwrap();
    assert_eq!(r.cuda_available, tch::Cuda::is_available());
    assert!(
        r.libtorch_version.starts_with("2.11.0"),
        "{}",
        r.libtorch_version
    );
}
