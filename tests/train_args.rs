//! `sdlora train` argument parsing: argparse semantics, the option table against sd-scripts'
//! own registrations (fixture from scripts/train_args_fixture.py), config-file precedence and
//! sd-scripts' rejected combinations.
use sdlora::train::args::{
    parse_train_args, py_float_repr, ArgKind, ArgsOutcome, IntOrFloat, TrainArgs, Value, D, FLAGS,
};
use serde_json::Value as J;

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn parse(list: &[&str]) -> TrainArgs {
    TrainArgs::parse(&args(list)).unwrap()
}

fn parse_err(list: &[&str]) -> String {
    format!("{:#}", TrainArgs::parse(&args(list)).unwrap_err())
}

fn verify_err(list: &[&str]) -> String {
    format!("{:#}", parse(list).verify().unwrap_err())
}

const TUTORIAL: &[&str] = &[
    "--pretrained_model_name_or_path=model.safetensors",
    "--dataset_config=config.toml",
    "--output_dir=out",
    "--output_name=zunko",
    "--save_model_as=safetensors",
    "--prior_loss_weight=1.0",
    "--resolution=512,512",
    "--train_batch_size=1",
    "--max_train_epochs=10",
    "--learning_rate=1e-4",
    "--optimizer_type=AdamW8bit",
    "--xformers",
    "--mixed_precision=fp16",
    "--cache_latents",
    "--gradient_checkpointing",
    "--save_every_n_epochs=1",
    "--network_module=networks.lora",
];

#[test]
fn option_table_matches_sd_scripts_registrations() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/train/sdscripts_flags.json"
    );
    let want: Vec<J> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(want.len() > 150);
    for w in &want {
        let name = w["name"].as_str().unwrap();
        let f = FLAGS
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("--{name} missing from the option table"));
        let action = w["action"].as_str();
        let ty = w["type"].as_str();
        let kind = match (action, ty) {
            (Some("store_true"), _) => ArgKind::StoreTrue,
            (_, Some("str")) => ArgKind::Str,
            (_, Some("int")) => ArgKind::Int,
            (_, Some("float")) => ArgKind::Float,
            (_, Some("int_or_float")) => ArgKind::IntOrFloat,
            (_, Some("Path")) => ArgKind::Path,
            other => panic!("--{name}: unexpected {other:?}"),
        };
        assert_eq!(f.kind, kind, "--{name} kind");
        assert_eq!(f.star, w["nargs"].as_str() == Some("*"), "--{name} nargs");
        let default = match &w["default"] {
            J::Null if kind == ArgKind::StoreTrue => D::False,
            J::Null => D::None,
            J::Bool(false) => D::False,
            J::Number(n) if n.is_i64() => D::Int(n.as_i64().unwrap()),
            J::Number(n) => D::Float(n.as_f64().unwrap()),
            J::String(s) => {
                assert_eq!(
                    f.default,
                    D::Str(Box::leak(s.clone().into_boxed_str())),
                    "--{name} default"
                );
                continue_check(f.choices, &w["choices"], name);
                continue;
            }
            other => panic!("--{name}: default {other}"),
        };
        assert_eq!(f.default, default, "--{name} default");
        continue_check(f.choices, &w["choices"], name);
    }
    // sdlora's table has exactly sd-scripts' options plus accelerate's thread option
    assert_eq!(FLAGS.len(), want.len() + 1);
}

fn continue_check(have: &[&str], want: &J, name: &str) {
    let want: Vec<&str> = want
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(have, want.as_slice(), "--{name} choices");
}

#[test]
fn tutorial_command_is_accepted() {
    let mut a = parse(TUTORIAL);
    let warnings = a.verify().unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(
        a.pretrained_model_name_or_path.as_deref(),
        Some("model.safetensors")
    );
    assert_eq!(
        a.dataset_config.as_deref(),
        Some(std::path::Path::new("config.toml"))
    );
    assert_eq!(a.output_name.as_deref(), Some("zunko"));
    assert_eq!(a.resolution_wh().unwrap(), Some((512, 512)));
    assert_eq!(a.max_train_epochs, Some(10));
    assert_eq!(a.learning_rate, 1e-4);
    assert_eq!(a.optimizer_type, "AdamW8bit");
    assert!(a.xformers && a.cache_latents && a.gradient_checkpointing);
    assert_eq!(a.mixed_precision, "fp16");
    assert_eq!(a.save_every_n_epochs, Some(1));
    assert_eq!(a.network_module.as_deref(), Some("networks.lora"));
    // implicit values of the tutorial run (spec §7)
    assert_eq!(a.network_dim, None);
    assert_eq!(a.network_alpha_given(), None);
    assert_eq!(a.network_alpha, 1.0);
    assert_eq!(a.lr_scheduler, "constant");
    assert_eq!(a.lr_warmup_steps, IntOrFloat::Int(0));
    assert_eq!(a.max_grad_norm, 1.0);
    assert_eq!(a.max_train_steps, 1600);
    assert_eq!(a.caption_extension, ".caption");
    assert_eq!(a.max_data_loader_n_workers, 8);
    assert_eq!(a.seed, None);
}

#[test]
fn argparse_forms() {
    // space-separated values, negative numbers as values, prefixes, nargs="*"
    let a = parse(&[
        "--learning_rate",
        "3e-4",
        "--noise_offset",
        "-0.1",
        "--max_train_ep",
        "3",
        "--network_args",
        "conv_dim=4",
        "conv_alpha=1",
        "--optimizer_args=weight_decay=0.1",
        "--text_encoder_lr",
        "1e-5",
        "2e-5",
        "--seed",
        " 42 ",
        "--lr_warmup_steps",
        "0.5",
        "--v2",
        "--v2",
    ]);
    assert_eq!(a.learning_rate, 3e-4);
    assert_eq!(a.noise_offset, Some(-0.1));
    assert_eq!(a.max_train_epochs, Some(3));
    assert_eq!(
        a.network_args,
        Some(vec!["conv_dim=4".to_string(), "conv_alpha=1".to_string()])
    );
    assert_eq!(
        a.network_args_pairs().unwrap()[1],
        ("conv_alpha".into(), "1".into())
    );
    assert_eq!(a.optimizer_args, Some(vec!["weight_decay=0.1".to_string()]));
    assert_eq!(a.text_encoder_lr, Some(vec![1e-5, 2e-5]));
    assert_eq!(a.text_encoder_lr_single(), Some(1e-5));
    assert_eq!(a.seed, Some(42));
    assert_eq!(a.lr_warmup_steps, IntOrFloat::Float(0.5));
    assert!(a.v2);
    // an empty nargs="*" list is [] (not None)
    assert_eq!(parse(&["--network_args"]).network_args, Some(vec![]));
    // later occurrence wins
    assert_eq!(parse(&["--seed=1", "--seed=2"]).seed, Some(2));
    // int_or_float
    assert_eq!(
        parse(&["--lr_warmup_steps=10%"]).lr_warmup_steps,
        IntOrFloat::Float(0.1)
    );
    assert_eq!(
        parse(&["--lr_warmup_steps=20"]).lr_warmup_steps,
        IntOrFloat::Int(20)
    );
    // an explicit flag is a Python float even when it equals the int default (float32 alpha)
    let given = parse(&["--network_alpha=1"]).network_alpha_given().unwrap();
    assert_eq!((given.value, given.kind), (1.0, tch::Kind::Float));
    let given = parse(&["--network_alpha", "8"])
        .network_alpha_given()
        .unwrap();
    assert_eq!((given.value, given.kind), (8.0, tch::Kind::Float));
}

#[test]
fn argparse_errors() {
    assert_eq!(
        parse_err(&["--learning_rate=abc"]),
        "argument --learning_rate: invalid float value: 'abc'"
    );
    assert_eq!(
        parse_err(&["--seed=1.5"]),
        "argument --seed: invalid int value: '1.5'"
    );
    assert_eq!(
        parse_err(&["--lr_warmup_steps=10.0"]),
        "argument --lr_warmup_steps: '10.0' is not an int or float"
    );
    assert_eq!(
        parse_err(&["--mixed_precision=fp8"]),
        "argument --mixed_precision: invalid choice: 'fp8' (choose from 'no', 'fp16', 'bf16')"
    );
    assert_eq!(
        parse_err(&["--max_token_length=75"]),
        "argument --max_token_length: invalid choice: 75 (choose from None, 150, 225)"
    );
    assert_eq!(
        parse_err(&["--v2=yes"]),
        "argument --v2: ignored explicit argument 'yes'"
    );
    assert_eq!(
        parse_err(&["--seed"]),
        "argument --seed: expected one argument"
    );
    assert!(parse_err(&["--save"]).starts_with("ambiguous option: --save could match"));
    // every unknown option in one error, with suggestions
    let e = parse_err(&[
        "--learnig_rate=1",
        "--max_train_epoch_s",
        "3",
        "--totally_unknown",
    ]);
    assert!(
        e.contains("--learnig_rate (did you mean --learning_rate?)"),
        "{e}"
    );
    assert!(
        e.contains("--max_train_epoch_s (did you mean --max_train_epochs?)"),
        "{e}"
    );
    assert!(e.contains("--totally_unknown"), "{e}");
    assert!(parse_err(&["stray"]).contains("'stray'"));
}

#[test]
fn unsupported_options_are_refused_together() {
    let e = verify_err(&[
        "--sample_prompts=p.txt",
        "--deepspeed",
        "--log_with=wandb",
        "--network_module=networks.dylora",
        "--optimizer_type=Prodigy",
        "--lr_scheduler=inverse_sqrt",
        "--xformers",
        "--num_cpu_threads_per_process=1",
    ]);
    for part in [
        "--sample_prompts",
        "--deepspeed",
        "--log_with wandb",
        "networks.dylora",
        "Prodigy",
        "--lr_scheduler inverse_sqrt",
    ] {
        assert!(e.contains(part), "{part} missing in: {e}");
    }
    assert!(
        !e.contains("xformers") && !e.contains("num_cpu_threads"),
        "{e}"
    );
    // a not-implemented option at its default value is fine
    let mut a = parse(&["--sample_sampler=ddim", "--zero_stage=2"]);
    a.verify().unwrap();
}

#[test]
fn rejected_combinations_use_sd_scripts_messages() {
    assert_eq!(
        verify_err(&["--adaptive_noise_scale=0.1"]),
        "adaptive_noise_scale requires noise_offset / adaptive_noise_scaleを使用するにはnoise_offsetが必要です"
    );
    assert!(
        verify_err(&["--scale_v_pred_loss_like_noise_pred"]).starts_with(
            "scale_v_pred_loss_like_noise_pred can be enabled only with v_parameterization"
        )
    );
    assert!(
        verify_err(&["--v_pred_like_loss=0.1", "--v_parameterization"])
            .starts_with("v_pred_like_loss cannot be enabled with v_parameterization")
    );
    assert!(verify_err(&["--resolution=512,512,3"])
        .starts_with("resolution must be 'size' or 'width,height'"));
    assert!(verify_err(&["--face_crop_aug_range=2,1"])
        .starts_with("face_crop_aug_range must be two floats"));
    assert!(verify_err(&["--full_fp16"]).starts_with("full_fp16 requires mixed precision='fp16'"));
    assert!(verify_err(&["--full_bf16", "--mixed_precision=fp16"])
        .starts_with("full_bf16 requires mixed precision='bf16'"));
    assert!(verify_err(&["--use_8bit_adam", "--use_lion_optimizer"])
        .starts_with("both option use_8bit_adam and use_lion_optimizer"));
    assert!(verify_err(&["--use_8bit_adam", "--optimizer_type=AdamW"])
        .starts_with("both option use_8bit_adam and optimizer_type"));
    assert!(verify_err(&["--lr_scheduler=warmup"])
        .starts_with("'warmup' is not a valid SchedulerType, please select one of ['linear'"));
    assert!(verify_err(&["--log_with=tensorboard"])
        .starts_with("logging_dir is required when log_with is tensorboard"));

    let mut a = parse(&[
        "--cache_latents_to_disk",
        "--v2",
        "--clip_skip=2",
        "--zero_terminal_snr",
        "--caption_extention=.txt",
    ]);
    let w = a.verify().unwrap();
    assert!(a.cache_latents);
    assert_eq!(a.caption_extension, ".txt");
    assert_eq!(w.len(), 3, "{w:?}");
    assert!(w[0].starts_with("v2 with clip_skip will be unexpected"));
    assert!(w[1].starts_with("cache_latents_to_disk is enabled, so cache_latents is also enabled"));
    assert!(w[2].starts_with("zero_terminal_snr is enabled, but v_parameterization is not enabled"));
    let mut a = parse(&["--dataset_config=c.toml", "--train_data_dir=x"]);
    assert!(a.verify().unwrap()[0].starts_with("ignoring the following options because config file is found: train_data_dir, reg_data_dir, in_json"));
    assert_eq!(
        parse(&["--resolution=768"]).resolution_wh().unwrap(),
        Some((768, 768))
    );
}

#[test]
fn config_file_precedence() {
    let dir = std::env::temp_dir().join(format!("sdlora-args-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("train.toml");
    std::fs::write(
        &cfg,
        "[model]\npretrained_model_name_or_path = \"m.safetensors\"\n[training]\nlearning_rate = 1e-4\nmax_train_epochs = 4\nresolution = \"640,512\"\nnetwork_args = [\"conv_dim=4\"]\nnetwork_alpha = 8\nxformers = true\nnot_an_option = 3\n[other]\nlearning_rate = 2e-4\n",
    )
    .unwrap();
    // ".toml" appended when missing; CLI beats config file; config beats defaults
    let stem = dir.join("train").to_string_lossy().to_string();
    let out = parse_train_args(&args(&["--config_file", &stem, "--max_train_epochs=7"])).unwrap();
    let ArgsOutcome::Run(a, notices) = out else {
        panic!("expected a run")
    };
    assert_eq!(a.max_train_epochs, Some(7));
    assert_eq!(
        a.learning_rate, 2e-4,
        "later section wins the flattened namespace"
    );
    assert_eq!(
        a.pretrained_model_name_or_path.as_deref(),
        Some("m.safetensors")
    );
    assert_eq!(a.resolution_wh().unwrap(), Some((640, 512)));
    assert_eq!(a.network_args, Some(vec!["conv_dim=4".to_string()]));
    assert!(a.xformers);
    // a TOML integer stays a Python int in sd-scripts' namespace: int64 alpha, "8" in metadata
    let alpha = a.network_alpha_given().unwrap();
    assert_eq!((alpha.value, alpha.kind), (8.0, tch::Kind::Int64));
    assert_eq!(a.train_batch_size, 1);
    assert!(
        notices.iter().any(|n| n.contains("not_an_option")),
        "{notices:?}"
    );
    // type errors name the key
    std::fs::write(&cfg, "max_train_epochs = \"4\"\n").unwrap();
    let e = format!(
        "{:#}",
        parse_train_args(&args(&["--config_file", cfg.to_str().unwrap()]))
            .err()
            .unwrap()
    );
    assert!(
        e.contains("max_train_epochs") && e.contains("integer"),
        "{e}"
    );
    // missing file: sd-scripts' message
    let e = format!(
        "{:#}",
        parse_train_args(&args(&["--config_file", "/nonexistent/x"]))
            .err()
            .unwrap()
    );
    assert_eq!(e, "/nonexistent/x.toml not found.");
    // --output_config writes the non-default options, refuses to overwrite
    let outcfg = dir.join("written.toml");
    let out = parse_train_args(&args(&[
        "--config_file",
        outcfg.to_str().unwrap(),
        "--output_config",
        "--learning_rate=1e-4",
        "--v2",
    ]))
    .unwrap();
    assert!(matches!(out, ArgsOutcome::ConfigWritten(_)));
    let text = std::fs::read_to_string(&outcfg).unwrap();
    assert!(
        text.contains("learning_rate = 0.0001") && text.contains("v2 = true"),
        "{text}"
    );
    assert!(
        !text.contains("config_file") && !text.contains("output_config"),
        "{text}"
    );
    let back = parse_train_args(&args(&["--config_file", outcfg.to_str().unwrap()])).unwrap();
    let ArgsOutcome::Run(b, _) = back else {
        panic!()
    };
    assert!(b.v2 && b.learning_rate == 1e-4);
    assert!(parse_train_args(&args(&[
        "--config_file",
        outcfg.to_str().unwrap(),
        "--output_config"
    ]))
    .is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn help_lists_every_option() {
    let ArgsOutcome::Help(h) = parse_train_args(&args(&["--help"])).unwrap() else {
        panic!()
    };
    for f in FLAGS {
        assert!(h.contains(&format!("--{}", f.name)));
    }
}

#[test]
fn python_float_repr() {
    // Python's repr for values sd-scripts writes into metadata and logs
    let cases = [
        (1e-4, "0.0001"),
        (1e-5, "1e-05"),
        (2e-6, "2e-06"),
        (1.0, "1.0"),
        (0.5, "0.5"),
        (1e16, "1e+16"),
        (123456.0, "123456.0"),
        (0.1 + 0.2, "0.30000000000000004"),
        (-3e-7, "-3e-07"),
    ];
    for (v, want) in cases {
        assert_eq!(py_float_repr(v), want);
    }
    assert_eq!(Value::List(vec![Value::Str("a".into())]).py_str(), "['a']");
}
