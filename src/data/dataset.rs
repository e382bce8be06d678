//! Datasets as sd-scripts builds them: image registration, captions, repeats, regularisation
//! balancing, buckets, batches, the epoch shuffles and the printed summary.
//! spec: sdscripts_cli_data.md §2.5–§2.8, §3.1–§3.6, §6.2.
use super::args::DataArgs;
use super::bucket::{make_bucket_resolutions, BucketManager, Reso};
use super::config::{
    self, py_float_repr, DatasetBlueprint, DatasetKind, DatasetParams, SubsetParams, UserConfig,
};
use super::image::{glob_images, image_size, join_py, read_caption, splitext_stem};
use super::log::{config_util, train_network, train_util, DataLog};
use super::pyrandom::PyRandom;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One registered image (`TU:ImageInfo`).
#[derive(Clone, Debug)]
pub struct ImageInfo {
    /// The path string as sd-scripts globbed it (dict key and registration identity).
    pub image_key: String,
    pub num_repeats: usize,
    pub caption: String,
    pub is_reg: bool,
    pub absolute_path: PathBuf,
    /// (W, H) of the file, from its header (or a cache file name).
    pub image_size: Option<Reso>,
    pub bucket_reso: Reso,
    pub resized_size: Reso,
    /// Index into the dataset's `subsets`.
    pub subset: usize,
    pub resize_interpolation: Option<String>,
    /// Set when latents are cached on disk.
    pub latents_npz: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct Subset {
    pub params: SubsetParams,
    pub img_count: usize,
}

/// One batch of one bucket (`TU:BucketBatchIndex`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketBatchIndex {
    pub bucket_index: usize,
    pub bucket_batch_size: usize,
    pub batch_index: usize,
}

/// The mutable order of a dataset: which batch is at which index, and the image order inside
/// each bucket. Every copy of the dataset (main process, each loader worker) has its own.
#[derive(Clone, Debug, PartialEq)]
pub struct OrderState {
    pub buckets_indices: Vec<BucketBatchIndex>,
    /// Image indices (one per repeat) per bucket, in the bucket manager's sorted bucket order.
    pub buckets: Vec<Vec<usize>>,
    pub current_epoch: i64,
}

impl OrderState {
    /// `shuffle_buckets()`: reseeds the global Python RNG, shuffles the batch list, then every
    /// bucket.
    pub fn shuffle(&mut self, seed: i128, rng: &mut PyRandom) {
        rng.seed(seed + self.current_epoch as i128);
        rng.shuffle(&mut self.buckets_indices);
        for b in &mut self.buckets {
            rng.shuffle(b);
        }
    }

    /// `set_current_epoch(epoch)`.
    /// `log`: where the lines go; `main_process`: this copy lives in sd-scripts' main process,
    /// whose global RNG the log's rich draws use (a DataLoader worker has its own).
    pub fn set_current_epoch(
        &mut self,
        epoch: i64,
        seed: i128,
        rng: &mut PyRandom,
        log: Option<&DataLog>,
        main_process: bool,
    ) {
        if self.current_epoch == epoch {
            return;
        }
        if epoch > self.current_epoch {
            if let Some(l) = log {
                let msg = format!(
                    "epoch is incremented. current_epoch: {}, epoch: {}",
                    self.current_epoch, epoch
                );
                if main_process {
                    l.info(train_util(784), msg);
                    l.discard_owed(); // shuffle_buckets reseeds right after the line
                } else {
                    l.info_in_worker(msg);
                }
            }
            for _ in 0..(epoch - self.current_epoch) {
                self.current_epoch += 1;
                self.shuffle(seed, rng);
            }
        } else {
            if let Some(l) = log {
                l.warn(
                    train_util(791),
                    format!(
                        "epoch is not incremented. current_epoch: {}, epoch: {}",
                        self.current_epoch, epoch
                    ),
                );
            }
            self.current_epoch = epoch;
        }
    }

    /// Image indices of the batch at dataset index `index` under this order.
    pub fn batch_images(&self, index: usize) -> &[usize] {
        let bi = self.buckets_indices[index];
        let bucket = &self.buckets[bi.bucket_index];
        let start = (bi.batch_index * bi.bucket_batch_size).min(bucket.len());
        let end = (start + bi.bucket_batch_size).min(bucket.len());
        &bucket[start..end]
    }
}

/// `bucket_info` of the metadata: per non-empty bucket (index, resolution, count) and the mean
/// aspect-ratio error.
#[derive(Clone, Debug, PartialEq)]
pub struct BucketInfo {
    pub buckets: Vec<(usize, Reso, usize)>,
    pub mean_img_ar_error: f64,
}

pub struct Dataset {
    pub kind: DatasetKind,
    pub params: DatasetParams,
    pub width: i64,
    pub height: i64,
    /// Effective bucket settings (None when bucketing is off, as sd-scripts prints them).
    pub min_bucket_reso: Option<i64>,
    pub max_bucket_reso: Option<i64>,
    pub bucket_reso_steps: Option<i64>,
    pub bucket_no_upscale: bool,
    pub batch_size: usize,
    pub subsets: Vec<Subset>,
    pub images: Vec<ImageInfo>,
    pub num_train_images: usize,
    pub num_reg_images: usize,
    pub bucket_resos: Vec<Reso>,
    pub bucket_info: Option<BucketInfo>,
    /// Order after `make_buckets` (epoch 0, `random.seed(0)`).
    pub initial_order: OrderState,
    /// `dataset_seed` (the same for every dataset of the group).
    pub seed: i128,
    /// Predefined bucket list (empty with bucket_no_upscale).
    pub predefined_resos: Vec<Reso>,
    /// `tag_frequency`: per directory (or metadata file) base name, tag → count, in first-seen
    /// order (for the LoRA metadata).
    pub tag_frequency: Vec<(String, Vec<(String, usize)>)>,
}

/// `os.path.basename`.
pub fn py_basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// `BaseDataset.set_tag_frequency(dir_name, captions)`: split on ",", strip, lower-case.
fn set_tag_frequency(
    tf: &mut Vec<(String, Vec<(String, usize)>)>,
    dir_name: &str,
    captions: &[String],
) {
    let idx = match tf.iter().position(|(d, _)| d == dir_name) {
        Some(i) => i,
        None => {
            tf.push((dir_name.to_string(), vec![]));
            tf.len() - 1
        }
    };
    let freq = &mut tf[idx].1;
    for c in captions {
        for tag in c.split(',') {
            let tag = super::image::py_strip(tag);
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

impl Dataset {
    /// `len(dataset)`: number of batches.
    pub fn len(&self) -> usize {
        self.initial_order.buckets_indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn subset_of(&self, image: usize) -> &SubsetParams {
        &self.subsets[self.images[image].subset].params
    }

    pub fn is_latent_cacheable(&self) -> bool {
        self.subsets
            .iter()
            .all(|s| !s.params.color_aug && !s.params.random_crop)
    }
}

fn sub_repr(s: &Option<String>) -> String {
    match s {
        Some(v) => v.clone(),
        None => "None".into(),
    }
}

fn bool_repr(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

fn toml_py_repr(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => py_float_repr(*f),
        toml::Value::Boolean(b) => bool_repr(*b).into(),
        toml::Value::Datetime(d) => d.to_string(),
        toml::Value::Array(a) => format!(
            "[{}]",
            a.iter().map(toml_py_repr).collect::<Vec<_>>().join(", ")
        ),
        toml::Value::Table(t) => format!(
            "{{{}}}",
            t.iter()
                .map(|(k, v)| format!("'{k}': {}", toml_py_repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The `print_info` block of `CU:generate_dataset_group_by_blueprint`.
pub fn summary_text(datasets: &[Dataset], dataset_type: &str) -> String {
    let mut info = String::new();
    for (i, d) in datasets.iter().enumerate() {
        info += &format!(
            "[{dataset_type} {i}]\n  batch_size: {}\n  resolution: ({}, {})\n  resize_interpolation: {}\n  enable_bucket: {}\n",
            d.batch_size,
            d.width,
            d.height,
            sub_repr(&d.params.resize_interpolation),
            bool_repr(d.params.enable_bucket)
        );
        if d.params.enable_bucket {
            let opt = |v: Option<i64>| v.map(|x| x.to_string()).unwrap_or("None".into());
            info += &format!(
                "  min_bucket_reso: {}\n  max_bucket_reso: {}\n  bucket_reso_steps: {}\n  bucket_no_upscale: {}\n\n",
                opt(d.min_bucket_reso),
                opt(d.max_bucket_reso),
                opt(d.bucket_reso_steps),
                bool_repr(d.bucket_no_upscale)
            );
        } else {
            info += "\n";
        }
        for (j, s) in d.subsets.iter().enumerate() {
            let p = &s.params;
            let face = match p.face_crop_aug_range {
                Some((a, b)) => format!("({}, {})", py_float_repr(a), py_float_repr(b)),
                None => "None".into(),
            };
            let custom = match &p.custom_attributes {
                Some(t) => toml_py_repr(&toml::Value::Table(t.clone())),
                None => "None".into(),
            };
            let image_dir = match &p.image_dir {
                Some(d) => d.clone(),
                None => "None".into(),
            };
            info += &format!(
                "  [Subset {j} of {dataset_type} {i}]\n    image_dir: \"{image_dir}\"\n    image_count: {}\n    num_repeats: {}\n    shuffle_caption: {}\n    keep_tokens: {}\n    caption_dropout_rate: {}\n    caption_dropout_every_n_epochs: {}\n    caption_tag_dropout_rate: {}\n    caption_prefix: {}\n    caption_suffix: {}\n    color_aug: {}\n    flip_aug: {}\n    face_crop_aug_range: {face}\n    random_crop: {}\n    token_warmup_min: {},\n    token_warmup_step: {},\n    alpha_mask: {}\n    resize_interpolation: {}\n    custom_attributes: {custom}\n",
                s.img_count,
                p.num_repeats,
                bool_repr(p.shuffle_caption),
                p.keep_tokens,
                p.caption_dropout_rate,
                p.caption_dropout_every_n_epochs,
                p.caption_tag_dropout_rate,
                sub_repr(&p.caption_prefix),
                sub_repr(&p.caption_suffix),
                bool_repr(p.color_aug),
                bool_repr(p.flip_aug),
                bool_repr(p.random_crop),
                p.token_warmup_min,
                p.token_warmup_step,
                bool_repr(p.alpha_mask),
                sub_repr(&p.resize_interpolation),
            );
            match d.kind {
                DatasetKind::DreamBooth => {
                    info += &format!(
                        "    is_reg: {}\n    class_tokens: {}\n    caption_extension: {}\n\n",
                        bool_repr(p.is_reg),
                        sub_repr(&p.class_tokens),
                        p.caption_extension
                    );
                }
                DatasetKind::FineTuning => {
                    info += &format!("    metadata_file: {}\n\n", sub_repr(&p.metadata_file));
                }
            }
        }
    }
    info
}

/// Sizes pre-filled from `<stem>_WWWWxHHHH_sd.npz` names (sd-scripts reads them before globbing
/// sizes from headers).
fn sizes_from_cache_names(dir: &Path, img_paths: &[String]) -> Vec<Option<Reso>> {
    let mut by_stem: HashMap<String, Reso> = HashMap::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with("_sd.npz"))
            .collect();
        names.sort();
        for n in names {
            let core = &n[..n.len() - "_sd.npz".len()];
            if let Some((stem, wh)) = core.rsplit_once('_') {
                if let Some((w, h)) = wh.split_once('x') {
                    if let (Ok(w), Ok(h)) = (w.parse::<i64>(), h.parse::<i64>()) {
                        by_stem.entry(join_py(dir, stem)).or_insert((w, h));
                    }
                }
            }
        }
    }
    img_paths
        .iter()
        .map(|p| by_stem.get(splitext_stem(p)).copied())
        .collect()
}

/// (min_bucket_reso, max_bucket_reso, bucket_reso_steps, bucket_no_upscale) as the dataset keeps them.
type BucketSettings = (Option<i64>, Option<i64>, Option<i64>, bool);

struct Builder<'a> {
    log: &'a DataLog,
    /// Why each ignored subset was left out, for the error when nothing is left.
    ignored: std::cell::RefCell<Vec<String>>,
}

impl Builder<'_> {
    fn ignore(&self, why: String) {
        self.ignored.borrow_mut().push(why);
    }

    fn resolution(&self, bp: &DatasetBlueprint, idx: usize, source: &str) -> Result<Reso> {
        let Some((w, h)) = bp.params.resolution else {
            bail!(
                "{source}: datasets[{idx}]: resolution is required / resolution（解像度）指定は必須です — pass --resolution=512,512 or set `resolution` in [general] or the [[datasets]] table"
            );
        };
        Ok((w, h))
    }

    fn bucket_settings(
        &self,
        p: &DatasetParams,
        reso: Reso,
        idx: usize,
        source: &str,
    ) -> Result<BucketSettings> {
        if !p.enable_bucket {
            return Ok((None, None, None, false));
        }
        let steps = p.bucket_reso_steps;
        if steps < 1 {
            bail!("{source}: datasets[{idx}]: bucket_reso_steps must be at least 1, got {steps}");
        }
        let mut min_r = p.min_bucket_reso;
        let mut max_r = p.max_bucket_reso;
        if min_r % steps != 0 {
            let adj = min_r - min_r % steps;
            self.log.warn(train_util(754), format!("min_bucket_reso is adjusted to be multiple of bucket_reso_steps / min_bucket_resoがbucket_reso_stepsの倍数になるように調整されました: {min_r} -> {adj}"));
            min_r = adj;
        }
        if max_r % steps != 0 {
            let adj = max_r + steps - max_r % steps;
            self.log.warn(train_util(761), format!("max_bucket_reso is adjusted to be multiple of bucket_reso_steps / max_bucket_resoがbucket_reso_stepsの倍数になるように調整されました: {max_r} -> {adj}"));
            max_r = adj;
        }
        if reso.0.min(reso.1) < min_r {
            bail!("{source}: datasets[{idx}]: min_bucket_reso ({min_r}) must be equal or less than resolution ({}, {}) / min_bucket_resoは最小解像度より大きくできません。解像度を大きくするかmin_bucket_resoを小さくしてください", reso.0, reso.1);
        }
        if reso.0.max(reso.1) > max_r {
            bail!("{source}: datasets[{idx}]: max_bucket_reso ({max_r}) must be equal or greater than resolution ({}, {}) / max_bucket_resoは最大解像度より小さくできません。解像度を小さくするかmin_bucket_resoを大きくしてください", reso.0, reso.1);
        }
        Ok((Some(min_r), Some(max_r), Some(steps), p.bucket_no_upscale))
    }

    fn dreambooth(&self, bp: &DatasetBlueprint, idx: usize, source: &str) -> Result<Dataset> {
        let reso = self.resolution(bp, idx, source)?;
        let (min_r, max_r, steps, no_up) = self.bucket_settings(&bp.params, reso, idx, source)?;
        let log = self.log;
        log.info(train_util(2112), "prepare images.");
        let mut ds = empty_dataset(bp, reso, (min_r, max_r, steps, no_up));
        let mut key_index: HashMap<String, usize> = HashMap::new();
        let mut reg_infos: Vec<ImageInfo> = Vec::new();
        let mut num_train = 0usize;
        let mut num_reg = 0usize;
        for sp in &bp.subsets {
            let dir_s = sp.image_dir.clone().unwrap_or_default();
            if sp.num_repeats < 1 {
                log.warn(train_util(2120), format!("ignore subset with image_dir='{dir_s}': num_repeats is less than 1 / num_repeatsが1を下回っているためサブセットを無視します: {}", sp.num_repeats));
                self.ignore(format!(
                    "image_dir '{dir_s}': num_repeats = {} (must be at least 1)",
                    sp.num_repeats
                ));
                continue;
            }
            if ds
                .subsets
                .iter()
                .any(|s| s.params.image_dir == sp.image_dir)
            {
                log.warn(train_util(2126), format!("ignore duplicated subset with image_dir='{dir_s}': use the first one / 既にサブセットが登録されているため、重複した後発のサブセットを無視します"));
                continue;
            }
            let dir = Path::new(&dir_s);
            let (img_paths, captions, sizes) = self.load_dreambooth_dir(sp, dir)?;
            if dir.is_dir() {
                set_tag_frequency(&mut ds.tag_frequency, py_basename(&dir_s), &captions);
            }
            if img_paths.is_empty() {
                log.warn(train_util(2133), format!("ignore subset with image_dir='{dir_s}': no images found / 画像が見つからないためサブセットを無視します"));
                self.ignore(if dir.is_dir() {
                    format!(
                        "image_dir '{dir_s}' holds no image files ({} directly inside it; subfolders are not searched)",
                        super::image::IMAGE_EXTENSIONS[..5].join(" ")
                    )
                } else {
                    format!("image_dir '{dir_s}' is not a directory")
                });
                continue;
            }
            let n = img_paths.len();
            let repeats = sp.num_repeats as usize;
            if sp.is_reg {
                num_reg += repeats * n;
            } else {
                num_train += repeats * n;
            }
            let subset_idx = ds.subsets.len();
            for ((p, c), size) in img_paths.into_iter().zip(captions).zip(sizes) {
                let info = ImageInfo {
                    image_key: p.clone(),
                    num_repeats: repeats,
                    caption: c,
                    is_reg: sp.is_reg,
                    absolute_path: PathBuf::from(&p),
                    image_size: size,
                    bucket_reso: (0, 0),
                    resized_size: (0, 0),
                    subset: subset_idx,
                    resize_interpolation: sp
                        .resize_interpolation
                        .clone()
                        .or(bp.params.resize_interpolation.clone()),
                    latents_npz: None,
                };
                if sp.is_reg {
                    reg_infos.push(info);
                } else {
                    register(&mut ds.images, &mut key_index, info);
                }
            }
            ds.subsets.push(Subset {
                params: sp.clone(),
                img_count: n,
            });
        }
        log.info(
            train_util(2158),
            format!("{num_train} train images with repeats."),
        );
        ds.num_train_images = num_train;
        log.info(
            train_util(2162),
            format!("{num_reg} reg images with repeats."),
        );
        if num_train < num_reg {
            log.warn(train_util(2164), "some of reg images are not used / 正則化画像の数が多いので、一部使用されない正則化画像があります");
        }
        if num_reg == 0 {
            log.warn(
                train_util(2167),
                "no regularization images / 正則化画像が見つかりませんでした",
            );
        } else {
            // first pass registers with each image's own repeats; later passes add one repeat
            // per image until the reg side reaches the train count
            let mut n = 0usize;
            let mut first = true;
            let mut reg_idx: Vec<usize> = Vec::new();
            while n < num_train {
                for (k, info) in reg_infos.iter().enumerate() {
                    if first {
                        n += info.num_repeats;
                        let i = register(&mut ds.images, &mut key_index, info.clone());
                        reg_idx.push(i);
                    } else {
                        ds.images[reg_idx[k]].num_repeats += 1;
                        n += 1;
                    }
                    if n >= num_train {
                        break;
                    }
                }
                first = false;
            }
        }
        ds.num_reg_images = num_reg;
        Ok(ds)
    }

    #[allow(clippy::type_complexity)]
    fn load_dreambooth_dir(
        &self,
        sp: &SubsetParams,
        dir: &Path,
    ) -> Result<(Vec<String>, Vec<String>, Vec<Option<Reso>>)> {
        let log = self.log;
        if !dir.is_dir() {
            log.warn(
                train_util(1974),
                format!("not directory: {}", dir.display()),
            );
            return Ok((vec![], vec![], vec![]));
        }
        let info_cache_file = dir.join("metadata_cache.json");
        let mut use_cached = sp.cache_info;
        if use_cached {
            log.info(train_util(1981), format!("using cached image info for this subset / このサブセットで、キャッシュされた画像情報を使います: {}", info_cache_file.display()));
            if !info_cache_file.is_file() {
                log.warn(train_util(1985), "image info file not found. You can ignore this warning if this is the first time to use this subset / キャッシュファイルが見つかりませんでした。初回実行時はこの警告を無視してください: {metadata_file}");
                use_cached = false;
            }
        }
        let (img_paths, captions, sizes, missing): (
            Vec<String>,
            Vec<String>,
            Vec<Option<Reso>>,
            Vec<String>,
        );
        if use_cached {
            let text = std::fs::read_to_string(&info_cache_file)
                .with_context(|| format!("reading {}", info_cache_file.display()))?;
            let entries = ordered_json_object(&text).with_context(|| {
                format!(
                    "{}: not a JSON object of image entries (delete it to rebuild it)",
                    info_cache_file.display()
                )
            })?;
            let mut p = vec![];
            let mut c = vec![];
            let mut s = vec![];
            let mut m = vec![];
            for (k, v) in entries {
                let cap = v
                    .get("caption")
                    .and_then(|x| x.as_str())
                    .unwrap_or("")
                    .to_string();
                let res = v
                    .get("resolution")
                    .and_then(|r| r.as_array())
                    .and_then(|a| Some((a.first()?.as_i64()?, a.get(1)?.as_i64()?)));
                if cap.is_empty() {
                    m.push(k.clone());
                }
                p.push(k);
                c.push(cap);
                s.push(res);
            }
            log_found_directory(log, dir, p.len());
            (img_paths, captions, sizes, missing) = (p, c, s, m);
        } else {
            let p = glob_images(dir)?;
            log.info(train_util(2005), "get image size from name of cache files");
            let s = sizes_from_cache_names(dir, &p);
            let set = s.iter().filter(|x| x.is_some()).count();
            log.info(
                train_util(2035),
                format!("set image size from cache files: {set}/{}", p.len()),
            );
            log_found_directory(log, dir, p.len());
            let mut c = vec![];
            let mut m = vec![];
            for img in &p {
                let cap = read_caption(img, &sp.caption_extension, sp.enable_wildcard)?;
                match (cap, &sp.class_tokens) {
                    (Some(cap), _) => c.push(cap),
                    (None, Some(ct)) => {
                        c.push(ct.clone());
                        m.push(img.clone());
                    }
                    (None, None) => {
                        // sd-scripts trains such an image with an empty caption after a
                        // warning; almost always a wrong caption_extension or a forgotten
                        // class_tokens, so we stop before training instead.
                        let stem = splitext_stem(img);
                        let ext = &sp.caption_extension;
                        let other = [".txt", ".caption"]
                            .iter()
                            .find(|e| *e != ext && Path::new(&format!("{stem}{e}")).is_file())
                            .map(|e| format!(" ({stem}{e} exists: set caption_extension = \"{e}\" or --caption_extension={e})"))
                            .unwrap_or_default();
                        bail!("{img}: neither caption file nor class tokens are found / キャプションファイルもclass tokenも見つかりませんでした: add {stem}{ext} or set class_tokens for this subset{other}");
                    }
                }
            }
            (img_paths, captions, sizes, missing) = (p, c, s, m);
        }
        if !missing.is_empty() {
            let n = missing.len();
            log.warn(train_util(2091), format!("No caption file found for {n} images. Training will continue without captions for these images. If class token exists, it will be used. / {n}枚の画像にキャプションファイルが見つかりませんでした。これらの画像についてはキャプションなしで学習を続行します。class tokenが存在する場合はそれを使います。"));
            for (i, m) in missing.iter().enumerate() {
                if i >= 5 {
                    log.warn(train_util(2095), format!("{m}... and {} more", n - 5));
                    break;
                }
                log.warn(train_util(2097), m.clone());
            }
        }
        if !use_cached && sp.cache_info {
            log.info(
                train_util(2099),
                format!(
                    "cache image info for / 画像情報をキャッシュします : {}",
                    info_cache_file.display()
                ),
            );
            let mut obj = serde_json::Map::new();
            let mut real_sizes = Vec::new();
            for p in &img_paths {
                real_sizes.push(image_size(Path::new(p))?);
            }
            // serde_json's map is sorted; sd-scripts writes in glob order, which is also sorted.
            for ((p, c), s) in img_paths.iter().zip(&captions).zip(&real_sizes) {
                obj.insert(
                    p.clone(),
                    serde_json::json!({"caption": c, "resolution": [s.0, s.1]}),
                );
            }
            let text = serde_json::to_string_pretty(&serde_json::Value::Object(obj))?;
            crate::io::write_bytes_atomic(&info_cache_file, text.as_bytes())?;
            log.info(
                train_util(2107),
                format!(
                    "cache image info done for / 画像情報を出力しました : {}",
                    info_cache_file.display()
                ),
            );
            let sizes = real_sizes.into_iter().map(Some).collect();
            return Ok((img_paths, captions, sizes));
        }
        Ok((img_paths, captions, sizes))
    }

    fn fine_tuning(&self, bp: &DatasetBlueprint, idx: usize, source: &str) -> Result<Dataset> {
        let reso = self.resolution(bp, idx, source)?;
        let settings = self.bucket_settings(&bp.params, reso, idx, source)?;
        let log = self.log;
        let mut ds = empty_dataset(bp, reso, settings);
        let mut key_index: HashMap<String, usize> = HashMap::new();
        for sp in &bp.subsets {
            let mf = sp.metadata_file.clone().unwrap_or_default();
            if sp.num_repeats < 1 {
                log.warn(train_util(2231), format!("ignore subset with metadata_file='{mf}': num_repeats is less than 1 / num_repeatsが1を下回っているためサブセットを無視します: {}", sp.num_repeats));
                self.ignore(format!(
                    "metadata_file '{mf}': num_repeats = {} (must be at least 1)",
                    sp.num_repeats
                ));
                continue;
            }
            if ds
                .subsets
                .iter()
                .any(|s| s.params.metadata_file == sp.metadata_file)
            {
                log.warn(train_util(2237), format!("ignore duplicated subset with metadata_file='{mf}': use the first one / 既にサブセットが登録されているため、重複した後発のサブセットを無視します"));
                continue;
            }
            if !Path::new(&mf).exists() {
                bail!("no metadata / メタデータファイルがありません: {mf}");
            }
            let text =
                std::fs::read_to_string(&mf).with_context(|| format!("reading metadata {mf}"))?;
            let entries: Vec<(String, serde_json::Value)> = if mf.ends_with(".jsonl") {
                log.info(
                    train_util(2244),
                    format!("loading existing JSOL metadata: {mf}"),
                );
                let mut v = vec![];
                for (ln, line) in text.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let j: serde_json::Value = serde_json::from_str(line)
                        .with_context(|| format!("{mf}: line {}: not valid JSON", ln + 1))?;
                    let Some(p) = j.get("image_path").and_then(|p| p.as_str()) else {
                        bail!("{mf}: line {}: missing \"image_path\"", ln + 1);
                    };
                    v.push((p.to_string(), j.clone()));
                }
                v
            } else {
                log.info(train_util(2259), format!("loading existing metadata: {mf}"));
                ordered_json_object(&text).with_context(|| {
                    format!("{mf}: not a JSON object {{image_key: {{caption, tags}}}}")
                })?
            };
            if entries.is_empty() {
                log.warn(train_util(2267), format!("ignore subset with '{mf}': no image entries found / 画像に関するデータが見つからないためサブセットを無視します"));
                self.ignore(format!("metadata_file '{mf}' lists no images"));
                continue;
            }
            let subset_idx = ds.subsets.len();
            // sd-scripts registers the keys longest first (stable sort)
            let mut order: Vec<usize> = (0..entries.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(entries[i].0.chars().count()));
            let mut from_md = 0;
            let mut tags_list: Vec<String> = vec![];
            for i in order {
                let (key, md) = &entries[i];
                let abs = if Path::new(key).is_absolute() {
                    key.clone()
                } else {
                    let Some(dir) = &sp.image_dir else {
                        bail!("{mf}: image_dir is required when image paths are relative / 画像パスが相対パスの場合、image_dirの指定が必要です: {key}");
                    };
                    join_py(Path::new(dir), key)
                };
                let mut caption = md
                    .get("caption")
                    .and_then(|c| c.as_str())
                    .unwrap_or("")
                    .to_string();
                let tags = md.get("tags").and_then(|t| t.as_str()).map(str::to_string);
                if sp.enable_wildcard {
                    if let Some(t) = tags {
                        let t = t.replace('\n', &sp.caption_separator);
                        tags_list.push(t.clone());
                        caption = caption
                            .split('\n')
                            .filter(|l| !l.trim().is_empty())
                            .map(|l| format!("{l}{}{t}", sp.caption_separator))
                            .collect::<Vec<_>>()
                            .join("\n");
                    }
                } else if let Some(t) = tags.filter(|t| !t.is_empty()) {
                    if !caption.is_empty() {
                        caption.push_str(&sp.caption_separator);
                    }
                    caption.push_str(&t);
                    tags_list.push(t);
                }
                let size = md
                    .get("image_size")
                    .and_then(|s| s.as_array())
                    .and_then(|a| Some((a.first()?.as_i64()?, a.get(1)?.as_i64()?)));
                if size.is_some() {
                    from_md += 1;
                }
                let info = ImageInfo {
                    image_key: key.clone(),
                    num_repeats: sp.num_repeats as usize,
                    caption,
                    is_reg: false,
                    absolute_path: PathBuf::from(abs),
                    image_size: size,
                    bucket_reso: (0, 0),
                    resized_size: (0, 0),
                    subset: subset_idx,
                    resize_interpolation: sp
                        .resize_interpolation
                        .clone()
                        .or(bp.params.resize_interpolation.clone()),
                    latents_npz: None,
                };
                register(&mut ds.images, &mut key_index, info);
            }
            if from_md > 0 {
                log.info(
                    train_util(2365),
                    format!("set image size from metadata: {from_md}/{}", entries.len()),
                );
            }
            ds.num_train_images += entries.len() * sp.num_repeats as usize;
            set_tag_frequency(&mut ds.tag_frequency, py_basename(&mf), &tags_list);
            ds.subsets.push(Subset {
                params: sp.clone(),
                img_count: entries.len(),
            });
        }
        Ok(ds)
    }
}

/// A JSON object's entries in file order (serde_json's own map is sorted).
fn ordered_json_object(text: &str) -> Result<Vec<(String, serde_json::Value)>> {
    use serde::de::{Deserializer, MapAccess, Visitor};
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<(String, serde_json::Value)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(
            self,
            mut m: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut v = Vec::new();
            while let Some((k, val)) = m.next_entry::<String, serde_json::Value>()? {
                v.push((k, val));
            }
            Ok(v)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    Ok(de.deserialize_map(V)?)
}

/// `register_image`: a dict keyed by image_key (a re-registered key keeps its first position).
fn register(
    images: &mut Vec<ImageInfo>,
    index: &mut HashMap<String, usize>,
    info: ImageInfo,
) -> usize {
    if let Some(&i) = index.get(&info.image_key) {
        images[i] = info;
        i
    } else {
        index.insert(info.image_key.clone(), images.len());
        images.push(info);
        images.len() - 1
    }
}

fn empty_dataset(bp: &DatasetBlueprint, reso: Reso, s: BucketSettings) -> Dataset {
    Dataset {
        kind: bp.kind,
        params: bp.params.clone(),
        width: reso.0,
        height: reso.1,
        min_bucket_reso: s.0,
        max_bucket_reso: s.1,
        bucket_reso_steps: s.2,
        bucket_no_upscale: s.3,
        batch_size: bp.params.batch_size.max(1) as usize,
        subsets: vec![],
        images: vec![],
        num_train_images: 0,
        num_reg_images: 0,
        bucket_resos: vec![],
        bucket_info: None,
        initial_order: OrderState {
            buckets_indices: vec![],
            buckets: vec![],
            current_epoch: 0,
        },
        seed: 0,
        predefined_resos: vec![],
        tag_frequency: vec![],
    }
}

/// sd-scripts' line after listing a subset's images (one call site, reached on both the
/// cached-info and the scanning path).
fn log_found_directory(log: &DataLog, dir: &Path, n: usize) {
    log.info(
        train_util(2059),
        format!("found directory {} contains {n} image files", dir.display()),
    );
}

/// `make_buckets` (sizes, bucket assignment, repeats, batches) and the initial `random.seed(0)`
/// shuffle on the global RNG `rng`.
pub fn make_buckets(
    ds: &mut Dataset,
    rng: &mut PyRandom,
    log: &DataLog,
    progress: bool,
) -> Result<()> {
    log.info(train_util(992), "loading image sizes.");
    let pb = progress_bar(progress, ds.images.len() as u64, "loading image sizes");
    for info in ds.images.iter_mut() {
        if info.image_size.is_none() {
            info.image_size = Some(image_size(&info.absolute_path)?);
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    if ds.params.enable_bucket {
        log.info(train_util(1015), "make buckets");
    } else {
        log.info(train_util(1017), "prepare dataset");
    }
    let mut bm;
    let mut ar_errors = Vec::new();
    if ds.params.enable_bucket {
        let steps = ds.bucket_reso_steps.unwrap_or(64);
        bm = BucketManager::new(ds.bucket_no_upscale, (ds.width, ds.height), steps);
        if !ds.bucket_no_upscale {
            let resos = make_bucket_resolutions(
                (ds.width, ds.height),
                ds.min_bucket_reso.unwrap_or(256),
                ds.max_bucket_reso.unwrap_or(1024),
                steps,
            );
            bm.set_predefined_resos(resos);
        } else {
            log.warn(train_util(1033), "min_bucket_reso and max_bucket_reso are ignored if bucket_no_upscale is set, because bucket reso is defined by image size automatically / bucket_no_upscaleが指定された場合は、bucketの解像度は画像サイズから自動計算されるため、min_bucket_resoとmax_bucket_resoは無視されます");
        }
        for info in ds.images.iter_mut() {
            let (w, h) = info.image_size.unwrap();
            let a = bm.select_bucket(w, h);
            info.bucket_reso = a.bucket_reso;
            info.resized_size = a.resized_size;
            ar_errors.push(a.ar_error.abs());
        }
        bm.sort();
    } else {
        bm = BucketManager::new(false, (ds.width, ds.height), 64);
        bm.set_predefined_resos(vec![(ds.width, ds.height)]);
        for info in ds.images.iter_mut() {
            let (w, h) = info.image_size.unwrap();
            let a = bm.select_bucket(w, h);
            info.bucket_reso = a.bucket_reso;
            info.resized_size = a.resized_size;
        }
    }
    for (i, info) in ds.images.iter().enumerate() {
        for _ in 0..info.num_repeats {
            bm.add_image(info.bucket_reso, i);
        }
    }
    if ds.params.enable_bucket {
        log.info(
            train_util(1061),
            "number of images (including repeats) / 各bucketの画像枚数（繰り返し回数を含む）",
        );
        let mut buckets = vec![];
        for (i, (reso, b)) in bm.resos.iter().zip(&bm.buckets).enumerate() {
            if !b.is_empty() {
                buckets.push((i, *reso, b.len()));
                log.info(
                    train_util(1066),
                    format!(
                        "bucket {i}: resolution ({}, {}), count: {}",
                        reso.0,
                        reso.1,
                        b.len()
                    ),
                );
            }
        }
        let mean = if ar_errors.is_empty() {
            0.0
        } else {
            ar_errors.iter().sum::<f64>() / ar_errors.len() as f64
        };
        // numpy prints a float64 scalar with repr(); an int 0 when there were no images
        let mean_s = if ar_errors.is_empty() {
            "0".to_string()
        } else {
            py_float_repr(mean)
        };
        log.info(
            train_util(1074),
            format!("mean ar error (without repeats): {mean_s}"),
        );
        ds.bucket_info = Some(BucketInfo {
            buckets,
            mean_img_ar_error: mean,
        });
    }
    let mut indices = vec![];
    for (bi, b) in bm.buckets.iter().enumerate() {
        let n = b.len().div_ceil(ds.batch_size);
        for k in 0..n {
            indices.push(BucketBatchIndex {
                bucket_index: bi,
                bucket_batch_size: ds.batch_size,
                batch_index: k,
            });
        }
    }
    ds.bucket_resos = bm.resos.clone();
    ds.predefined_resos = bm.predefined_resos().to_vec();
    let mut order = OrderState {
        buckets_indices: indices,
        buckets: bm.buckets.clone(),
        current_epoch: 0,
    };
    // self.seed is still 0 here: the first order never depends on --seed (spec §6.2)
    log.discard_owed(); // the draws of the lines so far are erased by the reseed
    order.shuffle(0, rng);
    ds.initial_order = order;
    Ok(())
}

pub(crate) fn progress_bar(show: bool, len: u64, msg: &'static str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg}: {percent:>3}%|{wide_bar}| {pos}/{len} [{elapsed}<{eta}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_message(msg);
    pb
}

/// All datasets of a run, with the state sd-scripts keeps around them.
pub struct DatasetGroup {
    pub datasets: Vec<Dataset>,
    pub num_train_images: usize,
    pub num_reg_images: usize,
    /// `dataset_seed = random.randint(0, 2**31)`, the base of every epoch reshuffle.
    pub dataset_seed: i128,
    /// The global Python RNG after the dataset was built (next draws come from here in the
    /// single-process loader).
    pub main_rng: PyRandom,
    pub log: DataLog,
    pub args: DataArgs,
    pub source: String,
    /// Memory-cached latents per dataset and image (filled by `cache::cache_latents`).
    pub latents: Vec<Vec<Option<super::loader::CachedLatents>>>,
}

impl DatasetGroup {
    /// `len(train_dataset_group)`: batches per epoch over all datasets.
    pub fn len(&self) -> usize {
        self.datasets.iter().map(|d| d.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Maps a group index to (dataset, index inside it), as ConcatDataset does.
    pub fn locate(&self, mut idx: usize) -> (usize, usize) {
        for (i, d) in self.datasets.iter().enumerate() {
            if idx < d.len() {
                return (i, idx);
            }
            idx -= d.len();
        }
        panic!("dataset index out of range");
    }

    /// `batch size per device` as the trainer prints it (one per dataset, ", "-joined).
    pub fn batch_sizes_text(&self) -> String {
        self.datasets
            .iter()
            .map(|d| d.batch_size.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn is_latent_cacheable(&self) -> bool {
        self.datasets.iter().all(|d| d.is_latent_cacheable())
    }

    /// The data lines of the trainer's "running training / 学習開始" block (spec §4.2).
    pub fn count_lines(&self) -> Vec<String> {
        vec![
            format!(
                "  num train images * repeats / 学習画像の数×繰り返し回数: {}",
                self.num_train_images
            ),
            "  num validation images * repeats / 学習画像の数×繰り返し回数: 0".to_string(),
            format!("  num reg images / 正則化画像の数: {}", self.num_reg_images),
            format!("  num batches per epoch / 1epochのバッチ数: {}", self.len()),
        ]
    }

    /// Resolutions of the datasets, (W, H).
    pub fn resolutions(&self) -> Vec<Reso> {
        self.datasets.iter().map(|d| (d.width, d.height)).collect()
    }
}

/// Validates everything that can be validated before training, builds every dataset and prints
/// sd-scripts' lines. `args.seed` must be resolved (None is refused: sd-scripts draws a random
/// seed before this point; the trainer does that and records it).
pub fn build_dataset_group(args: &DataArgs) -> Result<DatasetGroup> {
    build_dataset_group_with_log(args, DataLog::default(), true)
}

/// As [`build_dataset_group`], logging into `log`; `progress` shows bars for the long loops.
pub fn build_dataset_group_with_log(
    args: &DataArgs,
    log: DataLog,
    progress: bool,
) -> Result<DatasetGroup> {
    let Some(seed) = args.seed else {
        bail!("internal: DataArgs.seed must be set before building the dataset (sd-scripts draws a random --seed first)");
    };
    validate_args(args)?;
    let cfg: UserConfig = if let Some(path) = &args.dataset_config {
        log.info(
            train_network(519),
            format!("Loading dataset config from {}", path.display()),
        );
        let cfg = config::load_user_config(path, args.masked_loss)?;
        if args.train_data_dir.is_some() || args.reg_data_dir.is_some() || args.in_json.is_some() {
            log.warn(train_network(524), "ignoring the following options because config file is found: train_data_dir, reg_data_dir, in_json / 設定ファイルが利用されるため以下のオプションは無視されます: train_data_dir, reg_data_dir, in_json");
        }
        cfg
    } else if let Some(in_json) = &args.in_json {
        log.info(train_network(541), "Training with captions.");
        let mut s = toml::Table::new();
        if let Some(d) = &args.train_data_dir {
            s.insert(
                "image_dir".into(),
                toml::Value::String(d.display().to_string()),
            );
        }
        s.insert(
            "metadata_file".into(),
            toml::Value::String(in_json.display().to_string()),
        );
        let mut d = toml::Table::new();
        d.insert(
            "subsets".into(),
            toml::Value::Array(vec![toml::Value::Table(s.clone())]),
        );
        UserConfig {
            source: "--in_json".into(),
            general: toml::Table::new(),
            datasets: vec![(d, vec![s])],
        }
    } else {
        log.info(train_network(530), "Using DreamBooth method.");
        if args.train_data_dir.is_none() {
            bail!("no training data: pass --dataset_config=config.toml, or --train_data_dir with folders named like 10_name (and --reg_data_dir for regularisation images)");
        }
        let l2 = log.clone();
        let subsets = config::dreambooth_subsets_by_subdirs(
            args.train_data_dir.as_deref(),
            args.reg_data_dir.as_deref(),
            &mut |m| l2.warn(config_util(613), m),
        )?;
        let mut d = toml::Table::new();
        d.insert(
            "subsets".into(),
            toml::Value::Array(subsets.iter().cloned().map(toml::Value::Table).collect()),
        );
        UserConfig {
            source: "--train_data_dir".into(),
            general: toml::Table::new(),
            datasets: vec![(d, subsets)],
        }
    };
    let blueprints = config::generate_blueprint(&cfg, args);
    check_blueprints(&blueprints, args, &cfg.source)?;
    let b = Builder {
        log: &log,
        ignored: Default::default(),
    };
    let mut datasets = Vec::new();
    for (i, bp) in blueprints.iter().enumerate() {
        let ds = match bp.kind {
            DatasetKind::DreamBooth => b.dreambooth(bp, i, &cfg.source)?,
            DatasetKind::FineTuning => b.fine_tuning(bp, i, &cfg.source)?,
        };
        datasets.push(ds);
    }
    log.info(config_util(580), summary_text(&datasets, "Dataset"));
    // set_seed(seed) then the first draw of the global RNG
    let mut rng = PyRandom::new(seed as i128);
    log.settle(&mut rng); // rich's draws for the lines logged since set_seed (see data::log)
    let dataset_seed = rng.randint(0, 1i64 << 31) as i128;
    for (i, ds) in datasets.iter_mut().enumerate() {
        log.info(config_util(592), format!("[Prepare dataset {i}]"));
        make_buckets(ds, &mut rng, &log, progress)?;
        ds.seed = dataset_seed;
    }
    let group = DatasetGroup {
        num_train_images: datasets.iter().map(|d| d.num_train_images).sum(),
        num_reg_images: datasets.iter().map(|d| d.num_reg_images).sum(),
        datasets,
        dataset_seed,
        main_rng: rng,
        log: log.clone(),
        args: args.clone(),
        source: cfg.source.clone(),
        latents: vec![],
    };
    if group.is_empty() {
        let why = b.ignored.borrow();
        bail!(
            "No data found. Please verify arguments (train_data_dir must be the parent of folders with images) / 画像がありません。引数指定を確認してください（train_data_dirには画像があるフォルダではなく、画像があるフォルダの親フォルダを指定する必要があります）{}",
            if why.is_empty() {
                String::new()
            } else {
                format!("\nsubsets left out:\n  {}", why.join("\n  "))
            }
        );
    }
    if (args.cache_latents || args.cache_latents_to_disk) && !group.is_latent_cacheable() {
        {
            bail!("when caching latents, either color_aug or random_crop cannot be used / latentをキャッシュするときはcolor_augとrandom_cropは使えません");
        }
    }
    for (i, d) in group.datasets.iter().enumerate() {
        if let Some(steps) = d.bucket_reso_steps {
            if steps % 64 != 0 {
                bail!("{}: datasets[{i}]: bucket_reso_steps is {steps}. it must be divisible by 64.\nbucket_reso_stepsが{steps}です。64で割り切れる必要があります", group.source);
            }
        }
    }
    super::loader::verify_images(&group, progress)?;
    Ok(group)
}

fn validate_args(args: &DataArgs) -> Result<()> {
    if args.train_batch_size < 1 {
        bail!(
            "--train_batch_size must be at least 1, got {}",
            args.train_batch_size
        );
    }
    if args.vae_batch_size < 1 {
        bail!(
            "--vae_batch_size must be at least 1, got {}",
            args.vae_batch_size
        );
    }
    if args.max_data_loader_n_workers < 0 {
        bail!(
            "--max_data_loader_n_workers must not be negative, got {}",
            args.max_data_loader_n_workers
        );
    }
    if args.persistent_data_loader_workers && args.max_data_loader_n_workers == 0 {
        bail!("--persistent_data_loader_workers needs --max_data_loader_n_workers > 0 (persistent_workers option needs num_workers > 0)");
    }
    super::caption::max_length_for(args.max_token_length)?;
    for (name, v) in [
        ("--caption_dropout_rate", args.caption_dropout_rate),
        ("--caption_tag_dropout_rate", args.caption_tag_dropout_rate),
    ] {
        if !(0.0..=1.0).contains(&v) {
            bail!("{name} is a probability between 0 and 1, got {v}");
        }
    }
    if let Some(d) = &args.dataset_config {
        if !d.is_file() {
            bail!(
                "--dataset_config: file not found / ファイルが見つかりません: {}",
                d.display()
            );
        }
    }
    if let Some(j) = &args.in_json {
        if args.dataset_config.is_none() && !j.is_file() {
            bail!(
                "--in_json: no metadata / メタデータファイルがありません: {}",
                j.display()
            );
        }
    }
    Ok(())
}

/// Options sdlora cannot honour yet are refused up front rather than ignored.
fn check_blueprints(bps: &[DatasetBlueprint], args: &DataArgs, source: &str) -> Result<()> {
    for (i, bp) in bps.iter().enumerate() {
        if bp.params.validation_split > 0.0 {
            bail!("{source}: datasets[{i}]: validation_split is not supported by sdlora yet; remove it");
        }
        for (j, s) in bp.subsets.iter().enumerate() {
            let w = format!("{source}: datasets[{i}].subsets[{j}]");
            if s.alpha_mask {
                bail!("{w}: alpha_mask is not supported by sdlora yet");
            }
            if s.face_crop_aug_range.is_some() {
                bail!("{w}: face_crop_aug_range is not supported by sdlora yet");
            }
            if let Some(ri) = s
                .resize_interpolation
                .as_deref()
                .or(bp.params.resize_interpolation.as_deref())
            {
                if !["lanczos", "box", "area"].contains(&ri) {
                    bail!("{w}: resize_interpolation `{ri}` is not supported by sdlora yet (supported: lanczos, box, area, or unset)");
                }
            }
        }
    }
    let _ = args;
    Ok(())
}
