//! sd-scripts' console handler draws from Python's global `random` (rich's link ids): the replay
//! in `data::log` against rich 14.1's RichHandler itself (scripts/rich_log_draws.py), on the
//! record sequence sd-scripts logs between `set_seed` and the dataset seed in the tutorial's
//! run, and on random sequences of call sites, levels, handlers and messages.
mod lora_common;

use lora_common::{python, repo, scratch};
use sdlora::data::log::{ConsoleHandler, DataLog, Level, Site};
use sdlora::data::pyrandom::PyRandom;
use serde_json::{json, Value};

const FILES: [&str; 5] = [
    "train_util.py",
    "config_util.py",
    "train_network.py",
    "strategy_sd.py",
    "lora.py",
];

struct Case {
    seed: i64,
    level: &'static str,
    pre_seed: Vec<(usize, u32, Level)>,
    records: Vec<(usize, u32, Level, String)>,
}

fn level_name(l: Level) -> &'static str {
    match l {
        Level::Info => "INFO",
        Level::Warning => "WARNING",
    }
}

/// The records sd-scripts (48d368f) logs from `set_seed` to `random.randint(0, 2**31)` for the
/// tutorial's config (one DreamBooth subset, no reg images), read off a traced run.
fn tutorial_window() -> Vec<(usize, u32, Level, String)> {
    let i = Level::Info;
    vec![
        (3, 26, i, "Using v1 tokenizer".into()),
        (
            2,
            519,
            i,
            "Loading dataset config from /data/config.toml".into(),
        ),
        (0, 2112, i, "prepare images.".into()),
        (0, 2005, i, "get image size from name of cache files".into()),
        (0, 2035, i, "set image size from cache files: 0/4".into()),
        (
            0,
            2059,
            i,
            "found directory /data/img contains 4 image files".into(),
        ),
        (0, 2158, i, "40 train images with repeats.".into()),
        (0, 2162, i, "0 reg images with repeats.".into()),
        (
            0,
            2167,
            Level::Warning,
            "no regularization images / 正則化画像が見つかりませんでした".into(),
        ),
        (
            1,
            580,
            i,
            "[Dataset 0]\n  batch_size: 1\n  resolution: (512, 512)\n".into(),
        ),
    ]
}

fn cases() -> Vec<Case> {
    let mut out = vec![
        Case {
            seed: 42,
            level: "INFO",
            pre_seed: vec![],
            records: tutorial_window(),
        },
        Case {
            seed: 42,
            level: "WARNING",
            pre_seed: vec![],
            records: tutorial_window(),
        },
        Case {
            seed: 42,
            level: "plain",
            pre_seed: vec![],
            records: tutorial_window(),
        },
        Case {
            seed: 1234,
            level: "INFO",
            pre_seed: vec![(0, 4422, Level::Warning)],
            records: tutorial_window(),
        },
    ];
    let mut r = PyRandom::new(7);
    let levels = ["INFO", "INFO", "WARNING", "ERROR", "plain", "DEBUG"];
    for _ in 0..40 {
        let site = |r: &mut PyRandom| (r.randint(0, 4) as usize, 10 + r.randint(0, 6) as u32);
        let lv = |r: &mut PyRandom| {
            if r.random() < 0.7 {
                Level::Info
            } else {
                Level::Warning
            }
        };
        let pre_seed = (0..r.randint(0, 3))
            .map(|_| {
                let (f, l) = site(&mut r);
                (f, l, lv(&mut r))
            })
            .collect();
        let records = (0..r.randint(0, 40))
            .map(|_| {
                let (f, l) = site(&mut r);
                let words = r.randint(0, 60);
                let msg: Vec<String> = (0..words)
                    .map(|k| match r.randint(0, 4) {
                        0 => format!("/tmp/some/dir{k}/image_{}.png", r.randint(0, 999)),
                        1 => format!("{:.4}", r.random()),
                        2 => "\n".to_string(),
                        3 => "正則化画像".to_string(),
                        _ => "word".repeat(1 + r.randint(0, 30) as usize),
                    })
                    .collect();
                (f, l, lv(&mut r), msg.join(" "))
            })
            .collect();
        out.push(Case {
            seed: r.randint(0, 1 << 32),
            level: levels[r.randint(0, levels.len() as i64 - 1) as usize],
            pre_seed,
            records,
        });
    }
    out
}

fn handler(level: &str) -> ConsoleHandler {
    if level == "plain" {
        ConsoleHandler::from_flags(true, false, None)
    } else {
        ConsoleHandler::from_flags(false, false, Some(level))
    }
}

#[test]
fn rich_draws_match_rich() {
    let dir = scratch("rich_log_draws");
    let cases = cases();
    let js: Vec<Value> = cases
        .iter()
        .map(|c| {
            json!({
                "seed": c.seed,
                "level": c.level,
                "pre_seed": c.pre_seed.iter().map(|(f, l, lv)| json!([FILES[*f], l, level_name(*lv)])).collect::<Vec<_>>(),
                "records": c.records.iter().map(|(f, l, lv, m)| json!([FILES[*f], l, level_name(*lv), m])).collect::<Vec<_>>(),
            })
        })
        .collect();
    let input = dir.join("cases.json");
    let output = dir.join("out.json");
    std::fs::write(&input, serde_json::to_string(&js).unwrap()).unwrap();
    let st = std::process::Command::new(python())
        .args([
            "scripts/rich_log_draws.py",
            input.to_str().unwrap(),
            output.to_str().unwrap(),
        ])
        .current_dir(repo())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run the Python oracle (set SDLORA_PYTHON)");
    assert!(st.success(), "scripts/rich_log_draws.py failed");
    let want: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    let mut moved = 0;
    for (k, (c, w)) in cases.iter().zip(&want).enumerate() {
        let log = DataLog::new(false);
        log.set_console(handler(c.level));
        for (f, l, lv) in &c.pre_seed {
            log.unprinted(
                *lv,
                Site {
                    file: FILES[*f],
                    line: *l,
                },
            );
        }
        log.discard_owed();
        let mut rng = PyRandom::new(c.seed as i128);
        for (f, l, lv, m) in &c.records {
            let site = Site {
                file: FILES[*f],
                line: *l,
            };
            match lv {
                Level::Info => log.info(site, m.clone()),
                Level::Warning => log.warn(site, m.clone()),
            }
        }
        let owed = log.owed_draws();
        moved += (owed > 0) as usize;
        log.settle(&mut rng);
        let got = (
            rng.randint(0, 1 << 31),
            (rng.random() * 2f64.powi(53)) as i64,
        );
        assert_eq!(
            got.0,
            w["randint"].as_i64().unwrap(),
            "case {k} ({} records, level {}, {owed} draws): dataset seed",
            c.records.len(),
            c.level
        );
        assert_eq!(
            got.1,
            w["random53"].as_i64().unwrap(),
            "case {k}: next random()"
        );
    }
    println!(
        "{} cases equal to rich 14.1 ({moved} with draws)",
        cases.len()
    );
    assert!(moved > 20, "too few cases exercise the draws");
}
