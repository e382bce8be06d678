//! The LoRA tools (`sdlora merge_lora`, `svd_merge_lora`, `resize_lora`,
//! `extract_lora_from_models`) against tests/oracles/tools_mirror.py — a torch statement of
//! sd-scripts' scripts on state dicts, checked bit-identical against sd-scripts 48d368fa itself
//! (its docstring lists the runs) — on tiny SD1/SD2 checkpoints and LoRAs with linear, 1×1 and
//! 3×3 conv modules, int64/float32/missing alphas, fp32/fp16/bf16 files. The comparison is
//! tests/oracles/compare_tools.py: same keys, shapes, dtypes, metadata (values too, save the date
//! and implementation version), values within 1e-6 relative where the result is arithmetic, and
//! for SVD results the reconstructed deltas `up·down·alpha/rank` within 1e-4 and the same ranks.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn python() -> String {
    std::env::var("SDLORA_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/sdlora/venv/bin/python",
            std::env::var("HOME").unwrap()
        )
    })
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn check(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Tiny checkpoints and LoRA fixtures, made once per test run.
fn fixtures() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = root().join("target/tmp/tools");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (cfg, seed, name, extra) in [
            ("tiny", "3", "sd1a", None),
            ("tiny", "4", "sd1b", None),
            ("tiny-v2", "3", "sd2a", Some("--ckpt")),
            ("tiny-v2", "4", "sd2b", None),
        ] {
            let mut c = Command::new(python());
            c.args([
                "scripts/make_sd_checkpoint.py",
                "--config",
                cfg,
                "--seed",
                seed,
            ])
            .arg("--out")
            .arg(dir.join(name))
            .arg("--no-diffusers")
            .current_dir(root());
            if let Some(e) = extra {
                c.arg(e);
            }
            check(c.output().unwrap(), "make_sd_checkpoint.py");
        }
        check(
            Command::new(python())
                .arg("tests/oracles/make_tool_fixtures.py")
                .arg(dir.join("lora"))
                .args(["--case", "tiny", "--seed", "5"])
                .current_dir(root())
                .output()
                .unwrap(),
            "make_tool_fixtures.py",
        );
        dir
    })
}

fn f(name: &str) -> String {
    fixtures().join(name).display().to_string()
}

/// Runs sd-scripts' tool (the mirror) and sdlora's with the same flags, each writing
/// `<dir>/<case>/<out>`, and returns (expected, got, sdlora's stdout, the mirror's stdout).
fn both(case: &str, out: &str, flags: &[String]) -> (PathBuf, PathBuf, String, String) {
    let base = fixtures().join("runs").join(case);
    let (e, g) = (base.join("expected"), base.join("got"));
    std::fs::create_dir_all(&e).unwrap();
    std::fs::create_dir_all(&g).unwrap();
    let (eo, go) = (e.join(out), g.join(out));
    let mirror = check(
        Command::new(python())
            .arg("tests/oracles/tools_mirror.py")
            .args(flags)
            .arg("--save_to")
            .arg(&eo)
            .current_dir(root())
            .output()
            .unwrap(),
        &format!("tools_mirror.py {flags:?}"),
    );
    let ours = check(
        Command::new(env!("CARGO_BIN_EXE_sdlora"))
            .args(flags)
            .arg("--save_to")
            .arg(&go)
            .output()
            .unwrap(),
        &format!("sdlora {flags:?}"),
    );
    (
        eo,
        go,
        String::from_utf8_lossy(&ours.stdout).into_owned(),
        String::from_utf8_lossy(&mirror.stdout).into_owned(),
    )
}

/// compare_tools.py; panics with its report when the files differ.
fn compare(expected: &Path, got: &Path, extra: &[&str]) {
    let out = Command::new(python())
        .arg("tests/oracles/compare_tools.py")
        .arg(expected)
        .arg(got)
        .args(extra)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} differs from {}:\n{}{}",
        got.display(),
        expected.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn args(s: &[&str]) -> Vec<String> {
    s.iter().map(|x| x.to_string()).collect()
}

#[test]
fn resize_lora_matches_sd_scripts() {
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "resize_plain",
            args(&[
                "resize_lora",
                "--model",
                &f("lora/a.safetensors"),
                "--new_rank",
                "2",
                "--new_conv_rank",
                "3",
                "--verbose",
            ]),
        ),
        (
            "resize_fro",
            args(&[
                "resize_lora",
                "--model",
                &f("lora/d.safetensors"),
                "--new_rank",
                "8",
                "--dynamic_method",
                "sv_fro",
                "--dynamic_param",
                "0.9",
                "--verbose",
            ]),
        ),
        (
            "resize_ratio",
            args(&[
                "resize_lora",
                "--model",
                &f("lora/c.safetensors"),
                "--new_rank",
                "8",
                "--dynamic_method",
                "sv_ratio",
                "--dynamic_param",
                "4",
            ]),
        ),
        (
            "resize_cumulative",
            args(&[
                "resize_lora",
                "--model",
                &f("lora/b.safetensors"),
                "--new_rank",
                "6",
                "--dynamic_method",
                "sv_cumulative",
                "--dynamic_param",
                "0.5",
            ]),
        ),
    ];
    for (case, flags) in cases {
        let (e, g, ours, theirs) = both(case, "out.safetensors", &flags);
        // factor signs are arbitrary: reconstructed deltas, ranks, metadata (hashes excluded)
        compare(&e, &g, &["--svd"]);
        if flags.iter().any(|a| a == "--verbose") {
            // the per-module report; `max(S) ratio` divides by the smallest kept singular value,
            // which beyond a LoRA's own rank is float noise in sd-scripts' full SVD
            let mask = |s: &str| -> Vec<String> {
                s.lines()
                    .map(|l| match l.find("max(S) ratio:") {
                        Some(i) => {
                            let rest = &l[i..];
                            let tail = rest.find(',').map(|j| &rest[j..]).unwrap_or("");
                            format!("{}max(S) ratio: _{tail}", &l[..i])
                        }
                        None => l.to_string(),
                    })
                    .collect()
            };
            assert_eq!(mask(&ours), mask(&theirs), "{case}: --verbose report");
            assert!(ours.contains("Average Frobenius norm retention:"));
        }
    }
    // a pickle in and out, fp16 saved
    let (e, g, _, _) = both(
        "resize_ckpt",
        "out.ckpt",
        &args(&[
            "resize_lora",
            "--model",
            &f("lora/a.ckpt"),
            "--new_rank",
            "4",
            "--save_precision",
            "fp16",
        ]),
    );
    compare(&e, &g, &["--svd", "--tol", "2e-3"]);
}

#[test]
fn svd_merge_lora_matches_sd_scripts_bit_for_bit() {
    let (e, g, _, _) = both(
        "svd_merge",
        "out.safetensors",
        &args(&[
            "svd_merge_lora",
            "--models",
            &f("lora/a.safetensors"),
            &f("lora/b.safetensors"),
            &f("lora/d.safetensors"),
            "--ratios",
            "0.7",
            "-0.4",
            "1.1",
            "--new_rank",
            "6",
            "--new_conv_rank",
            "3",
            "--save_precision",
            "bf16",
        ]),
    );
    compare(&e, &g, &[]);
    let (e, g, _, _) = both(
        "svd_merge_lbws",
        "out.safetensors",
        &args(&[
            "svd_merge_lora",
            "--models",
            &f("lora/c.safetensors"),
            &f("lora/a.ckpt"),
            "--ratios",
            "1",
            "0.5",
            "--lbws",
            "[1,0,0.5,1,1,1,1,1,0.2,1,1,1]",
            "[1,1,1,1,1,1,1,1,1,1,1,0]",
            "--new_rank",
            "4",
            "--no_metadata",
        ]),
    );
    compare(&e, &g, &[]);
}

#[test]
fn merge_lora_of_loras_matches_sd_scripts() {
    for (case, out, flags) in [
        (
            "merge_sum",
            "out.safetensors",
            args(&[
                "merge_lora",
                "--models",
                &f("lora/a.safetensors"),
                &f("lora/c.safetensors"),
                "--ratios",
                "0.7",
                "-0.5",
            ]),
        ),
        (
            "merge_concat",
            "out.safetensors",
            args(&[
                "merge_lora",
                "--models",
                &f("lora/a.safetensors"),
                &f("lora/e.safetensors"),
                "--ratios",
                "0.7",
                "0.5",
                "--concat",
                "--precision",
                "fp16",
                "--save_precision",
                "bf16",
            ]),
        ),
        (
            "merge_missing_alpha",
            "out.safetensors",
            args(&[
                "merge_lora",
                "--models",
                &f("lora/d.safetensors"),
                "--ratios",
                "1.3",
                "--no_metadata",
            ]),
        ),
        (
            "merge_ckpt",
            "out.ckpt",
            args(&[
                "merge_lora",
                "--models",
                &f("lora/a.ckpt"),
                &f("lora/e.safetensors"),
                "--ratios",
                "1",
                "1",
                "--concat",
            ]),
        ),
    ] {
        let (e, g, _, _) = both(case, out, &flags);
        compare(&e, &g, &[]);
    }
    // --shuffle permutes the rank components: the deltas are unchanged
    let (e, g, _, _) = both(
        "merge_shuffle",
        "out.safetensors",
        &args(&[
            "merge_lora",
            "--models",
            &f("lora/c.safetensors"),
            &f("lora/a.safetensors"),
            "--ratios",
            "1",
            "0.5",
            "--shuffle",
        ]),
    );
    compare(&e, &g, &["--svd", "--tol", "1e-6"]);
}

#[test]
fn merge_lora_into_checkpoints_matches_sd_scripts() {
    let (e, g, _, _) = both(
        "merge_into_sd1",
        "model.safetensors",
        &args(&[
            "merge_lora",
            "--sd_model",
            &f("sd1a/model.safetensors"),
            "--models",
            &f("lora/a.safetensors"),
            &f("lora/c.safetensors"),
            "--ratios",
            "0.8",
            "-0.6",
            "--save_precision",
            "fp16",
        ]),
    );
    compare(&e, &g, &["--all-tensors"]);
    // SD2: q/k/v LoRAs land in thirds of OpenCLIP's fused in_proj; pickle in and out
    let (e, g, _, _) = both(
        "merge_into_sd2",
        "model.ckpt",
        &args(&[
            "merge_lora",
            "--v2",
            "--sd_model",
            &f("sd2a/model.ckpt"),
            "--models",
            &f("lora/b.safetensors"),
            "--ratios",
            "1.2",
            "--save_precision",
            "bf16",
        ]),
    );
    compare(&e, &g, &["--all-tensors"]);
}

#[test]
fn extract_lora_from_models_matches_sd_scripts_bit_for_bit() {
    for (case, flags) in [
        (
            "extract_conv",
            args(&[
                "extract_lora_from_models",
                "--model_org",
                &f("sd1a/model.safetensors"),
                "--model_tuned",
                &f("sd1b/model.safetensors"),
                "--dim",
                "4",
                "--conv_dim",
                "2",
            ]),
        ),
        // a text encoder that moved less than --min_diff is left out
        (
            "extract_unet_only",
            args(&[
                "extract_lora_from_models",
                "--model_org",
                &f("sd1a/model.safetensors"),
                "--model_tuned",
                &f("sd1b/model.safetensors"),
                "--dim",
                "3",
                "--min_diff",
                "1000",
                "--save_precision",
                "fp16",
            ]),
        ),
        (
            "extract_sd2",
            args(&[
                "extract_lora_from_models",
                "--v2",
                "--model_org",
                &f("sd2a/model.safetensors"),
                "--model_tuned",
                &f("sd2b/model.safetensors"),
                "--dim",
                "4",
                "--clamp_quantile",
                "0.9",
            ]),
        ),
    ] {
        let (e, g, _, _) = both(case, "out.safetensors", &flags);
        compare(&e, &g, &[]);
    }
}

/// Runs sdlora expecting failure; returns stderr.
fn fails(flags: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sdlora"))
        .args(flags)
        .output()
        .unwrap();
    assert!(!out.status.success(), "sdlora {flags:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_inputs_are_named_before_anything_is_written() {
    let dir = fixtures().join("runs/bad");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out.safetensors");
    let o = out.display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            args(&[
                "merge_lora",
                "--models",
                &f("lora/a.safetensors"),
                &f("lora/c.safetensors"),
                "--ratios",
                "1",
                "--save_to",
                &o,
            ]),
            "--ratios",
        ),
        (
            args(&[
                "merge_lora",
                "--models",
                &f("lora/nope.safetensors"),
                "--ratios",
                "1",
                "--save_to",
                &o,
            ]),
            "nope.safetensors",
        ),
        // an SD1-named LoRA with modules an SD2 tiny model lacks is refused, naming a module
        (
            args(&[
                "merge_lora",
                "--sd_model",
                &f("sd1a/model.safetensors"),
                "--v2",
                "--models",
                &f("lora/a.safetensors"),
                "--ratios",
                "1",
                "--save_to",
                &o,
            ]),
            "remove --v2",
        ),
        (
            args(&[
                "merge_lora",
                "--sd_model",
                &f("sd1a/model.safetensors"),
                "--models",
                &f("sd1b/model.safetensors"),
                "--ratios",
                "1",
                "--save_to",
                &o,
            ]),
            "lora_down",
        ),
        (
            args(&[
                "merge_lora",
                "--models",
                &f("lora/a.safetensors"),
                &f("lora/b.safetensors"),
                "--ratios",
                "1",
                "1",
                "--save_to",
                &o,
            ]),
            "--concat",
        ),
        (
            args(&["resize_lora", "--new_rank", "4", "--save_to", &o]),
            "--model",
        ),
        (
            args(&[
                "resize_lora",
                "--model",
                &f("lora/a.safetensors"),
                "--dynamic_method",
                "sv_fro",
                "--save_to",
                &o,
            ]),
            "--dynamic_param",
        ),
        (
            args(&[
                "resize_lora",
                "--model",
                &f("lora/a.safetensors"),
                "--save_to",
                &dir.join("out.txt").display().to_string(),
            ]),
            ".safetensors",
        ),
        (
            args(&[
                "svd_merge_lora",
                "--models",
                &f("lora/a.safetensors"),
                "--ratios",
                "1",
                "--lbws",
                "[1,2,3]",
                "--save_to",
                &o,
            ]),
            "12, 17, 20 or 26",
        ),
        (
            args(&[
                "extract_lora_from_models",
                "--sdxl",
                "--model_org",
                &f("sd1a/model.safetensors"),
                "--model_tuned",
                &f("sd1b/model.safetensors"),
                "--save_to",
                &o,
            ]),
            "--sdxl",
        ),
        (
            args(&[
                "extract_lora_from_models",
                "--model_org",
                &f("sd1a/model.safetensors"),
                "--model_tuned",
                &f("sd2b/model.safetensors"),
                "--save_to",
                &o,
            ]),
            "pass --v2",
        ),
        (
            args(&["resize_lora", "--modle", "x", "--save_to", &o]),
            "--modle",
        ),
    ];
    // a truncated download and a file that is not a model at all
    let bytes = std::fs::read(fixtures().join("lora/a.safetensors")).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let junk = dir.join("junk.ckpt");
    std::fs::write(&junk, b"PK\x03\x04 this is not a zip").unwrap();
    let (c, j) = (cut.display().to_string(), junk.display().to_string());
    let mut cases = cases;
    for tool in [
        &["resize_lora", "--model", &c][..],
        &["svd_merge_lora", "--models", &c, "--ratios", "1"][..],
        &["merge_lora", "--models", &j, "--ratios", "1"][..],
        &[
            "merge_lora",
            "--sd_model",
            &c,
            "--models",
            &f("lora/a.safetensors"),
            "--ratios",
            "1",
        ][..],
        &[
            "extract_lora_from_models",
            "--model_org",
            &j,
            "--model_tuned",
            &f("sd1b/model.safetensors"),
        ][..],
    ] {
        let mut a = args(tool);
        a.extend(args(&["--save_to", &o]));
        let needle = if tool.contains(&j.as_str()) {
            "junk.ckpt"
        } else {
            "cut.safetensors"
        };
        cases.push((a, needle));
    }
    for (flags, needle) in cases {
        let err = fails(&flags);
        assert!(
            err.contains(needle),
            "sdlora {flags:?}: the error should mention {needle:?}:\n{err}"
        );
        assert!(
            !out.exists(),
            "sdlora {flags:?} wrote {o} although it failed"
        );
    }
    // nothing half-written either
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
