//! TensorBoard event files: written by sdlora, read back by an independent Python reader
//! (scripts/train_read_events.py: bitwise CRC-32C, protobuf decoded by hand).
use sdlora::train::tensorboard::{crc32c, masked_crc32c, run_log_dir, step_logs, EventWriter};
use std::path::Path;

fn python() -> String {
    std::env::var("SDLORA_PYTHON").unwrap_or_else(|_| "/root/.cache/sdlora/venv/bin/python".into())
}

#[test]
fn crc32c_known_vectors() {
    // RFC 3720 B.4 test vectors for CRC-32C
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    assert_ne!(masked_crc32c(b"123456789"), crc32c(b"123456789"));
}

#[test]
fn run_dir_naming() {
    assert_eq!(
        run_log_dir("logs", Some("zunko_"), "20240101120000", None),
        Path::new("logs/zunko_20240101120000/network_train")
    );
    assert_eq!(
        run_log_dir("logs", None, "20240101120000", Some("mine")),
        Path::new("logs/20240101120000/mine")
    );
    let ts = sdlora::train::tensorboard::local_timestamp();
    assert_eq!(ts.len(), 14);
    assert!(ts.chars().all(|c| c.is_ascii_digit()));
}

#[test]
fn step_log_keys_follow_generate_step_logs() {
    let lrs = vec![
        ("textencoder".to_string(), 1e-5),
        ("unet".to_string(), 1e-4),
    ];
    let keys: Vec<String> = step_logs(0.5, 0.4, &lrs, false)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        keys,
        [
            "loss/current",
            "loss/average",
            "lr/textencoder",
            "lr/unet",
            "lr/group1"
        ]
    );
    let only_unet = vec![("unet".to_string(), 1e-4)];
    let logs = step_logs(0.5, 0.4, &only_unet, true);
    assert_eq!(logs[2], ("lr/unet".to_string(), 1e-4));
    assert_eq!(logs[3], ("lr/group0".to_string(), 1e-4));
    // TE group dropped (text_encoder_lr 0) without unet_only: lr/textencoder shows the U-Net lr
    let logs = step_logs(0.5, 0.4, &only_unet, false);
    assert_eq!(logs[3], ("lr/textencoder".to_string(), 1e-4));
}

#[test]
fn event_file_reads_back_in_python() {
    let dir = std::env::temp_dir().join(format!("sdlora-tb-{}", std::process::id()));
    let run = run_log_dir(dir.to_str().unwrap(), Some("p_"), "20240101120000", None);
    let mut w = EventWriter::create(&run).unwrap();
    let lrs = vec![
        ("textencoder".to_string(), 1e-5),
        ("unet".to_string(), 1e-4),
    ];
    for step in 1..=3 {
        w.log(
            &step_logs(0.1 * step as f64, 0.05 * step as f64, &lrs, false),
            step,
        )
        .unwrap();
    }
    w.add_scalar("loss/epoch_average", 0.25, 1).unwrap();
    let name = w.path.file_name().unwrap().to_string_lossy().to_string();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let out = std::process::Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/train_read_events.py"
        ))
        .arg(&w.path)
        .output()
        .expect("run the Python reader (set SDLORA_PYTHON)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(events[0]["file_version"], "brain.Event:2");
    // 3 steps × 5 scalars + 1, one scalar per event
    assert_eq!(events.len(), 1 + 15 + 1);
    let e = &events[1 + 5 + 1]; // step 2, loss/average
    assert_eq!(e["step"], 2);
    assert!((e["scalars"]["loss/average"].as_f64().unwrap() - 0.1).abs() < 1e-7);
    let last = &events[16];
    assert_eq!(last["step"], 1);
    assert_eq!(last["scalars"]["loss/epoch_average"], 0.25);
    let lr = &events[5]; // step 1, lr/group1
    assert!((lr["scalars"]["lr/group1"].as_f64().unwrap() - 1e-4).abs() < 1e-10);
    // SDLORA_TB_KEEP=path keeps a copy, e.g. to open with the real tensorboard reader
    if let Ok(keep) = std::env::var("SDLORA_TB_KEEP") {
        std::fs::copy(&w.path, keep).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
