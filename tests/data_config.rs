//! Dataset config errors (one clear message per malformed case), caption processing,
//! tokenisation windows and colour augmentation against scripts/data_reference.py.
use sdlora::data::caption::{input_ids_windows, process_caption, CaptionContext};
use sdlora::data::config::{generate_blueprint, SubsetParams, UserConfig};
use sdlora::data::dataset::build_dataset_group_with_log;
use sdlora::data::image::{apply_color_aug, draw_color_aug, load_image_rgb};
use sdlora::data::npz::read_npz;
use sdlora::data::{DataArgs, DataLog, PyRandom};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn python() -> String {
    std::env::var("SDLORA_PYTHON").unwrap_or_else(|_| "/root/.cache/sdlora/venv/bin/python".into())
}

fn py(args: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/data_reference.py");
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .expect("run python reference");
    assert!(
        out.status.success(),
        "reference {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference JSON")
}

fn tmp() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("sdlora-data-config-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("imgs")).unwrap();
        let img = image::RgbImage::from_fn(96, 64, |x, y| image::Rgb([x as u8, y as u8, 7]));
        img.save(root.join("imgs/a.png")).unwrap();
        std::fs::write(root.join("imgs/a.txt"), "a, b\n").unwrap();
        root
    })
}

fn build_err(name: &str, text: &str, args: DataArgs) -> String {
    let p = tmp().join(name);
    std::fs::write(&p, text).unwrap();
    let args = DataArgs {
        dataset_config: Some(p),
        seed: Some(1),
        ..args
    };
    match build_dataset_group_with_log(&args, DataLog::new(false), false) {
        Ok(_) => panic!("{name}: expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn malformed_configs_each_get_a_clear_message() {
    let img = tmp().join("imgs").display().to_string();
    // class_tokens: the images have no caption files, which is itself an error checked elsewhere
    let sub = format!("[[datasets.subsets]]\nimage_dir = \"{img}\"\nclass_tokens = \"sks\"\n");
    let ds = format!("[[datasets]]\nresolution = 64\n{sub}");
    let res = DataArgs {
        resolution: Some((64, 64)),
        ..Default::default()
    };
    // (file name, contents, expected fragments)
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        ("top_unknown.toml", format!("foo = 1\n{ds}"), vec!["[top level] unknown key `foo`".into(), "only [general] and [[datasets]]".into()]),
        ("top_resolution.toml", format!("resolution = 512\n{ds}"), vec!["put `resolution` under [general] or a [[datasets]] table".into()]),
        ("general_typo.toml", format!("[general]\nbatchsize = 2\n{ds}"), vec!["[general] unknown key `batchsize`".into(), "allowed keys here:".into()]),
        ("subset_dataset_key.toml", format!("[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"{img}\"\nresolution = 64\n"), vec!["[datasets[0].subsets[0]] unknown key `resolution`".into(), "dataset-level key".into()]),
        ("bool_as_string.toml", format!("[general]\nshuffle_caption = \"true\"\n{ds}"), vec!["[general] key `shuffle_caption` must be a boolean (true/false), got the string \"true\"".into()]),
        ("repeats_float.toml", format!("[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"{img}\"\nnum_repeats = 1.5\n"), vec!["[datasets[0].subsets[0]] key `num_repeats` must be an integer, got the float 1.5".into()]),
        ("reso_string.toml", format!("[[datasets]]\nresolution = \"512,512\"\n{sub}"), vec!["[datasets[0]] key `resolution` must be an integer or a list of two integers [width, height], got the string \"512,512\"".into()]),
        ("reso_one.toml", format!("[[datasets]]\nresolution = [512]\n{sub}"), vec!["key `resolution` must be an integer or a list of two integers".into(), "got a list of 1 element(s)".into()]),
        ("face_ints.toml", format!("[general]\nface_crop_aug_range = [1, 2]\n{ds}"), vec!["key `face_crop_aug_range` must be a list of exactly two floats [low, high]".into()]),
        ("no_image_dir.toml", "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nnum_repeats = 2\n".to_string(), vec!["[datasets[0].subsets[0]] required key `image_dir` not provided".into()]),
        ("mixed.toml", format!("{ds}[[datasets.subsets]]\nmetadata_file = \"m.json\"\n"), vec!["[datasets[0]] DreamBooth subset and fine tuning subset cannot be mixed in the same dataset".into()]),
        ("dropout_range.toml", format!("[general]\ncaption_dropout_rate = 1.5\n{ds}"), vec!["[general] key `caption_dropout_rate` = 1.5: is a probability: it must be between 0 and 1".into()]),
        ("batch_zero.toml", format!("[[datasets]]\nbatch_size = 0\nresolution = 64\n{sub}"), vec!["[datasets[0]] key `batch_size` = 0: must be at least 1".into()]),
        ("interp.toml", format!("[general]\nresize_interpolation = \"fancy\"\n{ds}"), vec!["key `resize_interpolation` = \"fancy\": must be one of lanczos, nearest".into()]),
        ("cli_only.toml", format!("[general]\nprior_loss_weight = 1.0\n{ds}"), vec!["[general] unknown key `prior_loss_weight`".into(), "is a command-line option (--prior_loss_weight)".into()]),
        ("syntax.toml", format!("[general\n{ds}"), vec!["Error on parsing TOML config file".into(), "syntax.toml".into()]),
        ("datasets_scalar.toml", "datasets = 3\n".to_string(), vec!["`datasets` must be an array of tables ([[datasets]]), got the integer 3".into()]),
        ("subsets_string.toml", "[[datasets]]\nsubsets = \"x\"\n".to_string(), vec!["[datasets[0]] `subsets` must be an array of tables ([[datasets.subsets]]), got the string \"x\"".into()]),
        ("keep_neg.toml", format!("[general]\nkeep_tokens = -1\n{ds}"), vec!["[general] key `keep_tokens` = -1: must not be negative".into()]),
        ("metadata_level.toml", format!("[[datasets]]\nmetadata_file = \"m.json\"\n{sub}"), vec!["[datasets[0]] unknown key `metadata_file`".into(), "belongs in a [[datasets.subsets]] table".into()]),
        ("ft_class_tokens.toml", "[[datasets]]\nclass_tokens = \"x\"\n[[datasets.subsets]]\nmetadata_file = \"m.json\"\n".to_string(), vec!["[datasets[0]] unknown key `class_tokens`".into(), "not allowed in a fine-tuning dataset".into()]),
        ("steps32.toml", format!("[[datasets]]\nresolution = 64\nenable_bucket = true\nbucket_reso_steps = 32\nmin_bucket_reso = 32\n{sub}"), vec!["datasets[0]: bucket_reso_steps is 32. it must be divisible by 64".into()]),
        ("no_resolution.toml", format!("[[datasets]]\n{sub}"), vec!["datasets[0]: resolution is required".into(), "--resolution=512,512".into()]),
        ("min_bucket.toml", format!("[[datasets]]\nresolution = 128\nenable_bucket = true\nmin_bucket_reso = 256\n{sub}"), vec!["datasets[0]: min_bucket_reso (256) must be equal or less than resolution (128, 128)".into()]),
        ("config.yaml", ds.clone(), vec!["not supported config file format".into(), "config.yaml".into()]),
    ];
    assert!(cases.len() >= 15);
    let mut seen = std::collections::HashSet::new();
    for (name, text, want) in cases {
        let args = if name == "no_resolution.toml" {
            DataArgs::default()
        } else {
            res.clone()
        };
        let msg = build_err(name, &text, args);
        if name != "config.yaml" {
            assert!(
                msg.contains(name),
                "{name}: the message must name the file: {msg}"
            );
        }
        for w in &want {
            assert!(msg.contains(w.as_str()), "{name}: expected `{w}` in: {msg}");
        }
        assert!(
            seen.insert(msg.clone()),
            "{name}: message not specific to the case: {msg}"
        );
    }
    // a missing file
    let args = DataArgs {
        dataset_config: Some(tmp().join("nope.toml")),
        seed: Some(1),
        ..Default::default()
    };
    let msg = format!(
        "{:#}",
        build_dataset_group_with_log(&args, DataLog::new(false), false)
            .err()
            .unwrap()
    );
    assert!(
        msg.contains("file not found") && msg.contains("nope.toml"),
        "{msg}"
    );
}

#[test]
fn valid_config_precedence_subset_dataset_general_cli() {
    let img = tmp().join("imgs").display().to_string();
    let p = tmp().join("prec.toml");
    std::fs::write(
        &p,
        format!(
            "[general]\nshuffle_caption = true\nkeep_tokens = 2\ncaption_extension = \".txt\"\n[[datasets]]\nresolution = [96, 64]\nkeep_tokens = 3\n[[datasets.subsets]]\nimage_dir = \"{img}\"\nkeep_tokens = 4\n[[datasets.subsets]]\nimage_dir = \"{img}/\"\n"
        ),
    )
    .unwrap();
    let args = DataArgs {
        dataset_config: Some(p),
        seed: Some(1),
        train_batch_size: 5,
        dataset_repeats: 7,
        flip_aug: true,
        resolution: Some((512, 512)),
        ..Default::default()
    };
    let g = build_dataset_group_with_log(&args, DataLog::new(false), false).unwrap();
    let d = &g.datasets[0];
    assert_eq!(
        (d.width, d.height),
        (96, 64),
        "TOML resolution beats --resolution"
    );
    assert_eq!(d.batch_size, 5, "--train_batch_size is the fallback");
    let s0 = &d.subsets[0].params;
    assert_eq!(s0.keep_tokens, 4, "subset beats dataset");
    assert!(s0.shuffle_caption && s0.flip_aug);
    assert_eq!(s0.num_repeats, 7, "--dataset_repeats is the fallback");
    assert_eq!(s0.caption_extension, ".txt");
    assert_eq!(d.subsets[1].params.keep_tokens, 3, "dataset beats general");
    // the same folder spelled with a trailing slash is another subset but the same image keys
    assert_eq!(d.images.len(), 1);
}

fn subset_params(t: &str) -> SubsetParams {
    let table: toml::Table = t.parse().unwrap();
    let cfg = UserConfig {
        source: "test".into(),
        general: toml::Table::new(),
        datasets: vec![(toml::Table::new(), vec![table])],
    };
    generate_blueprint(&cfg, &DataArgs::default())[0].subsets[0].clone()
}

#[test]
fn caption_processing_matches_reference() {
    let cases = serde_json::json!([
        {"subset": {"shuffle_caption": true, "keep_tokens": 1}, "caption": "zko, 1girl, smile, outdoors, sky", "seed": 3},
        {"subset": {"shuffle_caption": true, "keep_tokens_separator": "|||"}, "caption": "zko, girl ||| a, b, c, d ||| end1, end2", "seed": 4},
        {"subset": {"caption_tag_dropout_rate": 0.5}, "caption": "a, b, c, d, e, f, g", "seed": 5},
        {"subset": {"caption_dropout_rate": 0.5}, "caption": "x, y", "seed": 6, "repeat": 8},
        {"subset": {"caption_dropout_every_n_epochs": 2}, "caption": "x, y", "seed": 7, "epoch": 4},
        {"subset": {"caption_dropout_every_n_epochs": 2}, "caption": "x, y", "seed": 7, "epoch": 3},
        {"subset": {"caption_prefix": "pre", "caption_suffix": "post"}, "caption": "mid", "seed": 8},
        {"subset": {"enable_wildcard": true}, "caption": "a {red|blue|green} {{lit}} car\nsecond {x|y}", "seed": 9, "repeat": 6},
        {"subset": {"shuffle_caption": true, "secondary_separator": ";;;"}, "caption": "a;;;b, c, d", "seed": 10},
        {"subset": {"shuffle_caption": true, "caption_separator": "."}, "caption": "one. two . three.four", "seed": 11},
        {"subset": {"token_warmup_step": 10, "token_warmup_min": 2}, "caption": "a, b, c, d, e, f", "seed": 12, "step": 3},
        {"subset": {"token_warmup_step": 0.5, "shuffle_caption": true}, "caption": "a, b, c, d, e, f", "seed": 13, "step": 100, "max_train_steps": 1000},
        {"subset": {"keep_tokens": 2}, "caption": " untouched ,  spacing ", "seed": 14},
        {"subset": {"shuffle_caption": true, "keep_tokens": 9}, "caption": "only, three, tags", "seed": 15}
    ]);
    let p = tmp().join("captions.json");
    std::fs::write(&p, cases.to_string()).unwrap();
    let want = py(&["captions", p.to_str().unwrap()]);
    for (i, c) in cases.as_array().unwrap().iter().enumerate() {
        let mut t = String::new();
        for (k, v) in c["subset"].as_object().unwrap() {
            t += &format!("{k} = {v}\n");
        }
        t += "image_dir = \"x\"\n";
        let sp = subset_params(&t);
        let mut rng = PyRandom::new(c["seed"].as_i64().unwrap() as i128);
        let ctx = CaptionContext {
            current_epoch: c["epoch"].as_i64().unwrap_or(0),
            current_step: c["step"].as_i64().unwrap_or(0),
            max_train_steps: c["max_train_steps"].as_i64().unwrap_or(1600),
        };
        let n = c["repeat"].as_u64().unwrap_or(4);
        let got: Vec<String> = (0..n)
            .map(|_| process_caption(&sp, c["caption"].as_str().unwrap(), &ctx, &mut rng))
            .collect();
        let w: Vec<&str> = want[i]["captions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(got, w, "case {i}: {c}");
        let next: f64 = want[i]["next"].as_str().unwrap().parse().unwrap();
        assert_eq!(rng.random(), next, "case {i}: random draws consumed");
    }
}

#[test]
fn input_ids_windows_match_sd_scripts() {
    let long: String = (0..180)
        .map(|i| format!("tag{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let captions = vec![
        "zunko, 1girl, solo, skirt, one eye closed".to_string(),
        String::new(),
        (0..74).map(|_| "a").collect::<Vec<_>>().join(" "),
        (0..76).map(|_| "b").collect::<Vec<_>>().join(" "),
        (0..149).map(|_| "c").collect::<Vec<_>>().join(" "),
        long,
    ];
    let p = tmp().join("tokcaps.json");
    std::fs::write(&p, serde_json::to_string(&captions).unwrap()).unwrap();
    let want = py(&["tokens", p.to_str().unwrap()]);
    let v1 = sdlora::models::tokenizer::ClipTokenizer::new();
    let v2 = sdlora::models::tokenizer::ClipTokenizer::sd2();
    for (name, tok, is_v2) in [("v1", &v1, false), ("v2", &v2, true)] {
        for ml in [77usize, 152, 227] {
            let w = &want[format!("{name}_{ml}")];
            for (i, c) in captions.iter().enumerate() {
                let got = input_ids_windows(tok, c, ml, is_v2);
                let exp: Vec<Vec<i64>> = w[i]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|win| {
                        win.as_array()
                            .unwrap()
                            .iter()
                            .map(|x| x.as_i64().unwrap())
                            .collect()
                    })
                    .collect();
                let got: Vec<Vec<i64>> = got.iter().map(|x| x.to_vec()).collect();
                assert_eq!(got, exp, "{name} max_length {ml} caption {i}");
            }
        }
    }
}

#[test]
fn color_aug_matches_opencv() {
    let dir = tmp().join("coloraug");
    std::fs::create_dir_all(&dir).unwrap();
    let img_path = dir.join("color.png");
    let img = image::RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, ((x * y) % 256) as u8])
    });
    img.save(&img_path).unwrap();
    let out = tmp().join("color.npz");
    let seed = 2024;
    let n = 40;
    let r = py(&[
        "color-aug",
        img_path.to_str().unwrap(),
        &seed.to_string(),
        &n.to_string(),
        out.to_str().unwrap(),
    ]);
    let kinds: Vec<&str> = r["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"hue") && kinds.contains(&"gamma"),
        "{kinds:?}"
    );
    let want = read_npz(&out).unwrap();
    let base = load_image_rgb(&img_path).unwrap();
    let mut rng = PyRandom::new(seed as i128);
    let mut worst = 0;
    for (k, kind) in kinds.iter().enumerate() {
        let mut im = base.clone();
        let aug = draw_color_aug(&mut rng);
        apply_color_aug(&mut im, aug);
        let w = &want
            .iter()
            .find(|(name, _)| *name == format!("a{k}"))
            .unwrap()
            .1;
        let exp = w.to_f32();
        for (g, e) in im.data.iter().zip(&exp) {
            worst = worst.max((*g as i32 - *e as i32).abs());
        }
        assert!(worst <= 1, "sample {k} ({kind}): max abs error {worst}");
    }
    eprintln!("color aug: {n} samples, max abs error {worst}/255");
}

#[test]
fn image_without_caption_or_class_tokens_is_an_error_naming_it() {
    let dir = tmp().join("nocap");
    std::fs::create_dir_all(&dir).unwrap();
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8, y as u8, 0]));
    img.save(dir.join("zko (1).png")).unwrap();
    // the tutorial's pitfall: captions are .caption files but the config says .txt
    std::fs::write(dir.join("zko (1).caption"), "zko, smile\n").unwrap();
    let msg = build_err(
        "nocap.toml",
        &format!(
            "[general]\ncaption_extension = \".txt\"\n[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"{}\"\n",
            dir.display()
        ),
        DataArgs::default(),
    );
    assert!(
        msg.contains("nocap/zko (1).png: neither caption file nor class tokens are found"),
        "{msg}"
    );
    assert!(
        msg.contains("set caption_extension = \".caption\""),
        "{msg}"
    );
}
