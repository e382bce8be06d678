//! PyTorch checkpoints (`torch.save` zips) read without running pickle code: tensors equal to what
//! torch.load returns (every dtype SD files use, views, shared storages), a real-world layout with
//! objects of classes that do not exist here, hostile pickles refused naming the global, the
//! legacy format refused, a fuzz run of mutated files giving errors only, and a whole SD
//! checkpoint loading from `.ckpt` exactly as from `.safetensors`.
//! Fixtures: tests/oracles/make_ckpt.py (torch.save / torch.load themselves).
use sdlora::models::ckpt::read_state_dict;
use sdlora::models::loading::{load_checkpoint, LoadOptions, MappedSafetensors};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

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

fn fixtures() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = root().join("target/tmp/ckpt");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new(python())
            .args([
                "scripts/make_sd_checkpoint.py",
                "--config",
                "tiny",
                "--seed",
                "3",
                "--out",
            ])
            .arg(dir.join("sd"))
            .current_dir(root())
            .status()
            .unwrap();
        assert!(ok.success(), "make_sd_checkpoint.py failed");
        let ok = Command::new(python())
            .arg("tests/oracles/make_ckpt.py")
            .arg(&dir)
            .arg("--sd-model")
            .arg(dir.join("sd/model.safetensors"))
            .current_dir(root())
            .status()
            .unwrap();
        assert!(ok.success(), "make_ckpt.py failed");
        dir
    })
}

fn expected(name: &str) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(fixtures().join(format!("{name}.expect.safetensors"))).unwrap()
}

fn check_equal_to_torch_load(file: &str, expect: &str) {
    let path = fixtures().join(file);
    let st = MappedSafetensors::open(&path).unwrap();
    let want = expected(expect);
    let mut names: Vec<&str> = st.names().collect();
    names.sort();
    let mut want_names: Vec<&str> = want.iter().map(|(n, _)| n.as_str()).collect();
    want_names.sort();
    assert_eq!(names, want_names, "{file}: tensor names");
    for (name, w) in &want {
        let got = st.tensor(name).unwrap();
        assert_eq!(got.kind(), w.kind(), "{file}: {name} dtype");
        assert_eq!(got.size(), w.size(), "{file}: {name} shape");
        assert!(got.equal(w), "{file}: {name} values differ from torch.load");
    }
}

#[test]
fn tensors_equal_torch_load_in_a_real_world_layout() {
    // state_dict beside global_step, callbacks of a class that does not exist here, paths,
    // bytes, sets, a 2**80 int, nested lists, optimizer states
    check_equal_to_torch_load("real.ckpt", "real");
    // a bare dict of tensors (pytorch_model.bin style), with a transposed view
    check_equal_to_torch_load("plain.pt", "plain");
}

/// A LoRA saved as a pickle (sd-scripts' `--save_model_as pt`) reads like a safetensors one.
#[test]
fn lora_pickle_loads() {
    let f = sdlora::lora::file::LoraFile::load(&fixtures().join("lora.pt")).unwrap();
    let want = expected("lora");
    assert_eq!(f.tensors.len(), want.len());
    for (n, w) in &want {
        let got = &f.tensors[n];
        assert_eq!(got.kind(), w.kind(), "{n}");
        assert!(got.equal(w), "{n}");
    }
    assert_eq!(f.modules.len(), 2);
}

#[test]
fn hostile_pickles_run_nothing_and_name_the_global() {
    for (file, global) in [
        ("hostile_system.ckpt", "posix.system"),
        // protocol 2 names the builtins module by its Python 2 name
        ("hostile_eval.ckpt", "__builtin__.eval"),
        ("hostile_import.ckpt", "importlib.import_module"),
    ] {
        let e = match MappedSafetensors::open(&fixtures().join(file)) {
            Ok(_) => panic!("{file} was accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            e.contains(file),
            "{file}: the error should name the file: {e}"
        );
        assert!(
            e.contains(global),
            "{file}: the error should name {global}: {e}"
        );
    }
    assert!(!fixtures().join("PWNED").exists());
}

#[test]
fn legacy_format_is_refused_with_advice() {
    let e = match MappedSafetensors::open(&fixtures().join("legacy.ckpt")) {
        Ok(_) => panic!("legacy.ckpt was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("legacy.ckpt") && e.contains("legacy"), "{e}");
}

#[test]
fn a_whole_checkpoint_loads_from_ckpt_as_from_safetensors() {
    let opts = LoadOptions {
        device: Device::Cpu,
        unet_dtype: Kind::Float,
        text_encoder_dtype: Kind::Float,
        vae_dtype: Kind::Float,
        v2: Some(false),
    };
    let a = load_checkpoint(&fixtures().join("sd/model.safetensors"), &opts).unwrap();
    let b = load_checkpoint(&fixtures().join("model.ckpt"), &opts).unwrap();
    assert_eq!(a.version, b.version);
    for (what, x, y) in [
        ("UNet", &a.unet, &b.unet),
        ("text encoder", &a.text_encoder, &b.text_encoder),
        ("VAE", &a.vae, &b.vae),
    ] {
        let kx: Vec<&String> = x.keys().collect();
        let ky: Vec<&String> = y.keys().collect();
        assert_eq!(kx, ky, "{what}: parameter names");
        assert!(!kx.is_empty());
        for k in kx {
            assert!(
                x.get(k).unwrap().equal(y.get(k).unwrap()),
                "{what}: {k} differs between .safetensors and .ckpt"
            );
        }
    }
}

/// A small deterministic generator for the fuzz run (no dependency).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// 1200 truncated or mutated checkpoints: each is an error or a readable file, never a panic,
/// a hang or an unbounded allocation; every tensor of a file that opens can be read.
#[test]
fn fuzzed_checkpoints_give_errors_only() {
    let dir = fixtures().join("fuzz");
    std::fs::create_dir_all(&dir).unwrap();
    let orig = std::fs::read(fixtures().join("real.ckpt")).unwrap();
    // the pickle is the first entry: its bytes start after the 30-byte local header + name
    let pkl_at = orig.windows(8).position(|w| w == b"data.pkl").unwrap() + 8;
    let mut rng = Lcg(20261206);
    let (mut ok, mut err) = (0, 0);
    let t0 = std::time::Instant::now();
    for i in 0..1200 {
        let mut b = orig.clone();
        match i % 4 {
            0 => b.truncate(rng.below(orig.len())),
            1 => {
                // flip bytes inside the pickle, where the interpreter sees them
                for _ in 0..1 + rng.below(4) {
                    let at = pkl_at + rng.below(2200);
                    if at < b.len() {
                        b[at] = rng.next() as u8;
                    }
                }
            }
            2 => {
                // large length fields / indices
                let at = pkl_at + rng.below(2200);
                for k in 0..4 {
                    if at + k < b.len() {
                        b[at + k] = 0xff;
                    }
                }
            }
            _ => {
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(b.len());
                    b[at] = rng.next() as u8;
                }
            }
        }
        // the reader on the bytes, and the loader's full path on a file
        let direct = read_state_dict(Path::new("fuzz.ckpt"), &b);
        let p = dir.join(format!("f{i}.ckpt"));
        std::fs::write(&p, &b).unwrap();
        match MappedSafetensors::open(&p) {
            Ok(st) => {
                assert!(direct.is_ok());
                let names: Vec<String> = st.names().map(String::from).collect();
                for n in names {
                    let _ = st.tensor(&n);
                }
                ok += 1;
            }
            Err(e) => {
                let msg = format!("{e:#}");
                assert!(!msg.is_empty());
                err += 1;
            }
        }
        std::fs::remove_file(&p).unwrap();
    }
    println!(
        "fuzz: {ok} opened, {err} refused, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(err > 0, "mutations should produce errors");
    assert!(t0.elapsed().as_secs() < 120, "fuzz run too slow (a hang?)");
}
