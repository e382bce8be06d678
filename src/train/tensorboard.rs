//! TensorBoard event files as accelerate's TensorBoardTracker writes them through
//! torch.utils.tensorboard (spec: sdscripts_cli_data.md §4.3): tfrecord framing with masked
//! CRC32C, `Event` / `Summary` protobuf messages encoded by hand (scalars as `simple_value`).
use anyhow::{Context, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

const CRC32C_POLY: u32 = 0x82F6_3B78;
/// tfrecord's CRC mask delta.
const MASK_DELTA: u32 = 0xa282_ead8;

fn crc32c_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    for (i, slot) in t.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ CRC32C_POLY
            } else {
                c >> 1
            };
        }
        *slot = c;
    }
    t
}

/// CRC-32C (Castagnoli).
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(crc32c_table);
    let mut c = !0u32;
    for &b in data {
        c = t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// tfrecord's masked CRC: rotate right by 15, add a constant.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(MASK_DELTA)
}

/// One tfrecord: length, masked CRC of the length, payload, masked CRC of the payload.
pub fn tfrecord(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc32c(payload).to_le_bytes());
    out
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(field: u32, wire: u32, out: &mut Vec<u8>) {
    varint(((field << 3) | wire) as u64, out);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    key(field, 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 | summary = 5 }`.
pub fn encode_event(
    wall_time: f64,
    step: i64,
    file_version: Option<&str>,
    summary: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::new();
    key(1, 1, &mut out);
    out.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        key(2, 0, &mut out);
        varint(step as u64, &mut out);
    }
    if let Some(v) = file_version {
        bytes_field(3, v.as_bytes(), &mut out);
    }
    if let Some(s) = summary {
        bytes_field(5, s, &mut out);
    }
    out
}

/// `Summary { repeated Value value = 1 }`, `Value { tag = 1, simple_value = 2 (float) }`.
pub fn encode_scalar_summary(values: &[(&str, f32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (tag, v) in values {
        let mut val = Vec::new();
        bytes_field(1, tag.as_bytes(), &mut val);
        key(2, 5, &mut val);
        val.extend_from_slice(&v.to_le_bytes());
        bytes_field(1, &val, &mut out);
    }
    out
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Local time as `%Y%m%d%H%M%S` (sd-scripts' run-directory suffix).
pub fn local_timestamp() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0);
    // SAFETY: localtime_r only writes the tm struct we own.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe {
        libc::localtime_r(&t, &mut tm);
    }
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// `{logging_dir}/{log_prefix}{timestamp}/{tracker_name}` (`TU:prepare_accelerator` joins with
/// "/"; accelerate's tracker adds the run name, "network_train" unless --log_tracker_name).
pub fn run_log_dir(
    logging_dir: &str,
    log_prefix: Option<&str>,
    timestamp: &str,
    tracker_name: Option<&str>,
) -> PathBuf {
    let base = format!("{logging_dir}/{}{timestamp}", log_prefix.unwrap_or(""));
    Path::new(&base).join(tracker_name.unwrap_or("network_train"))
}

/// An open event file. Every record is flushed, as the tracker flushes after each log call.
pub struct EventWriter {
    file: File,
    pub path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` and `events.out.tfevents.{secs:010}.{host}.{pid}.0` with the
    /// "brain.Event:2" header event.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating log dir {}", dir.display()))?;
        let now = now_secs();
        let host = hostname();
        let name = format!(
            "events.out.tfevents.{:010}.{host}.{}.0",
            now as u64,
            std::process::id()
        );
        let path = dir.join(name);
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = EventWriter { file, path };
        w.write_record(&encode_event(now, 0, Some("brain.Event:2"), None))?;
        Ok(w)
    }

    fn write_record(&mut self, event: &[u8]) -> Result<()> {
        self.file
            .write_all(&tfrecord(event))
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// One scalar per event, as `add_scalar` does.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: i64) -> Result<()> {
        let summary = encode_scalar_summary(&[(tag, value)]);
        self.write_record(&encode_event(now_secs(), step, None, Some(&summary)))
    }

    /// accelerate's `log(values, step)`: every value as its own scalar event, in order.
    pub fn log(&mut self, values: &[(String, f64)], step: i64) -> Result<()> {
        for (k, v) in values {
            self.add_scalar(k, *v as f32, step)?;
        }
        Ok(())
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// sd-scripts' per-step log values in insertion order (`NetworkTrainer.generate_step_logs` for
/// networks.lora, which passes group descriptions): loss/current, loss/average, `lr/{desc}` per
/// group, then its for/else tail: `lr/textencoder` = the first group's lr unless
/// --network_train_unet_only (a dict update: same position, value of group 0, even when group
/// 0 is the U-Net because the TE group was dropped), and `lr/group{i}` for the later groups.
pub fn step_logs(
    current_loss: f64,
    avr_loss: f64,
    lrs: &[(String, f64)],
    network_train_unet_only: bool,
) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = vec![
        ("loss/current".to_string(), current_loss),
        ("loss/average".to_string(), avr_loss),
    ];
    let mut upsert = |k: String, v: f64| match out.iter_mut().find(|(key, _)| *key == k) {
        Some(slot) => slot.1 = v,
        None => out.push((k, v)),
    };
    for (name, lr) in lrs {
        upsert(format!("lr/{name}"), *lr);
    }
    let mut idx = 0;
    if !network_train_unet_only && !lrs.is_empty() {
        upsert("lr/textencoder".to_string(), lrs[0].1);
        idx = 1;
    }
    for (i, (_, lr)) in lrs.iter().enumerate().skip(idx) {
        upsert(format!("lr/group{i}"), *lr);
    }
    out
}
