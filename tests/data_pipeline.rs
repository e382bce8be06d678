//! The data pipeline against scripts/data_reference.py (sd-scripts' rules with Python's random,
//! torch's DataLoader, PIL and OpenCV): streams, bucket lists and assignment, printed lines,
//! visiting order for seeds 0/42/1234 over 3 epochs, pixels, and latent-cache interchange.
use sdlora::data::dataset::build_dataset_group_with_log;
use sdlora::data::loader::{visiting_order, Loader};
use sdlora::data::npz::{read_npz, NpyArray};
use sdlora::data::{
    DataArgs, DataLog, GlobalTorchSeeds, LatentEncoder, PyRandom, TorchCpuGenerator,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use tch::{Kind, Tensor};

/// libtorch's global generator is process-wide; tests that seed it run one at a time.
static TORCH_RNG: Mutex<()> = Mutex::new(());

fn python() -> String {
    std::env::var("SDLORA_PYTHON").unwrap_or_else(|_| "/root/.cache/sdlora/venv/bin/python".into())
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/data_reference.py")
}

fn py(args: &[&str]) -> Value {
    let out = Command::new(python())
        .arg(script())
        .args(args)
        .output()
        .expect("run python reference");
    assert!(
        out.status.success(),
        "reference {:?} failed: {}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference JSON")
}

/// The generated folders, made once per test binary.
fn fixture() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("sdlora-data-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        py(&["fixture", root.to_str().unwrap()]);
        root
    })
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn config_a(root: &Path) -> PathBuf {
    let p = root.join("config_a.toml");
    write(
        &p,
        &format!(
            r#"[general]
enable_bucket = true
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"

[[datasets]]
resolution = 256
batch_size = 2
min_bucket_reso = 128
max_bucket_reso = 512

  [[datasets.subsets]]
  image_dir = "{r}/data"
  class_tokens = "zko"
  num_repeats = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = "{r}/reg"
  class_tokens = "woman"
  num_repeats = 1
"#,
            r = root.display()
        ),
    );
    p
}

fn config_b(root: &Path) -> PathBuf {
    let p = root.join("config_b.toml");
    write(
        &p,
        &format!(
            r#"[general]
caption_extension = ".txt"
flip_aug = true

[[datasets]]
resolution = 256
enable_bucket = true
bucket_no_upscale = true

  [[datasets.subsets]]
  image_dir = "{r}/data"
  class_tokens = "zko"
  num_repeats = 2

[[datasets]]
resolution = [320, 256]
batch_size = 3
enable_bucket = true
min_bucket_reso = 192
max_bucket_reso = 640
random_crop = true
caption_tag_dropout_rate = 0.3

  [[datasets.subsets]]
  image_dir = "{r}/data2"
  num_repeats = 4
"#,
            r = root.display()
        ),
    );
    p
}

fn config_d(root: &Path) -> PathBuf {
    let md = root.join("meta.json");
    write(
        &md,
        r#"{"a.png": {"caption": "scene a", "tags": "tree, sky"}, "b.png": {"tags": "house", "image_size": [190, 250]}, "c.webp": {"caption": "scene c"}}"#,
    );
    let p = root.join("config_d.toml");
    write(
        &p,
        &format!(
            r#"[general]
enable_bucket = true
min_bucket_reso = 128
max_bucket_reso = 512
flip_aug = true

[[datasets]]
resolution = 256
batch_size = 2
shuffle_caption = true

  [[datasets.subsets]]
  image_dir = "{r}/data2"
  metadata_file = "{md}"
  num_repeats = 3

[[datasets]]
resolution = 192
caption_extension = ".txt"

  [[datasets.subsets]]
  image_dir = "{r}/reg"
  class_tokens = "person"
"#,
            r = root.display(),
            md = md.display()
        ),
    );
    p
}

/// A job for the reference and the matching DataArgs.
fn case(name: &str, seed: u64, workers: usize) -> (Value, DataArgs) {
    let root = fixture();
    let mut args = DataArgs {
        seed: Some(seed),
        max_data_loader_n_workers: workers as i64,
        ..Default::default()
    };
    let mut job = serde_json::json!({"seed": seed, "epochs": 3, "workers": workers});
    match name {
        "a" => {
            let c = config_a(root);
            args.dataset_config = Some(c.clone());
            args.prior_loss_weight = 0.5;
            job["dataset_config"] = c.display().to_string().into();
            job["cli"] = serde_json::json!({"prior_loss_weight": 0.5});
        }
        "b" => {
            let c = config_b(root);
            args.dataset_config = Some(c.clone());
            job["dataset_config"] = c.display().to_string().into();
        }
        "d" => {
            let c = config_d(root);
            args.dataset_config = Some(c.clone());
            job["dataset_config"] = c.display().to_string().into();
        }
        "c" => {
            args.train_data_dir = Some(root.join("train"));
            args.reg_data_dir = Some(root.join("regdir"));
            args.resolution = Some((256, 256));
            args.enable_bucket = true;
            args.train_batch_size = 2;
            args.flip_aug = true;
            job["train_data_dir"] = root.join("train").display().to_string().into();
            job["reg_data_dir"] = root.join("regdir").display().to_string().into();
            job["cli"] = serde_json::json!({"resolution": [256, 256], "enable_bucket": true, "batch_size": 2, "flip_aug": true});
        }
        _ => unreachable!(),
    }
    (job, args)
}

fn run_reference(job: &Value, tag: &str) -> Value {
    let p = fixture().join(format!("job_{tag}.json"));
    write(&p, &job.to_string());
    py(&["dataset", p.to_str().unwrap()])
}

fn build(args: &DataArgs) -> sdlora::data::DatasetGroup {
    build_dataset_group_with_log(args, DataLog::new(false), false).expect("build dataset group")
}

fn pair(v: &Value) -> (i64, i64) {
    (v[0].as_i64().unwrap(), v[1].as_i64().unwrap())
}

#[test]
fn python_random_port_matches_cpython() {
    let seeds = [
        "0",
        "1",
        "42",
        "1234",
        "4294967296",
        "-5",
        "123456789012345678901234",
    ];
    let r = py(&[&["random"][..], &seeds[..]].concat());
    for s in seeds {
        let want = &r[s];
        let mut rng = PyRandom::new(s.parse::<i128>().unwrap());
        let f = |v: &Value| v.as_str().unwrap().parse::<f64>().unwrap();
        for x in want["random"].as_array().unwrap() {
            assert_eq!(rng.random(), f(x), "seed {s} random()");
        }
        for x in want["randint_2_31"].as_array().unwrap() {
            assert_eq!(
                rng.randint(0, 1 << 31),
                x.as_i64().unwrap(),
                "seed {s} randint"
            );
        }
        for (k, x) in [1u32, 7, 32, 33, 64, 100]
            .iter()
            .zip(want["getrandbits"].as_array().unwrap())
        {
            assert_eq!(
                rng.getrandbits(*k).to_string(),
                x.as_str().unwrap(),
                "seed {s} getrandbits({k})"
            );
        }
        let mut l: Vec<i64> = (0..23).collect();
        rng.shuffle(&mut l);
        let wl: Vec<i64> = want["shuffle23"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(l, wl, "seed {s} shuffle");
        for x in want["randint_small"].as_array().unwrap() {
            assert_eq!(rng.randint(0, 5), x.as_i64().unwrap());
        }
        for x in want["uniform"].as_array().unwrap() {
            assert_eq!(rng.uniform(-8.0, 8.0), f(x));
        }
        let opts = ["a", "b", "c", "d", "e"];
        for x in want["choice"].as_array().unwrap() {
            assert_eq!(opts[rng.choice_index(5)], x.as_str().unwrap());
        }
    }
}

#[test]
fn sampler_permutation_matches_torch_dataloader() {
    let _g = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let combos: Vec<String> = [0u64, 42, 1234]
        .iter()
        .flat_map(|s| [1usize, 17, 250].map(|n| format!("{s}:{n}")))
        .collect();
    let mut a = vec!["sampler", "3", "0"];
    a.extend(combos.iter().map(|s| s.as_str()));
    let all = py(&a);
    for seed in [0u64, 42, 1234] {
        for n in [1usize, 17, 250] {
            let want = &all[format!("{seed}:{n}")];
            tch::manual_seed(seed as i64);
            let mut seeds = GlobalTorchSeeds;
            for e in 0..3 {
                use sdlora::data::SeedSource;
                let _base = seeds.draw_i64();
                let s = seeds.draw_i64();
                let perm = TorchCpuGenerator::new(s as u64).randperm(n);
                let w: Vec<usize> = want[e]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as usize)
                    .collect();
                assert_eq!(perm, w, "seed {seed} n {n} epoch {}", e + 1);
            }
            let next = Tensor::empty([] as [i64; 0], (Kind::Int64, tch::Device::Cpu))
                .random_()
                .int64_value(&[]);
            assert_eq!(
                next,
                want[3][0].as_i64().unwrap(),
                "generator state after 3 epochs"
            );
        }
    }
}

/// Buckets, assignment, counts and the printed lines of one config.
fn check_structure(name: &str, group: &sdlora::data::DatasetGroup, r: &Value) {
    let want_log: Vec<String> = r["log"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| {
            l.as_str()
                .unwrap()
                .split('\n')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    let got_log = group.log.text_lines();
    for (i, (g, w)) in got_log.iter().zip(&want_log).enumerate() {
        assert_eq!(g, w, "config {name}: log line {i}");
    }
    assert_eq!(
        got_log.len(),
        want_log.len(),
        "config {name}: number of log lines\n{got_log:#?}"
    );
    assert_eq!(
        group.dataset_seed as i64,
        r["dataset_seed"].as_i64().unwrap()
    );
    for (d, (ds, wd)) in group
        .datasets
        .iter()
        .zip(r["datasets"].as_array().unwrap())
        .enumerate()
    {
        let pre: Vec<(i64, i64)> = wd["predefined"]
            .as_array()
            .unwrap()
            .iter()
            .map(pair)
            .collect();
        assert_eq!(
            ds.predefined_resos, pre,
            "config {name} dataset {d}: bucket list"
        );
        let resos: Vec<(i64, i64)> = wd["resos"].as_array().unwrap().iter().map(pair).collect();
        assert_eq!(
            ds.bucket_resos, resos,
            "config {name} dataset {d}: buckets in use"
        );
        let wi = wd["images"].as_array().unwrap();
        assert_eq!(ds.images.len(), wi.len());
        for (info, w) in ds.images.iter().zip(wi) {
            assert_eq!(info.image_key, w["key"].as_str().unwrap());
            assert_eq!(
                info.image_size,
                Some(pair(&w["size"])),
                "{}",
                info.image_key
            );
            assert_eq!(
                info.bucket_reso,
                pair(&w["bucket"]),
                "{}: bucket",
                info.image_key
            );
            assert_eq!(
                info.resized_size,
                pair(&w["resized"]),
                "{}: resized",
                info.image_key
            );
            assert_eq!(
                info.num_repeats as u64,
                w["repeats"].as_u64().unwrap(),
                "{}: repeats",
                info.image_key
            );
            assert_eq!(info.caption, w["caption"].as_str().unwrap());
            assert_eq!(info.is_reg, w["is_reg"].as_bool().unwrap());
        }
        assert_eq!(
            ds.num_train_images as u64,
            wd["num_train_images"].as_u64().unwrap()
        );
        assert_eq!(
            ds.num_reg_images as u64,
            wd["num_reg_images"].as_u64().unwrap()
        );
        assert_eq!(ds.len() as u64, wd["len"].as_u64().unwrap());
    }
}

/// The epochs' batches (keys, flips, offsets, captions, loss weights) against the reference.
fn check_epochs(
    name: &str,
    group: &sdlora::data::DatasetGroup,
    r: &Value,
    seed: u64,
    workers: usize,
    persistent: bool,
) {
    let _g = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed as i64);
    let mut loader = Loader::new(group, workers, persistent, 1);
    let mut seeds = GlobalTorchSeeds;
    for (e, wep) in r["epochs"].as_array().unwrap().iter().enumerate() {
        let plans = loader.plan_epoch(group, e as i64 + 1, &mut seeds).unwrap();
        let order = visiting_order(group, &plans);
        let wb = wep.as_array().unwrap();
        assert_eq!(plans.len(), wb.len());
        for (k, (p, w)) in plans.iter().zip(wb).enumerate() {
            let what = format!(
                "config {name} seed {seed} workers {workers} persistent {persistent} epoch {} batch {k}",
                e + 1
            );
            assert_eq!(p.dataset as u64, w["dataset"].as_u64().unwrap(), "{what}");
            let witems = w["items"].as_array().unwrap();
            let keys: Vec<&str> = witems.iter().map(|i| i["key"].as_str().unwrap()).collect();
            assert_eq!(order[k].1, keys, "{what}: images");
            for (it, wi) in p.items.iter().zip(witems) {
                assert_eq!(it.flipped, wi["flipped"].as_bool().unwrap(), "{what}: flip");
                assert_eq!(
                    (it.offsets.0 as i64, it.offsets.1 as i64),
                    pair(&wi["offsets"]),
                    "{what}: crop offsets"
                );
                assert_eq!(
                    it.caption,
                    wi["caption"].as_str().unwrap(),
                    "{what}: caption"
                );
                assert_eq!(
                    it.loss_weight,
                    wi["loss_weight"].as_f64().unwrap(),
                    "{what}: loss weight"
                );
            }
        }
    }
}

fn structure_and_order(name: &str) {
    // (seed, DataLoader workers, persistent workers)
    let mut cases = vec![];
    for seed in [0u64, 42, 1234] {
        for (workers, persistent) in [(0usize, false), (3, false)] {
            cases.push((seed, workers, persistent));
        }
    }
    cases.push((42, 2, true));
    let jobs: Vec<(Value, DataArgs)> = cases
        .iter()
        .map(|&(seed, workers, persistent)| {
            let (mut job, mut args) = case(name, seed, workers);
            job["persistent"] = persistent.into();
            args.persistent_data_loader_workers = persistent;
            (job, args)
        })
        .collect();
    let all = Value::Array(jobs.iter().map(|j| j.0.clone()).collect());
    let results = run_reference(&all, &format!("order_{name}"));
    for (i, (&(seed, workers, persistent), (_, args))) in cases.iter().zip(&jobs).enumerate() {
        let r = &results[i];
        let group = build(args);
        if i == 0 {
            check_structure(name, &group, r);
        }
        check_epochs(name, &group, r, seed, workers, persistent);
    }
}

#[test]
fn config_a_tutorial_layout_with_reg_images() {
    structure_and_order("a");
}

#[test]
fn config_b_two_datasets_two_resolutions() {
    structure_and_order("b");
}

#[test]
fn config_c_sd_scripts_folders_without_toml() {
    structure_and_order("c");
}

#[test]
fn config_d_fine_tuning_metadata_and_dreambooth() {
    structure_and_order("d");
}

/// Decoded, resized, cropped, flipped pixels of the first epoch against PIL/OpenCV.
#[test]
fn pixels_match_pil_and_opencv() {
    let mut worst = 0i32;
    for name in ["a", "b", "c", "d"] {
        let (mut job, args) = case(name, 42, 0);
        job["epochs"] = 1.into();
        job["pixel_epochs"] = serde_json::json!([1]);
        let npz = fixture().join(format!("pixels_{name}.npz"));
        job["pixels_out"] = npz.display().to_string().into();
        run_reference(&job, &format!("px_{name}"));
        let want = read_npz(&npz).unwrap();
        let group = build(&args);
        let _g = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(42);
        let mut loader = Loader::new(&group, 0, false, 2);
        let mut seeds = GlobalTorchSeeds;
        let mut n = 0;
        for (k, b) in loader
            .epoch(&group, 1, &mut seeds, None)
            .unwrap()
            .enumerate()
        {
            let b = b.unwrap();
            let imgs = b.images.expect("images (latents not cached)");
            for j in 0..imgs.size()[0] {
                let key = format!("e1_b{k}_i{j}");
                let w = &want
                    .iter()
                    .find(|(n, _)| *n == key)
                    .unwrap_or_else(|| panic!("{key} missing"))
                    .1;
                let (h, wd) = (w.shape[0] as i64, w.shape[1] as i64);
                let x = imgs.get(j);
                assert_eq!(x.size(), vec![3, h, wd], "{name} {key} shape");
                // back to 0..255 levels, HWC
                let lv = ((x * 0.5 + 0.5) * 255.0)
                    .round()
                    .permute([1, 2, 0])
                    .contiguous();
                let got: Vec<f32> = Vec::<f32>::try_from(lv.flatten(0, -1)).unwrap();
                let exp = w.to_f32();
                let mut m = 0i32;
                for (g, e) in got.iter().zip(&exp) {
                    m = m.max((*g as i32 - *e as i32).abs());
                }
                assert!(
                    m <= 1,
                    "config {name} {key} ({}): max abs error {m}/255",
                    b.image_keys[j as usize]
                );
                worst = worst.max(m);
                n += 1;
            }
        }
        assert!(n > 0);
        eprintln!("config {name}: {n} samples, worst pixel error so far {worst}/255");
    }
}

#[test]
fn corrupt_image_is_reported_before_training() {
    let root = fixture();
    let p = root.join("config_corrupt.toml");
    write(
        &p,
        &format!(
            "[general]\ncaption_extension = \".txt\"\n[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"{}/corrupt\"\nclass_tokens = \"c\"\n",
            root.display()
        ),
    );
    let args = DataArgs {
        dataset_config: Some(p),
        seed: Some(1),
        cache_latents: true,
        ..Default::default()
    };
    let err = build_dataset_group_with_log(&args, DataLog::new(false), false)
        .err()
        .expect("must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("corrupt/bad.png"), "{msg}");
}

/// A stand-in VAE: 8x8 average pooling, 3 channels plus their mean.
struct PoolEncoder;

impl LatentEncoder for PoolEncoder {
    fn encode(&self, images: &Tensor) -> anyhow::Result<Tensor> {
        let p = images.avg_pool2d([8, 8], [8, 8], [0, 0], false, true, None::<i64>);
        let m = p.mean_dim(1, true, Kind::Float);
        Ok(Tensor::cat(&[p, m], 1))
    }
}

#[test]
fn latent_caches_interchange_with_numpy() {
    let root = fixture();
    // sdlora writes: caches load in numpy with sd-scripts' keys
    let dir = root.join("npzcase");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["zko (1).png", "zko (1).txt", "zko (4).webp"] {
        std::fs::copy(root.join("data").join(f), dir.join(f)).unwrap();
    }
    let cfg = root.join("config_npz.toml");
    write(
        &cfg,
        &format!(
            "[general]\ncaption_extension = \".txt\"\nflip_aug = true\n[[datasets]]\nresolution = 256\nenable_bucket = true\nmin_bucket_reso = 128\nmax_bucket_reso = 512\n[[datasets.subsets]]\nimage_dir = \"{}\"\nclass_tokens = \"zko\"\n",
            dir.display()
        ),
    );
    let args = DataArgs {
        dataset_config: Some(cfg),
        seed: Some(3),
        cache_latents: true,
        cache_latents_to_disk: true,
        vae_batch_size: 2,
        ..Default::default()
    };
    let mut group = build(&args);
    sdlora::data::cache_latents(&mut group, &PoolEncoder, false).unwrap();
    let info = &group.datasets[0].images[0];
    let npz = info.latents_npz.clone().unwrap();
    assert!(
        npz.to_string_lossy().ends_with("zko (1)_0300x0200_sd.npz"),
        "{}",
        npz.display()
    );
    let r = py(&["npz-read", npz.to_str().unwrap()]);
    assert_eq!(r["latents"]["dtype"], "float32");
    let (bw, bh) = info.bucket_reso;
    assert_eq!(
        r["latents"]["shape"],
        serde_json::json!([4, bh / 8, bw / 8])
    );
    assert_eq!(
        r["latents_flipped"]["shape"],
        serde_json::json!([4, bh / 8, bw / 8])
    );
    assert_eq!(r["original_size"]["head"], serde_json::json!([300, 200]));
    assert_eq!(r["original_size"]["dtype"], "int64");
    assert_eq!(r["crop_ltrb"]["dtype"], "float64");
    // the values numpy reads are the encoder's output for the trimmed image
    let px = sdlora::data::image::load_image_rgb(&info.absolute_path).unwrap();
    let img = sdlora::data::image::trim_and_resize(
        &px,
        (bw as usize, bh as usize),
        (info.resized_size.0 as usize, info.resized_size.1 as usize),
        sdlora::data::image::trim_offsets(
            (info.resized_size.0 as usize, info.resized_size.1 as usize),
            (bw as usize, bh as usize),
            false,
            &mut |_, _| 0,
        ),
        None,
    )
    .unwrap();
    let x = Tensor::from_slice(&img.to_chw_normalized()).view([1, 3, bh, bw]);
    let l = PoolEncoder.encode(&x).unwrap();
    let head: Vec<f32> = Vec::<f32>::try_from(l.flatten(0, -1).narrow(0, 0, 16)).unwrap();
    let np_head: Vec<f32> = r["latents"]["head"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(head, np_head);

    // numpy writes (as sd-scripts does): sdlora's loader serves those latents
    let dir2 = root.join("npzcase2");
    let _ = std::fs::remove_dir_all(&dir2);
    std::fs::create_dir_all(&dir2).unwrap();
    std::fs::copy(root.join("data").join("zko (4).webp"), dir2.join("p.webp")).unwrap();
    let w = py(&[
        "npz-write",
        dir2.join("p_0200x0300_sd.npz").to_str().unwrap(),
    ]);
    let cfg2 = root.join("config_npz2.toml");
    write(
        &cfg2,
        &format!(
            "[general]\nflip_aug = true\n[[datasets]]\nresolution = 256\nenable_bucket = true\nmin_bucket_reso = 128\nmax_bucket_reso = 512\n[[datasets.subsets]]\nimage_dir = \"{}\"\nclass_tokens = \"p\"\n",
            dir2.display()
        ),
    );
    let args2 = DataArgs {
        dataset_config: Some(cfg2),
        seed: Some(5),
        cache_latents: true,
        cache_latents_to_disk: true,
        ..Default::default()
    };
    let mut g2 = build(&args2);
    struct Never;
    impl LatentEncoder for Never {
        fn encode(&self, _: &Tensor) -> anyhow::Result<Tensor> {
            panic!("a valid cache must not be re-encoded");
        }
    }
    sdlora::data::cache_latents(&mut g2, &Never, false).unwrap();
    let _g = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(0);
    let mut loader = Loader::new(&g2, 0, false, 1);
    let b = loader
        .epoch(&g2, 1, &mut GlobalTorchSeeds, None)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let lat = b.latents.expect("latents from the numpy cache");
    assert_eq!(lat.size(), vec![1, 4, 32, 24]);
    let key = if b.flipped[0] {
        "latents_flipped"
    } else {
        "latents"
    };
    let head: Vec<f32> = Vec::<f32>::try_from(lat.flatten(0, -1).narrow(0, 0, 16)).unwrap();
    let want: Vec<f32> = w[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(head, want);
    let _ = NpyArray::f32(vec![1], vec![0.0]);
}

/// The worker model the loader replays, checked against the real torch DataLoader with worker
/// processes: batch k goes to worker k % W (from worker 0 every epoch), each worker's Python
/// RNG is seeded with base_seed + worker id, and persistent workers keep their RNG while the base
/// seed is drawn only once.
#[test]
fn dataloader_worker_model_matches_torch() {
    use sdlora::data::SeedSource;
    let _g = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (n, epochs, w) = (7usize, 3usize, 3usize);
    for seed in [0u64, 42] {
        for persistent in [false, true] {
            let want = py(&[
                "worker-probe",
                &seed.to_string(),
                &n.to_string(),
                &epochs.to_string(),
                &w.to_string(),
                if persistent { "1" } else { "0" },
            ]);
            tch::manual_seed(seed as i64);
            let mut seeds = GlobalTorchSeeds;
            let mut rngs: Vec<PyRandom> = vec![];
            for e in 0..epochs {
                if !persistent || e == 0 {
                    let base = seeds.draw_i64() as i128;
                    rngs = (0..w).map(|i| PyRandom::new(base + i as i128)).collect();
                }
                let s = seeds.draw_i64();
                let perm = TorchCpuGenerator::new(s as u64).randperm(n);
                for (k, b) in want[e].as_array().unwrap().iter().enumerate() {
                    let what = format!(
                        "seed {seed} persistent {persistent} epoch {} batch {k}",
                        e + 1
                    );
                    assert_eq!(b[0].as_u64().unwrap() as usize, perm[k], "{what}: index");
                    assert_eq!(b[1].as_u64().unwrap() as usize, k % w, "{what}: worker");
                    let r: f64 = b[2].as_str().unwrap().parse().unwrap();
                    assert_eq!(rngs[k % w].random(), r, "{what}: worker's Python RNG");
                }
            }
        }
    }
}

/// sd-scripts starts `min(--max_data_loader_n_workers, os.cpu_count())` workers, and Python's
/// count ignores the CPUs a process is confined to. Confine this thread (and the Python started
/// from it) to one CPU, as `taskset` or a container quota does: sdlora must still count what
/// Python counts, not the one CPU it may use.
#[test]
fn worker_count_follows_python_cpu_count_under_affinity() {
    let h = std::thread::spawn(|| {
        // SAFETY: a zeroed cpu_set_t is valid; CPU_ISSET/CPU_SET stay inside it; pid 0 = this
        // thread. Pin to the first CPU this thread may use (CPU 0 may be outside a cpuset).
        unsafe {
            let mut allowed: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            assert_eq!(libc::sched_getaffinity(0, size, &mut allowed), 0);
            let first = (0..libc::CPU_SETSIZE as usize)
                .find(|&c| libc::CPU_ISSET(c, &allowed))
                .expect("an allowed CPU");
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(first, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
                0,
                "sched_setaffinity"
            );
        }
        let out = Command::new(python())
            .args([
                "-c",
                "import os; print(os.cpu_count(), len(os.sched_getaffinity(0)))",
            ])
            .output()
            .expect("python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let v: Vec<usize> = text
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        (
            v[0],
            v[1],
            sdlora::data::loader::python_cpu_count(),
            sdlora::data::loader::effective_workers(8),
            sdlora::data::loader::usable_cpus(),
        )
    });
    let (py_count, py_affinity, ours, workers, usable) = h.join().unwrap();
    assert_eq!(
        py_affinity, 1,
        "the Python child should inherit the one-CPU affinity"
    );
    assert_eq!(usable, 1, "this thread may use one CPU");
    assert_eq!(ours, py_count, "os.cpu_count()");
    assert_eq!(
        workers,
        8.min(py_count),
        "sd-scripts' default DataLoader worker count"
    );
    if py_count < 2 {
        eprintln!("note: one online CPU; the affinity case cannot differ here");
    }
}

/// Throughput of the background decoding (run with --ignored --nocapture): batches per second
/// with 1 and 2 threads while the consumer "trains" for a fixed time per step.
#[test]
#[ignore]
fn loader_throughput() {
    let root = fixture().join("throughput");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    for i in 0..24 {
        let img = image::RgbImage::from_fn(1024, 768, |x, y| {
            image::Rgb([(x + i) as u8, (y * 3) as u8, ((x ^ y) & 255) as u8])
        });
        img.save(root.join(format!("{i:02}.jpg"))).unwrap();
    }
    let cfg = fixture().join("config_tp.toml");
    write(
        &cfg,
        &format!(
            "[[datasets]]\nresolution = 512\nenable_bucket = true\n[[datasets.subsets]]\nimage_dir = \"{}\"\nclass_tokens = \"t\"\n",
            root.display()
        ),
    );
    let args = DataArgs {
        dataset_config: Some(cfg),
        seed: Some(1),
        ..Default::default()
    };
    let group = build(&args);
    {
        use sdlora::data::image::*;
        let p = root.join("00.jpg");
        let t = std::time::Instant::now();
        let img = load_image_rgb(&p).unwrap();
        let t_load = t.elapsed();
        let t = std::time::Instant::now();
        check_image(&p).unwrap();
        let t_check = t.elapsed();
        let t = std::time::Instant::now();
        let r = resize_area(&img, 683, 512);
        let t_area = t.elapsed();
        let t = std::time::Instant::now();
        let _ = resize_pil(&img, 1365, 1024, PilFilter::Lanczos);
        let t_lz = t.elapsed();
        let t = std::time::Instant::now();
        let _ = r.to_chw_normalized();
        let t_norm = t.elapsed();
        eprintln!("1024x768 JPEG: load {t_load:?}, generic decode {t_check:?}, area to 683x512 {t_area:?}, lanczos to 1365x1024 {t_lz:?}, normalize {t_norm:?}");
    }
    let _g = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    for threads in [1usize, 2] {
        for step_ms in [0u64, 60] {
            tch::manual_seed(1);
            let mut loader = Loader::new(&group, 0, false, threads);
            let t0 = std::time::Instant::now();
            let mut waited = std::time::Duration::ZERO;
            let mut it = loader
                .epoch(&group, 1, &mut GlobalTorchSeeds, None)
                .unwrap();
            loop {
                let tw = std::time::Instant::now();
                let Some(b) = it.next() else { break };
                waited += tw.elapsed();
                b.unwrap();
                std::thread::sleep(std::time::Duration::from_millis(step_ms));
            }
            let total = t0.elapsed();
            eprintln!(
                "threads {threads}, step {step_ms} ms: 24 batches in {:.2} s, consumer waited {:.2} s ({:.1} ms/batch)",
                total.as_secs_f64(),
                waited.as_secs_f64(),
                waited.as_secs_f64() * 1000.0 / 24.0
            );
        }
    }
}
