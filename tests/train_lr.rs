//! LR schedules against transformers' get_scheduler + torch LambdaLR (fixture written by
//! scripts/train_lr_fixture.py into tests/fixtures/train/lr.json).
use anyhow::Result;
use sdlora::train::args::parse_int_or_float;
use sdlora::train::lr::{LrScheduler, Schedule};
use sdlora::train::optim::common::Optimizer;
use serde_json::Value;
use tch::Tensor;

/// An optimizer that only holds group lrs.
struct Lrs(Vec<f64>);

impl Optimizer for Lrs {
    fn step(&mut self) -> Result<()> {
        Ok(())
    }
    fn zero_grad(&mut self) {}
    fn set_lr(&mut self, group: usize, lr: f64) {
        self.0[group] = lr;
    }
    fn lr(&self, group: usize) -> f64 {
        self.0[group]
    }
    fn num_groups(&self) -> usize {
        self.0.len()
    }
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    fn load_state_tensors(&mut self, _: &[(String, Tensor)]) -> Result<()> {
        Ok(())
    }
    fn class_name(&self) -> String {
        "test".into()
    }
}

#[test]
fn schedules_match_transformers() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/train/lr.json");
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() >= 6);
    let mut worst = 0f64;
    let mut points = 0;
    for c in &cases {
        let name = c["name"].as_str().unwrap();
        let warmup = parse_int_or_float(c["warmup_arg"].as_str().unwrap()).unwrap();
        let sched = Schedule::from_args(
            name,
            warmup,
            c["max_train_steps"].as_i64().unwrap(),
            1,
            c["num_cycles"].as_i64().unwrap(),
            c["power"].as_f64().unwrap(),
            c["learning_rate"].as_f64().unwrap(),
        )
        .unwrap();
        let group_lrs: Vec<f64> = c["group_lrs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let mut opt = Lrs(group_lrs);
        let mut s = LrScheduler::new(sched, &mut opt);
        let mut want: Vec<(i64, Vec<f64>)> = c["lrs"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                (
                    k.parse().unwrap(),
                    v.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap())
                        .collect(),
                )
            })
            .collect();
        want.sort_by_key(|(k, _)| *k);
        assert!(want.len() >= 20, "{name}: only {} points", want.len());
        let mut step = 0;
        for (target, lrs) in want {
            while step < target {
                s.step(&mut opt, 1);
                step += 1;
            }
            for (g, w) in lrs.iter().enumerate() {
                let got = opt.lr(g);
                let err = (got - w).abs() / w.abs().max(1e-300);
                let err = if *w == 0.0 { got.abs() } else { err };
                assert!(
                    err <= 1e-12,
                    "{name} warmup {} T {}: step {target} group {g}: {got} vs {w}",
                    c["warmup_arg"],
                    c["max_train_steps"]
                );
                worst = worst.max(err);
                points += 1;
            }
        }
    }
    println!("{points} lr values, max relative error {worst:e}");
}

#[test]
fn constant_with_warmup_is_refused_with_sd_scripts_message() {
    let e = Schedule::from_args(
        "constant",
        parse_int_or_float("10").unwrap(),
        100,
        1,
        1,
        1.0,
        1e-4,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "constant does not require `num_warmup_steps`. Set None or 0."
    );
    // a ratio that rounds down to 0 steps is accepted, as in sd-scripts
    assert!(Schedule::from_args(
        "constant",
        parse_int_or_float("0.001").unwrap(),
        100,
        1,
        1,
        1.0,
        1e-4
    )
    .is_ok());
}

#[test]
fn warmup_ratio_and_first_step_lambda() {
    let s = Schedule::from_args(
        "linear",
        parse_int_or_float("0.1").unwrap(),
        1000,
        1,
        1,
        1.0,
        1e-4,
    )
    .unwrap();
    assert_eq!(s.warmup, 100);
    // λ(0) = 0 with warmup: the first optimizer step runs at lr 0
    assert_eq!(s.lambda(0), 0.0);
    let s = Schedule::from_args(
        "linear",
        parse_int_or_float("25%").unwrap(),
        1000,
        2,
        1,
        1.0,
        1e-4,
    )
    .unwrap();
    assert_eq!((s.warmup, s.total), (500, 2000));
    assert!(parse_int_or_float("10.0").is_err());
}
