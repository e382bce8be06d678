//! `sdlora train` end to end on a tiny SD-shaped checkpoint and a tutorial-layout dataset:
//! the tutorial's flags are accepted, the files sd-scripts would write appear, runs are
//! reproducible, a resumed run continues bit-identically, and Ctrl-C leaves only whole files.
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
