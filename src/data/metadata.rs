//! The dataset part of a LoRA's `ss_*` metadata, as sd-scripts' `NetworkTrainer.train` writes
//! it (`json.dumps` with its default separators and ASCII escaping).
//! spec: sdscripts_cli_data.md §5.4.
use super::config::DatasetKind;
use super::dataset::{py_basename, Dataset, DatasetGroup};
use crate::lora::DatasetFacts;

/// A JSON value with Python's dict order.
#[derive(Clone, Debug, PartialEq)]
pub enum PyJson {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<PyJson>),
    Dict(Vec<(String, PyJson)>),
}

impl PyJson {
    fn opt_str(s: &Option<String>) -> PyJson {
        s.as_ref().map_or(PyJson::Null, |v| PyJson::Str(v.clone()))
    }

    fn opt_int(v: Option<i64>) -> PyJson {
        v.map_or(PyJson::Null, PyJson::Int)
    }

    /// `json.dumps(value)`.
    pub fn dumps(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match self {
            PyJson::Null => out.push_str("null"),
            PyJson::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            PyJson::Int(i) => out.push_str(&i.to_string()),
            PyJson::Float(f) => {
                if f.is_nan() {
                    out.push_str("NaN")
                } else if f.is_infinite() {
                    out.push_str(if *f > 0.0 { "Infinity" } else { "-Infinity" })
                } else {
                    out.push_str(&super::config::py_float_repr(*f))
                }
            }
            PyJson::Str(s) => write_str(s, out),
            PyJson::List(v) => {
                out.push('[');
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    x.write(out);
                }
                out.push(']');
            }
            PyJson::Dict(v) => {
                out.push('{');
                for (i, (k, x)) in v.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_str(k, out);
                    out.push_str(": ");
                    x.write(out);
                }
                out.push('}');
            }
        }
    }
}

/// `json.dumps` string escaping with `ensure_ascii=True`.
fn write_str(s: &str, out: &mut String) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04x}", u));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn tag_frequency_json(tf: &[(String, Vec<(String, usize)>)]) -> PyJson {
    PyJson::Dict(
        tf.iter()
            .map(|(d, f)| {
                (
                    d.clone(),
                    PyJson::Dict(
                        f.iter()
                            .map(|(t, n)| (t.clone(), PyJson::Int(*n as i64)))
                            .collect(),
                    ),
                )
            })
            .collect(),
    )
}

/// `dataset.bucket_info` (None without bucketing).
pub fn bucket_info_json(ds: &Dataset) -> PyJson {
    match &ds.bucket_info {
        None => PyJson::Null,
        Some(b) => PyJson::Dict(vec![
            (
                "buckets".into(),
                PyJson::Dict(
                    b.buckets
                        .iter()
                        .map(|(i, r, n)| {
                            (
                                i.to_string(),
                                PyJson::Dict(vec![
                                    (
                                        "resolution".into(),
                                        PyJson::List(vec![PyJson::Int(r.0), PyJson::Int(r.1)]),
                                    ),
                                    ("count".into(), PyJson::Int(*n as i64)),
                                ]),
                            )
                        })
                        .collect(),
                ),
            ),
            (
                "mean_img_ar_error".into(),
                if b.buckets.is_empty() {
                    PyJson::Int(0)
                } else {
                    PyJson::Float(b.mean_img_ar_error)
                },
            ),
        ]),
    }
}

/// `ss_datasets`, `ss_tag_frequency`, `ss_dataset_dirs` (TOML mode) or the per-directory
/// values of the non-TOML mode, for the LoRA metadata. `total_batch_size` is
/// train_batch_size × processes × gradient accumulation (the trainer knows the last two).
pub fn dataset_facts(group: &DatasetGroup, total_batch_size: i64) -> DatasetFacts {
    let args = &group.args;
    if args.dataset_config.is_some() {
        let mut datasets = vec![];
        let mut tag_frequency: Vec<(String, Vec<(String, usize)>)> = vec![];
        let mut dirs: Vec<(String, PyJson)> = vec![];
        for ds in &group.datasets {
            let db = ds.kind == DatasetKind::DreamBooth;
            let mut subsets = vec![];
            for s in &ds.subsets {
                let p = &s.params;
                let mut m = vec![
                    ("img_count".into(), PyJson::Int(s.img_count as i64)),
                    ("num_repeats".into(), PyJson::Int(p.num_repeats)),
                    ("color_aug".into(), PyJson::Bool(p.color_aug)),
                    ("flip_aug".into(), PyJson::Bool(p.flip_aug)),
                    ("random_crop".into(), PyJson::Bool(p.random_crop)),
                    ("shuffle_caption".into(), PyJson::Bool(p.shuffle_caption)),
                    ("keep_tokens".into(), PyJson::Int(p.keep_tokens)),
                    (
                        "keep_tokens_separator".into(),
                        PyJson::Str(p.keep_tokens_separator.clone()),
                    ),
                    (
                        "secondary_separator".into(),
                        PyJson::opt_str(&p.secondary_separator),
                    ),
                    ("enable_wildcard".into(), PyJson::Bool(p.enable_wildcard)),
                    ("caption_prefix".into(), PyJson::opt_str(&p.caption_prefix)),
                    ("caption_suffix".into(), PyJson::opt_str(&p.caption_suffix)),
                    (
                        "resize_interpolation".into(),
                        PyJson::opt_str(&p.resize_interpolation),
                    ),
                ];
                let mut key: Option<String> = None;
                if let Some(d) = p.image_dir.as_deref().filter(|d| !d.is_empty()) {
                    let b = py_basename(d).to_string();
                    m.push(("image_dir".into(), PyJson::Str(b.clone())));
                    key = Some(b);
                }
                if db {
                    m.push(("class_tokens".into(), PyJson::opt_str(&p.class_tokens)));
                    m.push(("is_reg".into(), PyJson::Bool(p.is_reg)));
                    if p.is_reg {
                        key = None;
                    }
                } else {
                    let mf = py_basename(p.metadata_file.as_deref().unwrap_or("")).to_string();
                    m.push(("metadata_file".into(), PyJson::Str(mf.clone())));
                    key = Some(mf);
                }
                subsets.push(PyJson::Dict(m));
                if let Some(k) = key {
                    let mut v = k.clone();
                    let mut i = 2;
                    while dirs.iter().any(|(d, _)| *d == v) {
                        v = format!("{k} ({i})");
                        i += 1;
                    }
                    dirs.push((
                        v,
                        PyJson::Dict(vec![
                            ("n_repeats".into(), PyJson::Int(p.num_repeats)),
                            ("img_count".into(), PyJson::Int(s.img_count as i64)),
                        ]),
                    ));
                }
            }
            datasets.push(PyJson::Dict(vec![
                ("is_dreambooth".into(), PyJson::Bool(db)),
                (
                    "batch_size_per_device".into(),
                    PyJson::Int(ds.batch_size as i64),
                ),
                (
                    "num_train_images".into(),
                    PyJson::Int(ds.num_train_images as i64),
                ),
                (
                    "num_reg_images".into(),
                    PyJson::Int(ds.num_reg_images as i64),
                ),
                (
                    "resolution".into(),
                    PyJson::List(vec![PyJson::Int(ds.width), PyJson::Int(ds.height)]),
                ),
                (
                    "enable_bucket".into(),
                    PyJson::Bool(ds.params.enable_bucket),
                ),
                (
                    "min_bucket_reso".into(),
                    PyJson::opt_int(ds.min_bucket_reso),
                ),
                (
                    "max_bucket_reso".into(),
                    PyJson::opt_int(ds.max_bucket_reso),
                ),
                (
                    "tag_frequency".into(),
                    tag_frequency_json(&ds.tag_frequency),
                ),
                ("bucket_info".into(), bucket_info_json(ds)),
                (
                    "resize_interpolation".into(),
                    PyJson::opt_str(&ds.params.resize_interpolation),
                ),
                ("subsets".into(), PyJson::List(subsets)),
            ]));
            for (d, f) in &ds.tag_frequency {
                if !tag_frequency.iter().any(|(x, _)| x == d) {
                    tag_frequency.push((d.clone(), f.clone()));
                }
            }
        }
        DatasetFacts::Toml {
            datasets_json: PyJson::List(datasets).dumps(),
            tag_frequency_json: tag_frequency_json(&tag_frequency).dumps(),
            dataset_dirs_json: PyJson::Dict(dirs).dumps(),
        }
    } else {
        let ds = &group.datasets[0];
        let mut dirs = vec![];
        let mut reg_dirs = vec![];
        for s in &ds.subsets {
            let p = &s.params;
            let name = match ds.kind {
                DatasetKind::DreamBooth => {
                    py_basename(p.image_dir.as_deref().unwrap_or("")).to_string()
                }
                DatasetKind::FineTuning => {
                    py_basename(p.metadata_file.as_deref().unwrap_or("")).to_string()
                }
            };
            let v = PyJson::Dict(vec![
                ("n_repeats".into(), PyJson::Int(p.num_repeats)),
                ("img_count".into(), PyJson::Int(s.img_count as i64)),
            ]);
            let target = if p.is_reg { &mut reg_dirs } else { &mut dirs };
            // a dict assignment: a repeated name overwrites in place
            match target
                .iter_mut()
                .find(|(n, _): &&mut (String, PyJson)| *n == name)
            {
                Some(e) => e.1 = v,
                None => target.push((name, v)),
            }
        }
        DatasetFacts::Dirs {
            batch_size_per_device: args.train_batch_size,
            total_batch_size,
            resolution: args.resolution,
            color_aug: args.color_aug,
            flip_aug: args.flip_aug,
            random_crop: args.random_crop,
            shuffle_caption: args.shuffle_caption,
            enable_bucket: ds.params.enable_bucket,
            bucket_no_upscale: ds.bucket_no_upscale,
            // sd-scripts writes "None" here when bucketing is off; DatasetFacts holds integers
            min_bucket_reso: ds.min_bucket_reso.unwrap_or(args.min_bucket_reso),
            max_bucket_reso: ds.max_bucket_reso.unwrap_or(args.max_bucket_reso),
            keep_tokens: args.keep_tokens,
            dataset_dirs_json: PyJson::Dict(dirs).dumps(),
            reg_dataset_dirs_json: PyJson::Dict(reg_dirs).dumps(),
            tag_frequency_json: tag_frequency_json(&ds.tag_frequency).dumps(),
            bucket_info_json: bucket_info_json(ds).dumps(),
        }
    }
}
