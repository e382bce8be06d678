//! `sdlora train` end to end on a tiny SD-shaped checkpoint and a tutorial-layout dataset:
//! the tutorial's flags are accepted, the files sd-scripts would write appear, runs are
//! reproducible, a resumed run continues bit-identically, and Ctrl-C leaves only whole files.
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use tch::Tensor;

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

/// Tiny checkpoint + dataset, made once per test binary by the repo's scripts.
fn fixture() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = root().join("target/tmp/train-e2e");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new(python())
            .args([
                "scripts/make_sd_checkpoint.py",
                "--config",
                "tiny",
                "--seed",
                "0",
                "--out",
            ])
            .arg(dir.join("model"))
            .current_dir(root())
            .status()
            .unwrap();
        assert!(ok.success(), "make_sd_checkpoint.py failed");
        let ok = Command::new(python())
            .args(["scripts/make_demo_data.py"])
            .arg(dir.join("dataset"))
            .args(["--count", "3", "--resolution", "64", "--repeats", "2"])
            .current_dir(root())
            .status()
            .unwrap();
        assert!(ok.success(), "make_demo_data.py failed");
        dir
    })
}

/// The tutorial's command, scaled down (64×64, 2 epochs of 6 steps).
fn tutorial_args(out: &Path) -> Vec<String> {
    let f = fixture();
    vec![
        format!(
            "--pretrained_model_name_or_path={}",
            f.join("model/model.safetensors").display()
        ),
        format!(
            "--dataset_config={}",
            f.join("dataset/config.toml").display()
        ),
        format!("--output_dir={}", out.display()),
        "--output_name=zunko".into(),
        "--save_model_as=safetensors".into(),
        "--prior_loss_weight=1.0".into(),
        "--resolution=64,64".into(),
        "--train_batch_size=1".into(),
        "--max_train_epochs=2".into(),
        "--learning_rate=1e-4".into(),
        "--optimizer_type=AdamW8bit".into(),
        "--xformers".into(),
        "--mixed_precision=fp16".into(),
        "--cache_latents".into(),
        "--gradient_checkpointing".into(),
        "--save_every_n_epochs=1".into(),
        "--network_module=networks.lora".into(),
        "--seed=42".into(),
        "--max_data_loader_n_workers=0".into(),
    ]
}

fn sdlora(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdlora"))
        .arg("train")
        .args(args)
        .output()
        .expect("run sdlora")
}

fn out_dir(name: &str) -> PathBuf {
    let d = root().join("target/tmp/train-e2e-runs").join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    let mut t =
        Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

fn assert_same_tensors(a: &Path, b: &Path) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.len(), tb.len());
    for ((na, xa), (nb, xb)) in ta.iter().zip(tb.iter()) {
        assert_eq!(na, nb);
        assert!(
            xa.equal(xb),
            "{na} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn no_temp_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.contains(".tmp"), "temporary file left behind: {n}");
    }
}

#[test]
fn tutorial_command_writes_sd_scripts_files_and_is_reproducible() {
    let out = out_dir("tutorial");
    let o = sdlora(&tutorial_args(&out));
    let log = text(&o);
    assert!(o.status.success(), "sdlora train failed:\n{log}");
    for line in [
        "running training / 学習開始",
        "  num train images * repeats / 学習画像の数×繰り返し回数: 6",
        "  num batches per epoch / 1epochのバッチ数: 6",
        "  num epochs / epoch数: 2",
        "  total optimization steps / 学習ステップ数: 12",
        "epoch 1/2",
        "epoch 2/2",
        "use 8-bit AdamW optimizer",
    ] {
        assert!(
            log.contains(line),
            "missing console line {line:?} in:\n{log}"
        );
    }
    // sd-scripts saves epoch 1 under its epoch name; the last epoch only as the final file
    assert!(out.join("zunko-000001.safetensors").is_file(), "{log}");
    assert!(!out.join("zunko-000002.safetensors").exists());
    let fin = out.join("zunko.safetensors");
    assert!(fin.is_file());
    no_temp_files(&out);
    let file = sdlora::lora::file::LoraFile::load(&fin).unwrap();
    let meta = &file.metadata;
    assert_eq!(meta.get("ss_steps").map(String::as_str), Some("12"));
    assert_eq!(meta.get("ss_epoch").map(String::as_str), Some("2"));
    assert_eq!(meta.get("ss_seed").map(String::as_str), Some("42"));
    assert_eq!(
        meta.get("ss_optimizer").map(String::as_str),
        Some("bitsandbytes.optim.adamw.AdamW8bit")
    );
    // training moved the LoRA away from its init (lora_up starts at zero)
    let ups: Vec<_> = tensors(&fin)
        .into_iter()
        .filter(|(n, _)| n.ends_with("lora_up.weight"))
        .collect();
    assert!(!ups.is_empty());
    assert!(ups
        .iter()
        .any(|(_, t)| t.abs().sum(tch::Kind::Double).double_value(&[]) > 0.0));

    // same seed, same inputs → bit-identical LoRA on CPU
    let out2 = out_dir("tutorial-again");
    let o2 = sdlora(&tutorial_args(&out2));
    assert!(o2.status.success(), "{}", text(&o2));
    assert_same_tensors(&fin, &out2.join("zunko.safetensors"));
}

#[test]
fn resume_continues_bit_identically() {
    let straight = out_dir("straight");
    let mut args = tutorial_args(&straight);
    args.push("--save_state".into());
    let o = sdlora(&args);
    assert!(o.status.success(), "{}", text(&o));
    let state = straight.join("zunko-000001-state");
    assert!(state.is_dir(), "no epoch state dir: {}", text(&o));

    let resumed = out_dir("resumed");
    let mut args = tutorial_args(&resumed);
    args.push(format!("--resume={}", state.display()));
    let o = sdlora(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert_same_tensors(
        &straight.join("zunko.safetensors"),
        &resumed.join("zunko.safetensors"),
    );
}

#[test]
fn unknown_flags_are_listed_together() {
    let out = out_dir("bad-flags");
    let mut args = tutorial_args(&out);
    args.push("--no_such_flag=1".into());
    args.push("--another_bogus".into());
    let o = sdlora(&args);
    assert!(!o.status.success());
    let log = text(&o);
    assert!(
        log.contains("no_such_flag") && log.contains("another_bogus"),
        "{log}"
    );
    assert!(!out.join("zunko.safetensors").exists());
}

/// Inputs sd-scripts stops on (or would train wrongly with) are refused with the flag or folder
/// named, before the checkpoint is read.
#[test]
fn bad_inputs_are_named_before_models_load() {
    let empty = root().join("target/tmp/train-e2e-runs/empty-subset");
    let _ = std::fs::remove_dir_all(&empty);
    std::fs::create_dir_all(empty.join("imgs")).unwrap();
    std::fs::write(empty.join("imgs/notes.txt"), "a caption without an image").unwrap();
    let cfg = empty.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = '{}'\n  num_repeats = 2\n  [[datasets.subsets]]\n  image_dir = '{}'\n",
            empty.join("imgs").display(),
            empty.join("missing").display()
        ),
    )
    .unwrap();
    let cases: Vec<(&str, Vec<String>, Vec<String>)> = vec![
        (
            "negative lr",
            vec!["--learning_rate=-1".into()],
            vec!["--learning_rate=-1.0".into(), "negative".into()],
        ),
        (
            "negative unet lr",
            vec!["--unet_lr=-0.001".into()],
            vec!["--unet_lr=-0.001".into()],
        ),
        (
            "zero lr",
            vec!["--learning_rate=0".into()],
            vec!["--learning_rate=0.0".into(), "nothing to train".into()],
        ),
        (
            "zero lr, unet only",
            vec![
                "--learning_rate=1e-4".into(),
                "--unet_lr=0".into(),
                "--network_train_unet_only".into(),
            ],
            vec!["--unet_lr=0.0".into(), "nothing to train".into()],
        ),
        (
            "Lion lr 0",
            vec![
                "--optimizer_type=Lion".into(),
                "--learning_rate=0".into(),
                "--unet_lr=1e-4".into(),
            ],
            vec!["Lion".into(), "--learning_rate=0.0".into()],
        ),
        (
            "rank 0",
            vec!["--network_dim=0".into()],
            vec!["--network_dim=0".into()],
        ),
        (
            "empty image_dir",
            vec![format!("--dataset_config={}", cfg.display())],
            vec![
                format!(
                    "image_dir '{}' holds no image files",
                    empty.join("imgs").display()
                ),
                format!(
                    "image_dir '{}' is not a directory",
                    empty.join("missing").display()
                ),
            ],
        ),
    ];
    for (name, extra, want) in cases {
        let out = out_dir(&format!("bad-{}", name.replace(' ', "-").replace(',', "")));
        let mut args: Vec<String> = tutorial_args(&out)
            .into_iter()
            .filter(|a| {
                !(extra.iter().any(|e| e.starts_with("--dataset_config"))
                    && a.starts_with("--dataset_config"))
            })
            .collect();
        args.extend(extra.iter().cloned());
        let o = sdlora(&args);
        let log = text(&o);
        assert!(!o.status.success(), "{name}: should be refused:\n{log}");
        for w in &want {
            assert!(
                log.contains(w.as_str()),
                "{name}: error should contain {w:?}:\n{log}"
            );
        }
        assert!(
            !log.contains("load StableDiffusion checkpoint"),
            "{name}: refused only after loading the model:\n{log}"
        );
        assert!(!out.join("zunko.safetensors").exists());
    }
    // A zero learning rate for one part is fine while the other part trains (sd-scripts skips
    // the group): accepted, and it gets past the checks into training.
    let out = out_dir("zero-te-lr");
    let mut args = tutorial_args(&out);
    args.retain(|a| !a.starts_with("--max_train_epochs") && !a.starts_with("--save_every"));
    args.extend(["--max_train_steps=1".into(), "--text_encoder_lr=0".into()]);
    let o = sdlora(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("NO LR skipping!"), "{}", text(&o));
    // rank 0 with conv_dim: sd-scripts trains the 3x3 conv modules only
    let out = out_dir("conv-only");
    let mut args = tutorial_args(&out);
    args.retain(|a| !a.starts_with("--max_train_epochs") && !a.starts_with("--save_every"));
    args.extend(
        [
            "--max_train_steps=1",
            "--network_dim=0",
            "--network_args",
            "conv_dim=2",
        ]
        .map(String::from),
    );
    let o = sdlora(&args);
    assert!(o.status.success(), "{}", text(&o));
    let t = tensors(&out.join("zunko.safetensors"));
    assert!(!t.is_empty());
    assert!(
        t.iter()
            .all(|(n, x)| !n.ends_with("lora_down.weight") || x.size()[2..] == [3, 3]),
        "only 3x3 conv modules expected"
    );
}

/// `--save_model_as=ckpt`: the same LoRA as the safetensors run, in a file that
/// `torch.load(weights_only=True)` reads (as sd-scripts' torch.save writes it: no metadata).
#[test]
fn save_model_as_ckpt_is_readable_by_torch_load() {
    let run = |fmt: &str| -> PathBuf {
        let out = out_dir(&format!("save-as-{fmt}"));
        let mut args = tutorial_args(&out);
        args.retain(|a| !a.starts_with("--max_train_epochs") && !a.starts_with("--save_model_as"));
        args.extend([
            "--max_train_steps=2".into(),
            format!("--save_model_as={fmt}"),
        ]);
        let o = sdlora(&args);
        assert!(o.status.success(), "{}", text(&o));
        no_temp_files(&out);
        out.join(format!("zunko.{fmt}"))
    };
    let st = run("safetensors");
    let ck = run("ckpt");
    let via_torch = ck.with_extension("torch.safetensors");
    let ok = Command::new(python())
        .args([
            "-c",
            "import sys, torch; from safetensors.torch import save_file; \
             sd = torch.load(sys.argv[1], weights_only=True); \
             assert type(sd).__name__ == 'OrderedDict', type(sd); \
             save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[2])",
        ])
        .arg(&ck)
        .arg(&via_torch)
        .status()
        .unwrap();
    assert!(
        ok.success(),
        "torch.load(weights_only=True) failed on {}",
        ck.display()
    );
    assert_same_tensors(&st, &via_torch);
}

#[test]
fn sigint_leaves_whole_files_and_a_resumable_state() {
    let out = out_dir("sigint");
    let mut args = tutorial_args(&out);
    args.retain(|a| !a.starts_with("--max_train_epochs"));
    args.push("--max_train_epochs=400".into());
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdlora"))
        .arg("train")
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // wait until training runs (the first epoch file appears), then interrupt
    let t0 = std::time::Instant::now();
    while !out.join("zunko-000001.safetensors").exists() {
        assert!(
            t0.elapsed().as_secs() < 600,
            "training never reached epoch 1"
        );
        if let Ok(Some(s)) = child.try_wait() {
            panic!("sdlora exited early with {s}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let o = child.wait_with_output().unwrap();
    let log = text(&o);
    assert!(
        !o.status.success(),
        "an interrupted run must exit non-zero:\n{log}"
    );
    assert!(
        log.contains("--resume"),
        "the message must say how to resume:\n{log}"
    );
    no_temp_files(&out);
    for e in std::fs::read_dir(&out).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            sdlora::lora::file::LoraFile::load(&p)
                .unwrap_or_else(|e| panic!("{} unreadable: {e}", p.display()));
        }
    }
    let state = out.join("zunko-interrupted-state");
    assert!(state.is_dir(), "{log}");
    // and it resumes: one more epoch after the one it stopped in
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("train_state.json")).unwrap())
            .unwrap();
    let step = st["current_step"].as_i64().unwrap();
    let mut args = tutorial_args(&out);
    args.retain(|a| !a.starts_with("--max_train_epochs"));
    args.push(format!("--max_train_epochs={}", step / 6 + 1));
    args.push(format!("--resume={}", state.display()));
    let o = sdlora(&args);
    assert!(
        o.status.success(),
        "resume from the interrupted state failed:\n{}",
        text(&o)
    );
    assert!(out.join("zunko.safetensors").is_file());
}

/// The `.alpha` dtype and value of a saved file: one Linear module, and one 3×3 conv module.
fn saved_alphas(path: &Path) -> (Value, Value) {
    let t = tensors(path);
    let kind_name = |k: tch::Kind| match k {
        tch::Kind::Int64 => "int64",
        tch::Kind::Float => "float32",
        tch::Kind::Half => "float16",
        tch::Kind::BFloat16 => "bfloat16",
        other => panic!("unexpected alpha dtype {other:?}"),
    };
    let alpha_of = |module: &str| -> Value {
        let (_, a) = t
            .iter()
            .find(|(n, _)| n == &format!("{module}.alpha"))
            .unwrap();
        serde_json::json!([
            kind_name(a.kind()),
            a.to_kind(tch::Kind::Double).double_value(&[])
        ])
    };
    let module_with = |pred: &dyn Fn(&[i64]) -> bool| -> Option<String> {
        t.iter()
            .find(|(n, x)| n.ends_with(".lora_down.weight") && pred(&x.size()))
            .map(|(n, _)| n.trim_end_matches(".lora_down.weight").to_string())
    };
    let linear = module_with(&|s| s.len() == 2).expect("a Linear module");
    let conv = module_with(&|s| s.len() == 4 && s[2] == 3);
    (
        alpha_of(&linear),
        conv.map(|c| alpha_of(&c)).unwrap_or(Value::Null),
    )
}

/// `.alpha` tensors as sd-scripts saves them, for the flag paths that decide their dtype:
/// omitted (int64), given on the command line (float32, even `--network_alpha=1`), 0 (the rank,
/// int64), `--save_precision`, conv_dim without conv_alpha, `--network_weights` (the dtype of
/// the buffers the flags create) and `--dim_from_weights` (the file's alphas as float32).
/// Expected values: tests/oracles/lora_alpha.py (argparse + torch).
#[test]
fn alpha_dtypes_follow_sd_scripts() {
    let base: Vec<String> = tutorial_args(Path::new("/unused"))
        .into_iter()
        .filter(|a| {
            !a.starts_with("--output_dir")
                && !a.starts_with("--max_train_epochs")
                && !a.starts_with("--save_every_n_epochs")
        })
        .chain(["--max_train_steps=1".to_string()])
        .collect();
    let run = |name: &str, extra: &[String]| -> PathBuf {
        let out = out_dir(&format!("alpha-{name}"));
        let mut args = base.clone();
        args.push(format!("--output_dir={}", out.display()));
        args.extend(extra.iter().cloned());
        let o = sdlora(&args);
        assert!(o.status.success(), "{name}: {}", text(&o));
        out.join("zunko.safetensors")
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let omitted = run("omitted", &[]);
    let one = run("one", &s(&["--network_alpha=1"]));
    let mut cases: Vec<(String, Vec<String>, Option<PathBuf>)> = vec![
        ("omitted".into(), vec![], None),
        ("given 1".into(), s(&["--network_alpha=1"]), None),
        (
            "zero".into(),
            s(&["--network_alpha=0", "--network_dim=8"]),
            None,
        ),
        (
            "fp16".into(),
            s(&["--network_alpha=4", "--save_precision=fp16"]),
            None,
        ),
        ("bf16 default".into(), s(&["--save_precision=bf16"]), None),
        ("conv".into(), s(&["--network_args", "conv_dim=2"]), None),
        (
            "conv given".into(),
            s(&[
                "--network_alpha=2",
                "--network_args",
                "conv_dim=2",
                "conv_alpha=1",
            ]),
            None,
        ),
    ];
    for (file, label) in [(&omitted, "int64 file"), (&one, "float32 file")] {
        let w = format!("--network_weights={}", file.display());
        cases.push((
            format!("weights from {label}"),
            vec![w.clone(), "--network_alpha=3".into()],
            Some(file.clone()),
        ));
        cases.push((
            format!("dim_from_weights {label}"),
            vec![w, "--dim_from_weights".into()],
            Some(file.clone()),
        ));
    }
    let mut oracle_in = vec![];
    let mut got = vec![];
    for (i, (name, extra, weights)) in cases.iter().enumerate() {
        let file = match name.as_str() {
            "omitted" => omitted.clone(),
            "given 1" => one.clone(),
            _ => run(&format!("case{i}"), extra),
        };
        let file_alpha = weights.as_ref().map(|w| saved_alphas(w).0);
        oracle_in.push(serde_json::json!({"argv": extra, "file_alpha": file_alpha, "conv": false}));
        got.push((name.clone(), saved_alphas(&file)));
    }
    let mut child = Command::new(python())
        .arg(root().join("tests/oracles/lora_alpha.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&oracle_in).unwrap().as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "oracle failed");
    let want: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    for ((name, (lin, conv)), w) in got.iter().zip(&want) {
        assert_eq!(lin, &w["linear"], "{name}: Linear module alpha");
        assert_eq!(conv, &w["conv"], "{name}: 3x3 conv module alpha");
    }
}
