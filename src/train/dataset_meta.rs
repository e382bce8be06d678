//! The dataset part of a LoRA's metadata (`ss_datasets`, `ss_tag_frequency`,
//! `ss_dataset_dirs`, …) as `json.dumps` writes it in train_network.py (spec:
//! sdscripts_cli_data.md §5.4): default separators, ASCII escapes, Python key order.
use super::args::TrainArgs;
use crate::data::config::DatasetKind;
use crate::data::dataset::{Dataset, DatasetGroup};
use crate::lora::metadata::{py_float, py_json_str, DatasetFacts};

fn opt_str(v: &Option<String>) -> String {
    v.as_deref()
        .map(py_json_str)
        .unwrap_or_else(|| "null".into())
}

fn obj(pairs: &[(&str, String)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}: {v}", py_json_str(k)))
        .collect();
    format!("{{{}}}", inner.join(", "))
}

fn basename(p: &str) -> String {
    let t = p.trim_end_matches(['/', '\\']);
    match t.rfind(['/', '\\']) {
        Some(i) if t.len() == p.len() => t[i + 1..].to_string(),
        // os.path.basename of "dir/" is ""
        _ if t.len() != p.len() => String::new(),
        _ => t.to_string(),
    }
}

/// `set_tag_frequency` per subset directory, in first-seen order: lower-cased, stripped,
/// comma-separated tags of every caption (once per image, not per repeat).
fn tag_frequency(ds: &Dataset) -> Vec<(String, Vec<(String, i64)>)> {
    let mut dirs: Vec<(String, Vec<(String, i64)>)> = vec![];
    for (si, sub) in ds.subsets.iter().enumerate() {
        let Some(dir) = sub
            .params
            .image_dir
            .as_deref()
            .or(sub.params.metadata_file.as_deref())
        else {
            continue;
        };
        let name = basename(dir);
        let pos = match dirs.iter().position(|(d, _)| *d == name) {
            Some(p) => p,
            None => {
                dirs.push((name, vec![]));
                dirs.len() - 1
            }
        };
        let freq = &mut dirs[pos].1;
        for img in ds.images.iter().filter(|i| i.subset == si) {
            for tag in img.caption.split(',') {
                let tag = tag.trim();
                if tag.is_empty() {
                    continue;
                }
                let tag = tag.to_lowercase();
                match freq.iter_mut().find(|(t, _)| *t == tag) {
                    Some(e) => e.1 += 1,
                    None => freq.push((tag, 1)),
                }
            }
        }
    }
    dirs
}

fn freq_json(dirs: &[(String, Vec<(String, i64)>)]) -> String {
    let parts: Vec<(String, String)> = dirs
        .iter()
        .map(|(d, f)| {
            let inner: Vec<String> = f
                .iter()
                .map(|(t, n)| format!("{}: {n}", py_json_str(t)))
                .collect();
            (d.clone(), format!("{{{}}}", inner.join(", ")))
        })
        .collect();
    let inner: Vec<String> = parts
        .iter()
        .map(|(k, v)| format!("{}: {v}", py_json_str(k)))
        .collect();
    format!("{{{}}}", inner.join(", "))
}

fn bucket_info_json(ds: &Dataset) -> String {
    match &ds.bucket_info {
        None => "null".into(),
        Some(b) => {
            let buckets: Vec<String> = b
                .buckets
                .iter()
                .map(|(i, r, c)| {
                    format!(
                        "\"{i}\": {{\"resolution\": [{}, {}], \"count\": {c}}}",
                        r.0, r.1
                    )
                })
                .collect();
            format!(
                "{{\"buckets\": {{{}}}, \"mean_img_ar_error\": {}}}",
                buckets.join(", "),
                py_float(b.mean_img_ar_error)
            )
        }
    }
}

fn opt_int(v: Option<i64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "null".into())
}

/// TOML mode (`--dataset_config`): `ss_datasets`, `ss_tag_frequency`, `ss_dataset_dirs`.
pub fn toml_facts(group: &DatasetGroup) -> DatasetFacts {
    let mut datasets = vec![];
    let mut tag_freq: Vec<(String, Vec<(String, i64)>)> = vec![];
    let mut dirs: Vec<(String, String)> = vec![];
    for ds in &group.datasets {
        let dreambooth = ds.kind == DatasetKind::DreamBooth;
        let tf = tag_frequency(ds);
        let mut subsets = vec![];
        for sub in &ds.subsets {
            let p = &sub.params;
            let mut fields: Vec<(&str, String)> = vec![
                ("img_count", sub.img_count.to_string()),
                ("num_repeats", p.num_repeats.to_string()),
                ("color_aug", p.color_aug.to_string()),
                ("flip_aug", p.flip_aug.to_string()),
                ("random_crop", p.random_crop.to_string()),
                ("shuffle_caption", p.shuffle_caption.to_string()),
                ("keep_tokens", p.keep_tokens.to_string()),
                (
                    "keep_tokens_separator",
                    py_json_str(&p.keep_tokens_separator),
                ),
                ("secondary_separator", opt_str(&p.secondary_separator)),
                ("enable_wildcard", p.enable_wildcard.to_string()),
                ("caption_prefix", opt_str(&p.caption_prefix)),
                ("caption_suffix", opt_str(&p.caption_suffix)),
                ("resize_interpolation", opt_str(&p.resize_interpolation)),
            ];
            let mut dir_key = None;
            if let Some(d) = p.image_dir.as_deref().filter(|d| !d.is_empty()) {
                let b = basename(d);
                fields.push(("image_dir", py_json_str(&b)));
                dir_key = Some(b);
            }
            if dreambooth {
                fields.push(("class_tokens", opt_str(&p.class_tokens)));
                fields.push(("is_reg", p.is_reg.to_string()));
                if p.is_reg {
                    dir_key = None;
                }
            } else {
                let b = basename(p.metadata_file.as_deref().unwrap_or(""));
                fields.push(("metadata_file", py_json_str(&b)));
                dir_key = Some(b);
            }
            subsets.push(obj(&fields));
            if let Some(k) = dir_key {
                let mut v = k.clone();
                let mut i = 2;
                while dirs.iter().any(|(d, _)| *d == v) {
                    v = format!("{k} ({i})");
                    i += 1;
                }
                dirs.push((
                    v,
                    format!(
                        "{{\"n_repeats\": {}, \"img_count\": {}}}",
                        p.num_repeats, sub.img_count
                    ),
                ));
            }
        }
        let fields: Vec<(&str, String)> = vec![
            ("is_dreambooth", dreambooth.to_string()),
            ("batch_size_per_device", ds.batch_size.to_string()),
            ("num_train_images", ds.num_train_images.to_string()),
            ("num_reg_images", ds.num_reg_images.to_string()),
            ("resolution", format!("[{}, {}]", ds.width, ds.height)),
            ("enable_bucket", ds.params.enable_bucket.to_string()),
            ("min_bucket_reso", opt_int(ds.min_bucket_reso)),
            ("max_bucket_reso", opt_int(ds.max_bucket_reso)),
            ("tag_frequency", freq_json(&tf)),
            ("bucket_info", bucket_info_json(ds)),
            (
                "resize_interpolation",
                opt_str(&ds.params.resize_interpolation),
            ),
            ("subsets", format!("[{}]", subsets.join(", "))),
        ];
        datasets.push(obj(&fields));
        for (d, f) in tf {
            if !tag_freq.iter().any(|(k, _)| *k == d) {
                tag_freq.push((d, f));
            }
        }
    }
    let dirs_json: Vec<String> = dirs
        .iter()
        .map(|(k, v)| format!("{}: {v}", py_json_str(k)))
        .collect();
    DatasetFacts::Toml {
        datasets_json: format!("[{}]", datasets.join(", ")),
        tag_frequency_json: freq_json(&tag_freq),
        dataset_dirs_json: format!("{{{}}}", dirs_json.join(", ")),
    }
}

/// Folder mode (`--train_data_dir` / `--in_json`): the single dataset's flat keys.
pub fn dirs_facts(group: &DatasetGroup, a: &TrainArgs) -> anyhow::Result<DatasetFacts> {
    let ds = &group.datasets[0];
    let mut dirs = vec![];
    let mut reg_dirs = vec![];
    for sub in &ds.subsets {
        let p = &sub.params;
        let name = basename(
            p.image_dir
                .as_deref()
                .or(p.metadata_file.as_deref())
                .unwrap_or(""),
        );
        let v = format!(
            "{}: {{\"n_repeats\": {}, \"img_count\": {}}}",
            py_json_str(&name),
            p.num_repeats,
            sub.img_count
        );
        if p.is_reg && ds.kind == DatasetKind::DreamBooth {
            reg_dirs.push(v);
        } else {
            dirs.push(v);
        }
    }
    Ok(DatasetFacts::Dirs {
        batch_size_per_device: a.train_batch_size,
        total_batch_size: a.train_batch_size * a.gradient_accumulation_steps,
        resolution: a.resolution_wh()?,
        color_aug: a.color_aug,
        flip_aug: a.flip_aug,
        random_crop: a.random_crop,
        shuffle_caption: a.shuffle_caption,
        enable_bucket: ds.params.enable_bucket,
        bucket_no_upscale: ds.params.bucket_no_upscale,
        min_bucket_reso: ds.min_bucket_reso.unwrap_or(ds.params.min_bucket_reso),
        max_bucket_reso: ds.max_bucket_reso.unwrap_or(ds.params.max_bucket_reso),
        keep_tokens: a.keep_tokens,
        dataset_dirs_json: format!("{{{}}}", dirs.join(", ")),
        reg_dataset_dirs_json: format!("{{{}}}", reg_dirs.join(", ")),
        tag_frequency_json: freq_json(&tag_frequency(ds)),
        bucket_info_json: bucket_info_json(ds),
    })
}

#[cfg(test)]
mod tests {
    use super::basename;

    #[test]
    fn basename_is_os_path_basename() {
        assert_eq!(basename("/a/b/data"), "data");
        assert_eq!(basename("data"), "data");
        assert_eq!(basename("/a/b/data/"), "");
    }
}
