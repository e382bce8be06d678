//! Pure bookkeeping of a run: step/epoch counting (spec §4.1, §5.3), save names and the
//! save/remove schedule (§5.1), console lines and the LossRecorder (§4.2, §4.3).
use sdlora::train::console::{
    epoch_line, running_training_lines, tqdm_format_num, tqdm_interval, tqdm_rate, LossRecorder,
    RunSummary, StepsBar,
};
use sdlora::train::counting::*;
use sdlora::train::save::{read_train_state, train_state_json, SaveActions, SavePlan};

#[test]
fn counting_matches_the_spec_examples() {
    // 61 images × 10 repeats, batch 1, no reg, 10 epochs → 6100 steps
    assert_eq!(max_train_steps(Some(10), 1600, 610, 1, 1), 6100);
    // with 100 reg images padded to 610 → 1220 batches → 12200 steps
    assert_eq!(max_train_steps(Some(10), 1600, 1220, 1, 1), 12200);
    assert_eq!(max_train_steps(None, 1600, 610, 1, 1), 1600);
    // gradient accumulation and processes round up
    assert_eq!(max_train_steps(Some(3), 1600, 10, 1, 4), 9);
    assert_eq!(max_train_steps(Some(2), 1600, 11, 2, 2), 6);
    assert_eq!(num_update_steps_per_epoch(610, 1), 610);
    assert_eq!(num_update_steps_per_epoch(10, 4), 3);
    assert_eq!(num_train_epochs(6100, 610), 10);
    assert_eq!(num_train_epochs(1600, 610), 3);
    assert_eq!(save_every_n_epochs_from_ratio(10, 3), 3);
    assert_eq!(save_every_n_epochs_from_ratio(2, 5), 1);
    assert_eq!(
        override_steps_line(10, 6100),
        "override steps. steps for 10 epochs is / 指定エポックまでのステップ数: 6100"
    );
}

#[test]
fn start_points() {
    let fresh = start_point(None, None, None, false, false, 100, 10, 1, 1).unwrap();
    assert_eq!(
        (
            fresh.epoch_to_start,
            fresh.skip_batches,
            fresh.global_step,
            fresh.progress_total
        ),
        (0, 0, 0, 100)
    );
    // resumed without skipping: only the epoch advances, global_step restarts at 0
    let r = start_point(None, None, Some(25), false, true, 100, 10, 1, 1).unwrap();
    assert_eq!(
        (
            r.epoch_to_start,
            r.skip_batches,
            r.global_step,
            r.progress_total
        ),
        (2, 0, 0, 100)
    );
    // with --skip_until_initial_step: batches skipped, bar total from the remainder
    let s = start_point(None, Some(25), None, true, false, 100, 10, 1, 1).unwrap();
    assert_eq!(
        (
            s.epoch_to_start,
            s.skip_batches,
            s.global_step,
            s.progress_total
        ),
        (2, 5, 5, 95)
    );
    assert!(s.logs[0].starts_with("initial_step is specified but not resuming"));
    // --initial_epoch 3 → (3−1)·ceil(10/1/2) = 10 steps
    let e = start_point(Some(3), None, Some(7), false, true, 100, 10, 1, 2).unwrap();
    assert_eq!(e.epoch_to_start, 2);
    assert!(e.logs[0].starts_with("steps from the state is ignored"));
    let err = start_point(None, Some(100), None, false, false, 100, 10, 1, 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("max_train_steps should be greater than initial step"),
        "{err}"
    );
}

fn plan() -> SavePlan {
    SavePlan {
        output_name: Some("zunko".into()),
        save_model_as: "safetensors".into(),
        ..SavePlan::default()
    }
}

#[test]
fn file_and_state_names() {
    let p = plan();
    assert_eq!(p.epoch_ckpt_name(1), "zunko-000001.safetensors");
    assert_eq!(p.step_ckpt_name(500), "zunko-step00000500.safetensors");
    assert_eq!(p.last_ckpt_name(), "zunko.safetensors");
    assert_eq!(p.epoch_state_name(3), "zunko-000003-state");
    assert_eq!(p.step_state_name(20), "zunko-step00000020-state");
    assert_eq!(p.last_state_name(), "zunko-state");
    let d = SavePlan {
        save_model_as: "ckpt".into(),
        ..SavePlan::default()
    };
    assert_eq!(d.epoch_ckpt_name(2), "epoch-000002.ckpt");
    assert_eq!(d.step_ckpt_name(7), "at-step00000007.ckpt");
    assert_eq!(d.last_ckpt_name(), "last.ckpt");
    assert_eq!(d.last_state_name(), "last-state");
    assert_eq!(d.epoch_state_name(-1), "epoch--00001-state");
}

#[test]
fn tutorial_epoch_schedule() {
    // --save_every_n_epochs=1, 10 epochs: files 1..9, epoch 10 only as the final file
    let p = SavePlan {
        save_every_n_epochs: Some(1),
        ..plan()
    };
    let saved: Vec<String> = (1..=10)
        .filter_map(|e| p.on_epoch_end(e, 10).save)
        .collect();
    assert_eq!(saved.len(), 9);
    assert_eq!(saved[0], "zunko-000001.safetensors");
    assert_eq!(saved[8], "zunko-000009.safetensors");
    assert_eq!(
        p.on_train_end(),
        SaveActions {
            save: Some("zunko.safetensors".into()),
            ..SaveActions::default()
        }
    );
}

#[test]
fn removal_schedule() {
    let p = SavePlan {
        save_every_n_epochs: Some(2),
        save_last_n_epochs: Some(2),
        save_state: true,
        ..plan()
    };
    let a = p.on_epoch_end(6, 10);
    assert_eq!(a.save.as_deref(), Some("zunko-000006.safetensors"));
    assert_eq!(a.remove.as_deref(), Some("zunko-000002.safetensors"));
    assert_eq!(a.save_state.as_deref(), Some("zunko-000006-state"));
    assert_eq!(a.remove_state.as_deref(), Some("zunko-000002-state"));
    assert_eq!(
        p.on_epoch_end(4, 10).remove.as_deref(),
        Some("zunko-000000.safetensors")
    );
    assert_eq!(p.on_epoch_end(2, 10).remove, None);
    assert_eq!(p.on_epoch_end(3, 10), SaveActions::default());
    let ps = SavePlan {
        save_last_n_epochs_state: Some(1),
        ..p.clone()
    };
    assert_eq!(
        ps.on_epoch_end(6, 10).remove_state.as_deref(),
        Some("zunko-000004-state")
    );
    // steps: every 10, last 30 → at step 50 delete step 10 (spec example)
    let s = SavePlan {
        save_every_n_steps: Some(10),
        save_last_n_steps: Some(30),
        save_state: true,
        ..plan()
    };
    let a = s.on_step(50);
    assert_eq!(a.save.as_deref(), Some("zunko-step00000050.safetensors"));
    assert_eq!(a.remove.as_deref(), Some("zunko-step00000010.safetensors"));
    assert_eq!(a.remove_state.as_deref(), Some("zunko-step00000010-state"));
    assert_eq!(s.on_step(45), SaveActions::default());
    // at step 40: r = 9 − 9 = 0 → file "step0" (absent) but state dirs need r > 0
    let a = s.on_step(40);
    assert_eq!(a.remove.as_deref(), Some("zunko-step00000000.safetensors"));
    assert_eq!(a.remove_state, None);
    // Python floor modulo for negative r: step 10, last 30 → r = −21 − (−21 mod 10) = −30 → none
    assert_eq!(s.remove_step_no(10), None);
    let end = SavePlan {
        save_state_on_train_end: true,
        ..plan()
    }
    .on_train_end();
    assert_eq!(end.save_state.as_deref(), Some("zunko-state"));
}

#[test]
fn train_state_json_round_trip() {
    let dir = std::env::temp_dir().join(format!("sdlora-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("train_state.json"), train_state_json(3, 30)).unwrap();
    assert_eq!(read_train_state(&dir).unwrap(), (3, 30));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(read_train_state(&dir)
        .unwrap_err()
        .to_string()
        .contains("train_state.json"));
}

#[test]
fn loss_recorder_is_cumulative_then_sliding() {
    let mut r = LossRecorder::default();
    for (i, l) in [1.0, 2.0, 3.0].iter().enumerate() {
        r.add(0, i, *l);
    }
    assert_eq!(r.moving_average(), 2.0);
    // epoch 1 overwrites slot 0: window of the last len(dataloader) losses
    r.add(1, 0, 4.0);
    assert_eq!(r.moving_average(), 3.0);
    assert_eq!(LossRecorder::default().moving_average(), 0.0);
}

#[test]
fn console_lines() {
    let lines = running_training_lines(&RunSummary {
        num_train_images: 610,
        num_validation_images: 0,
        num_reg_images: 0,
        batches_per_epoch: 610,
        num_epochs: 10,
        batch_sizes: vec![1],
        gradient_accumulation_steps: 1,
        max_train_steps: 6100,
    });
    assert_eq!(lines[0], "running training / 学習開始");
    assert_eq!(
        lines[1],
        "  num train images * repeats / 学習画像の数×繰り返し回数: 610"
    );
    assert_eq!(lines[6], "  batch size per device / バッチサイズ: 1");
    assert_eq!(
        lines[7],
        "  gradient accumulation steps / 勾配を合計するステップ数 = 1"
    );
    assert_eq!(
        lines[8],
        "  total optimization steps / 学習ステップ数: 6100"
    );
    assert_eq!(epoch_line(1, 10), "\nepoch 1/10\n");
    assert_eq!(tqdm_interval(75.0), "01:15");
    assert_eq!(tqdm_interval(3725.0), "1:02:05");
    assert_eq!(tqdm_rate(2.034), "2.03it/s");
    assert_eq!(tqdm_rate(0.5), "2.00s/it");
    let bar = StepsBar::new(10);
    bar.set_avr_loss(0.1234);
    bar.inc();
    assert_eq!(bar.bar.position(), 1);
    bar.finish();
}

#[test]
fn tqdm_postfix_numbers_match_python() {
    // expected strings from tqdm.format_num (scripts/train_console_fixture.py prints these)
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/train/format_num.json"
    );
    let cases: Vec<(f64, String)> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() >= 10);
    for (v, want) in cases {
        assert_eq!(tqdm_format_num(v), want, "{v}");
    }
}
