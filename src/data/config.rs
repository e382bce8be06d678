//! `--dataset_config`: sd-scripts' dataset TOML/JSON schema, validated up front, and the
//! blueprint (per-dataset and per-subset parameters after precedence).
//! spec: sdscripts_cli_data.md §2.1–§2.6.
use super::args::DataArgs;
use anyhow::{bail, Context, Result};
use std::fmt;
use std::path::{Path, PathBuf};
use toml::Value;

/// A number as Python holds it: sd-scripts prints `0` for an int and `0.0` for a float, and the
/// dataset summary must read the same.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PyNum {
    Int(i64),
    Float(f64),
}

impl PyNum {
    pub fn get(self) -> f64 {
        match self {
            PyNum::Int(i) => i as f64,
            PyNum::Float(f) => f,
        }
    }
}

impl fmt::Display for PyNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PyNum::Int(i) => write!(f, "{i}"),
            PyNum::Float(x) => write!(f, "{}", py_float_repr(*x)),
        }
    }
}

/// Python's `repr(float)`: shortest round-trip digits, scientific below 1e-4 and from 1e16.
pub fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let e = format!("{x:e}"); // shortest digits, e.g. "1.5e-5"
    let (mant, exp) = e.split_once('e').unwrap();
    let exp: i32 = exp.parse().unwrap();
    if (-4..16).contains(&exp) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mant}e{sign}{:02}", exp.abs())
    }
}

/// Which kind of value a key takes (voluptuous types of `CU:ConfigSanitizer`).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Ty {
    Bool,
    Int,
    /// `float` only: an int is rejected (validation_split, network_multiplier).
    Float,
    /// `Any(float, int)`.
    Num,
    Str,
    /// int or [int, int]
    Reso,
    /// exactly [float, float]
    FloatPair,
    Dict,
}

impl Ty {
    fn describe(self) -> &'static str {
        match self {
            Ty::Bool => "a boolean (true/false)",
            Ty::Int => "an integer",
            Ty::Float => "a float (write 0.0, not 0)",
            Ty::Num => "a number",
            Ty::Str => "a string",
            Ty::Reso => "an integer or a list of two integers [width, height]",
            Ty::FloatPair => "a list of exactly two floats [low, high]",
            Ty::Dict => "a table",
        }
    }
}

const SUBSET_ASCENDABLE: &[(&str, Ty)] = &[
    ("color_aug", Ty::Bool),
    ("face_crop_aug_range", Ty::FloatPair),
    ("flip_aug", Ty::Bool),
    ("num_repeats", Ty::Int),
    ("random_crop", Ty::Bool),
    ("shuffle_caption", Ty::Bool),
    ("keep_tokens", Ty::Int),
    ("keep_tokens_separator", Ty::Str),
    ("secondary_separator", Ty::Str),
    ("caption_separator", Ty::Str),
    ("enable_wildcard", Ty::Bool),
    ("token_warmup_min", Ty::Int),
    ("token_warmup_step", Ty::Num),
    ("caption_prefix", Ty::Str),
    ("caption_suffix", Ty::Str),
    ("custom_attributes", Ty::Dict),
    ("resize_interpolation", Ty::Str),
];
const DROPOUT: &[(&str, Ty)] = &[
    ("caption_dropout_every_n_epochs", Ty::Int),
    ("caption_dropout_rate", Ty::Num),
    ("caption_tag_dropout_rate", Ty::Num),
];
const DB_SUBSET_ASCENDABLE: &[(&str, Ty)] = &[
    ("caption_extension", Ty::Str),
    ("class_tokens", Ty::Str),
    ("cache_info", Ty::Bool),
];
const DB_SUBSET_DISTINCT: &[(&str, Ty)] = &[
    ("image_dir", Ty::Str),
    ("is_reg", Ty::Bool),
    ("alpha_mask", Ty::Bool),
];
const FT_SUBSET_DISTINCT: &[(&str, Ty)] = &[
    ("metadata_file", Ty::Str),
    ("image_dir", Ty::Str),
    ("alpha_mask", Ty::Bool),
];
const DATASET_ASCENDABLE: &[(&str, Ty)] = &[
    ("batch_size", Ty::Int),
    ("bucket_no_upscale", Ty::Bool),
    ("bucket_reso_steps", Ty::Int),
    ("enable_bucket", Ty::Bool),
    ("max_bucket_reso", Ty::Int),
    ("min_bucket_reso", Ty::Int),
    ("validation_seed", Ty::Int),
    ("validation_split", Ty::Float),
    ("resolution", Ty::Reso),
    ("network_multiplier", Ty::Float),
    ("resize_interpolation", Ty::Str),
];
/// Keys sd-scripts takes only from the command line; named in the error when found in a file.
const CLI_ONLY: &[&str] = &[
    "prior_loss_weight",
    "debug_dataset",
    "max_token_length",
    "train_batch_size",
    "dataset_repeats",
    "train_data_dir",
    "reg_data_dir",
    "in_json",
    "cache_latents",
    "cache_latents_to_disk",
    "vae_batch_size",
];

const INTERPOLATIONS: &[&str] = &[
    "lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box",
];

fn lookup(groups: &[&[(&str, Ty)]], key: &str) -> Option<Ty> {
    groups
        .iter()
        .flat_map(|g| g.iter())
        .find(|(k, _)| *k == key)
        .map(|(_, t)| *t)
}

fn value_desc(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string {s:?}"),
        Value::Integer(i) => format!("the integer {i}"),
        Value::Float(f) => format!("the float {}", py_float_repr(*f)),
        Value::Boolean(b) => format!("the boolean {b}"),
        Value::Datetime(d) => format!("the date {d}"),
        Value::Array(a) => format!("a list of {} element(s)", a.len()),
        Value::Table(_) => "a table".into(),
    }
}

fn type_ok(ty: Ty, v: &Value) -> bool {
    match ty {
        Ty::Bool => v.is_bool(),
        Ty::Int => v.is_integer(),
        Ty::Float => v.is_float(),
        Ty::Num => v.is_float() || v.is_integer(),
        Ty::Str => v.is_str(),
        Ty::Reso => match v {
            Value::Integer(_) => true,
            Value::Array(a) => a.len() == 2 && a.iter().all(|x| x.is_integer()),
            _ => false,
        },
        Ty::FloatPair => match v {
            Value::Array(a) => a.len() == 2 && a.iter().all(|x| x.is_float()),
            _ => false,
        },
        Ty::Dict => v.is_table(),
    }
}

/// A validated dataset config: `[general]`, then each dataset with its subsets, as tables.
#[derive(Clone, Debug, Default)]
pub struct UserConfig {
    /// Where it came from (for messages); "<command line>" for the non-TOML modes.
    pub source: String,
    pub general: toml::Table,
    pub datasets: Vec<(toml::Table, Vec<toml::Table>)>,
}

/// Reads and validates a `.toml` or `.json` dataset config (`CU:load_user_config`).
pub fn load_user_config(path: &Path, masked_loss: bool) -> Result<UserConfig> {
    if !path.is_file() {
        bail!(
            "--dataset_config: file not found / ファイルが見つかりません: {}",
            path.display()
        );
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading dataset config {}", path.display()))?;
    let root: toml::Table = if name.ends_with(".json") {
        let j: serde_json::Value = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: Error on parsing JSON config file. Please check the format. / JSON 形式の設定ファイルの読み込みに失敗しました。文法が正しいか確認してください。",
                path.display()
            )
        })?;
        match json_to_toml(&j) {
            Some(Value::Table(t)) => t,
            _ => bail!(
                "{}: the JSON config must be an object with \"general\" and \"datasets\" (null values are not allowed)",
                path.display()
            ),
        }
    } else if name.ends_with(".toml") {
        text.parse::<toml::Table>().map_err(|e| {
            anyhow::anyhow!(
                "{}: Error on parsing TOML config file. Please check the format. / TOML 形式の設定ファイルの読み込みに失敗しました。文法が正しいか確認してください。\n{e}",
                path.display()
            )
        })?
    } else {
        bail!(
            "--dataset_config: not supported config file format / 対応していない設定ファイルの形式です: {} (use .toml or .json)",
            path.display()
        );
    };
    validate_user_config(&root, &path.display().to_string(), masked_loss)
}

fn json_to_toml(j: &serde_json::Value) -> Option<Value> {
    Some(match j {
        serde_json::Value::Null => return None,
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Integer(i)
            } else {
                Value::Float(n.as_f64()?)
            }
        }
        serde_json::Value::String(s) => Value::String(s.clone()),
        serde_json::Value::Array(a) => {
            Value::Array(a.iter().map(json_to_toml).collect::<Option<Vec<_>>>()?)
        }
        serde_json::Value::Object(o) => {
            let mut t = toml::Table::new();
            for (k, v) in o {
                t.insert(k.clone(), json_to_toml(v)?);
            }
            Value::Table(t)
        }
    })
}

fn check_table(
    file: &str,
    where_: &str,
    table: &toml::Table,
    allowed: &[&[(&str, Ty)]],
    allow_subsets: bool,
    level: Level,
) -> Result<()> {
    for (key, v) in table {
        if allow_subsets && key == "subsets" {
            continue;
        }
        let Some(ty) = lookup(allowed, key) else {
            let hint = if level == Level::Subset && lookup(&[DATASET_ASCENDABLE], key).is_some() {
                format!("`{key}` is a dataset-level key: move it to its [[datasets]] table or to [general]")
            } else if level != Level::Subset
                && lookup(&[DB_SUBSET_DISTINCT, FT_SUBSET_DISTINCT], key).is_some()
            {
                format!("`{key}` belongs in a [[datasets.subsets]] table")
            } else if level == Level::FtDataset && lookup(&[DB_SUBSET_ASCENDABLE], key).is_some() {
                format!("`{key}` is not allowed in a fine-tuning dataset (its subsets have metadata_file)")
            } else if CLI_ONLY.contains(&key.as_str()) {
                format!("`{key}` is a command-line option (--{key}), not a dataset config key")
            } else {
                let mut names: Vec<&str> = allowed
                    .iter()
                    .flat_map(|g| g.iter().map(|(k, _)| *k))
                    .collect();
                if allow_subsets {
                    names.push("subsets");
                }
                names.sort();
                names.dedup();
                format!("allowed keys here: {}", names.join(", "))
            };
            bail!("{file}: [{where_}] unknown key `{key}` (extra keys not allowed); {hint}");
        };
        if !type_ok(ty, v) {
            bail!(
                "{file}: [{where_}] key `{key}` must be {}, got {}",
                ty.describe(),
                value_desc(v)
            );
        }
        check_range(file, where_, key, v)?;
    }
    Ok(())
}

/// Values sd-scripts would accept at load time and then fail on (or silently misuse) later.
fn check_range(file: &str, where_: &str, key: &str, v: &Value) -> Result<()> {
    let bad = |what: &str| -> Result<()> {
        bail!(
            "{file}: [{where_}] key `{key}` = {}: {what}",
            match v {
                Value::String(s) => format!("{s:?}"),
                other => other.to_string(),
            }
        )
    };
    let f = v.as_float().or(v.as_integer().map(|i| i as f64));
    let i = v.as_integer();
    let neg_i = i.is_some_and(|i| i < 0);
    let lt1 = i.is_some_and(|i| i < 1);
    let not_prob = f.is_some_and(|f| !(0.0..=1.0).contains(&f));
    let empty = v.as_str().is_some_and(|s| s.is_empty());
    match key {
        "batch_size" | "bucket_reso_steps" if lt1 => bad("must be at least 1"),
        "min_bucket_reso" | "max_bucket_reso" if lt1 => bad("must be a positive number of pixels"),
        "resolution" => {
            let vals: Vec<i64> = match v {
                Value::Integer(i) => vec![*i],
                Value::Array(a) => a.iter().filter_map(|x| x.as_integer()).collect(),
                _ => vec![],
            };
            if vals.iter().any(|&x| x < 1) {
                return bad("must be positive");
            }
            Ok(())
        }
        "keep_tokens" | "caption_dropout_every_n_epochs" | "token_warmup_min" if neg_i => {
            bad("must not be negative")
        }
        "token_warmup_step" if f.is_some_and(|f| f < 0.0) => bad("must not be negative"),
        "caption_dropout_rate" | "caption_tag_dropout_rate" if not_prob => {
            bad("is a probability: it must be between 0 and 1")
        }
        "validation_split" if not_prob => bad("must be between 0.0 and 1.0"),
        "face_crop_aug_range" => {
            if let Value::Array(a) = v {
                let lo = a[0].as_float().unwrap_or(0.0);
                let hi = a[1].as_float().unwrap_or(0.0);
                if lo > hi {
                    return bad("low must not exceed high");
                }
            }
            Ok(())
        }
        "resize_interpolation" => match v.as_str() {
            Some(s) if !INTERPOLATIONS.contains(&s) => {
                bad(&format!("must be one of {}", INTERPOLATIONS.join(", ")))
            }
            _ => Ok(()),
        },
        "caption_extension" | "caption_separator" | "image_dir" | "metadata_file" if empty => {
            bad("must not be empty")
        }
        _ => Ok(()),
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Level {
    General,
    DbDataset,
    FtDataset,
    Subset,
}

/// Validates the parsed root table (schema of `CU:ConfigSanitizer(True, True, masked_loss, True)`).
pub fn validate_user_config(
    root: &toml::Table,
    file: &str,
    masked_loss: bool,
) -> Result<UserConfig> {
    let _ = masked_loss; // ControlNet-style subsets are not supported; see DatasetKind.
    let mut cfg = UserConfig {
        source: file.to_string(),
        ..Default::default()
    };
    for (key, v) in root {
        match key.as_str() {
            "general" => {
                let Value::Table(t) = v else {
                    bail!(
                        "{file}: `general` must be a table ([general]), got {}",
                        value_desc(v)
                    );
                };
                check_table(
                    file,
                    "general",
                    t,
                    &[
                        SUBSET_ASCENDABLE,
                        DROPOUT,
                        DB_SUBSET_ASCENDABLE,
                        DATASET_ASCENDABLE,
                    ],
                    false,
                    Level::General,
                )?;
                cfg.general = t.clone();
            }
            "datasets" => {
                let Value::Array(a) = v else {
                    bail!(
                        "{file}: `datasets` must be an array of tables ([[datasets]]), got {}",
                        value_desc(v)
                    );
                };
                for (i, d) in a.iter().enumerate() {
                    let Value::Table(dt) = d else {
                        bail!(
                            "{file}: datasets[{i}] must be a table, got {}",
                            value_desc(d)
                        );
                    };
                    cfg.datasets.push(validate_dataset(file, i, dt)?);
                }
            }
            other => {
                let hint = if lookup(
                    &[
                        SUBSET_ASCENDABLE,
                        DROPOUT,
                        DB_SUBSET_ASCENDABLE,
                        DATASET_ASCENDABLE,
                    ],
                    other,
                )
                .is_some()
                {
                    format!("; put `{other}` under [general] or a [[datasets]] table")
                } else {
                    String::new()
                };
                bail!(
                    "{file}: [top level] unknown key `{other}` (extra keys not allowed); only [general] and [[datasets]] are allowed{hint}"
                );
            }
        }
    }
    Ok(cfg)
}

fn validate_dataset(
    file: &str,
    i: usize,
    dt: &toml::Table,
) -> Result<(toml::Table, Vec<toml::Table>)> {
    let where_ = format!("datasets[{i}]");
    let mut subsets = Vec::new();
    if let Some(s) = dt.get("subsets") {
        let Value::Array(a) = s else {
            bail!(
                "{file}: [{where_}] `subsets` must be an array of tables ([[datasets.subsets]]), got {}",
                value_desc(s)
            );
        };
        for (j, st) in a.iter().enumerate() {
            let Value::Table(st) = st else {
                bail!(
                    "{file}: [{where_}.subsets[{j}]] must be a table, got {}",
                    value_desc(st)
                );
            };
            subsets.push(st.clone());
        }
    }
    let n_ft = subsets
        .iter()
        .filter(|s| s.contains_key("metadata_file"))
        .count();
    let is_ft = !subsets.is_empty() && n_ft == subsets.len();
    if n_ft > 0 && !is_ft {
        bail!(
            "{file}: [{where_}] DreamBooth subset and fine tuning subset cannot be mixed in the same dataset. Please split them into separate datasets. / DreamBoothのサブセットとfine tuninのサブセットを同一のデータセットに混在させることはできません。別々のデータセットに分割してください。 (subsets with metadata_file: {n_ft} of {})",
            subsets.len()
        );
    }
    if is_ft {
        check_table(
            file,
            &where_,
            dt,
            &[DATASET_ASCENDABLE, SUBSET_ASCENDABLE, DROPOUT],
            true,
            Level::FtDataset,
        )?;
    } else {
        check_table(
            file,
            &where_,
            dt,
            &[
                DATASET_ASCENDABLE,
                SUBSET_ASCENDABLE,
                DB_SUBSET_ASCENDABLE,
                DROPOUT,
            ],
            true,
            Level::DbDataset,
        )?;
    }
    for (j, st) in subsets.iter().enumerate() {
        let sw = format!("{where_}.subsets[{j}]");
        if is_ft {
            check_table(
                file,
                &sw,
                st,
                &[SUBSET_ASCENDABLE, FT_SUBSET_DISTINCT, DROPOUT],
                false,
                Level::Subset,
            )?;
        } else {
            check_table(
                file,
                &sw,
                st,
                &[
                    SUBSET_ASCENDABLE,
                    DB_SUBSET_DISTINCT,
                    DB_SUBSET_ASCENDABLE,
                    DROPOUT,
                ],
                false,
                Level::Subset,
            )?;
            if !st.contains_key("image_dir") {
                bail!(
                    "{file}: [{sw}] required key `image_dir` not provided (the folder with this subset's images)"
                );
            }
        }
    }
    Ok((dt.clone(), subsets))
}

// ---------------------------------------------------------------------------------------------
// Blueprint: parameters after precedence (spec §2.3, §2.4)

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetKind {
    DreamBooth,
    FineTuning,
}

#[derive(Clone, Debug)]
pub struct SubsetParams {
    pub image_dir: Option<String>,
    pub num_repeats: i64,
    pub shuffle_caption: bool,
    pub caption_separator: String,
    pub keep_tokens: i64,
    pub keep_tokens_separator: String,
    pub secondary_separator: Option<String>,
    pub enable_wildcard: bool,
    pub color_aug: bool,
    pub flip_aug: bool,
    pub face_crop_aug_range: Option<(f64, f64)>,
    pub random_crop: bool,
    pub caption_prefix: Option<String>,
    pub caption_suffix: Option<String>,
    pub caption_dropout_rate: PyNum,
    pub caption_dropout_every_n_epochs: i64,
    pub caption_tag_dropout_rate: PyNum,
    pub token_warmup_min: i64,
    pub token_warmup_step: PyNum,
    pub custom_attributes: Option<toml::Table>,
    pub resize_interpolation: Option<String>,
    pub alpha_mask: bool,
    // DreamBooth
    pub is_reg: bool,
    pub class_tokens: Option<String>,
    pub caption_extension: String,
    pub cache_info: bool,
    // fine-tuning
    pub metadata_file: Option<String>,
}

#[derive(Clone, Debug)]
pub struct DatasetParams {
    pub resolution: Option<(i64, i64)>,
    pub network_multiplier: f64,
    pub debug_dataset: bool,
    pub validation_seed: Option<i64>,
    pub validation_split: f64,
    pub resize_interpolation: Option<String>,
    pub batch_size: i64,
    pub enable_bucket: bool,
    pub min_bucket_reso: i64,
    pub max_bucket_reso: i64,
    pub bucket_reso_steps: i64,
    pub bucket_no_upscale: bool,
    pub prior_loss_weight: f64,
}

#[derive(Clone, Debug)]
pub struct DatasetBlueprint {
    pub kind: DatasetKind,
    pub params: DatasetParams,
    pub subsets: Vec<SubsetParams>,
}

/// First non-None value along subset → dataset → general (then the caller falls back to CLI).
struct Chain<'a>(Vec<&'a toml::Table>);

impl Chain<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find_map(|t| t.get(key))
    }
    fn bool(&self, key: &str, cli: bool) -> bool {
        self.get(key).and_then(|v| v.as_bool()).unwrap_or(cli)
    }
    fn int(&self, key: &str, cli: i64) -> i64 {
        self.get(key).and_then(|v| v.as_integer()).unwrap_or(cli)
    }
    fn opt_int(&self, key: &str, cli: Option<i64>) -> Option<i64> {
        self.get(key).and_then(|v| v.as_integer()).or(cli)
    }
    fn float(&self, key: &str, cli: f64) -> f64 {
        self.get(key)
            .and_then(|v| v.as_float().or(v.as_integer().map(|i| i as f64)))
            .unwrap_or(cli)
    }
    fn num(&self, key: &str, cli: PyNum) -> PyNum {
        match self.get(key) {
            Some(Value::Integer(i)) => PyNum::Int(*i),
            Some(Value::Float(f)) => PyNum::Float(*f),
            _ => cli,
        }
    }
    fn string(&self, key: &str, cli: &str) -> String {
        self.get(key)
            .and_then(|v| v.as_str())
            .unwrap_or(cli)
            .to_string()
    }
    fn opt_string(&self, key: &str, cli: Option<&String>) -> Option<String> {
        self.get(key)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .or(cli.cloned())
    }
}

/// Applies sd-scripts' precedence: subset > dataset > general > CLI > dataclass default.
pub fn generate_blueprint(cfg: &UserConfig, args: &DataArgs) -> Vec<DatasetBlueprint> {
    let mut out = Vec::new();
    for (dt, subsets) in &cfg.datasets {
        let kind = if !subsets.is_empty() && subsets.iter().all(|s| s.contains_key("metadata_file"))
        {
            DatasetKind::FineTuning
        } else {
            DatasetKind::DreamBooth
        };
        let dchain = Chain(vec![dt, &cfg.general]);
        let resolution = match dchain.get("resolution") {
            Some(Value::Integer(s)) => Some((*s, *s)),
            Some(Value::Array(a)) => Some((
                a[0].as_integer().unwrap_or(0),
                a[1].as_integer().unwrap_or(0),
            )),
            _ => args.resolution,
        };
        let params = DatasetParams {
            resolution,
            network_multiplier: dchain.float("network_multiplier", 1.0),
            debug_dataset: args.debug_dataset,
            validation_seed: dchain.opt_int("validation_seed", args.validation_seed),
            validation_split: dchain.float("validation_split", args.validation_split),
            resize_interpolation: dchain
                .opt_string("resize_interpolation", args.resize_interpolation.as_ref()),
            batch_size: dchain.int("batch_size", args.train_batch_size),
            enable_bucket: dchain.bool("enable_bucket", args.enable_bucket),
            min_bucket_reso: dchain.int("min_bucket_reso", args.min_bucket_reso),
            max_bucket_reso: dchain.int("max_bucket_reso", args.max_bucket_reso),
            bucket_reso_steps: dchain.int("bucket_reso_steps", args.bucket_reso_steps),
            bucket_no_upscale: dchain.bool("bucket_no_upscale", args.bucket_no_upscale),
            prior_loss_weight: args.prior_loss_weight,
        };
        let mut sps = Vec::new();
        for st in subsets {
            let c = Chain(vec![st, dt, &cfg.general]);
            let face = match c.get("face_crop_aug_range") {
                Some(Value::Array(a)) => Some((
                    a[0].as_float().unwrap_or(0.0),
                    a[1].as_float().unwrap_or(0.0),
                )),
                _ => args.face_crop_aug_range,
            };
            // argparse's default for --token_warmup_step is the int 0; a given value is a float.
            let tws_cli = if args.token_warmup_step == 0.0 {
                PyNum::Int(0)
            } else {
                PyNum::Float(args.token_warmup_step)
            };
            let db = kind == DatasetKind::DreamBooth;
            sps.push(SubsetParams {
                image_dir: c
                    .get("image_dir")
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
                num_repeats: c.int("num_repeats", args.dataset_repeats),
                shuffle_caption: c.bool("shuffle_caption", args.shuffle_caption),
                caption_separator: c.string("caption_separator", &args.caption_separator),
                keep_tokens: c.int("keep_tokens", args.keep_tokens),
                keep_tokens_separator: c
                    .string("keep_tokens_separator", &args.keep_tokens_separator),
                secondary_separator: c
                    .opt_string("secondary_separator", args.secondary_separator.as_ref()),
                enable_wildcard: c.bool("enable_wildcard", args.enable_wildcard),
                color_aug: c.bool("color_aug", args.color_aug),
                flip_aug: c.bool("flip_aug", args.flip_aug),
                face_crop_aug_range: face,
                random_crop: c.bool("random_crop", args.random_crop),
                caption_prefix: c.opt_string("caption_prefix", args.caption_prefix.as_ref()),
                caption_suffix: c.opt_string("caption_suffix", args.caption_suffix.as_ref()),
                caption_dropout_rate: c.num(
                    "caption_dropout_rate",
                    PyNum::Float(args.caption_dropout_rate),
                ),
                caption_dropout_every_n_epochs: c.int(
                    "caption_dropout_every_n_epochs",
                    args.caption_dropout_every_n_epochs,
                ),
                caption_tag_dropout_rate: c.num(
                    "caption_tag_dropout_rate",
                    PyNum::Float(args.caption_tag_dropout_rate),
                ),
                token_warmup_min: c.int("token_warmup_min", args.token_warmup_min),
                token_warmup_step: c.num("token_warmup_step", tws_cli),
                custom_attributes: c
                    .get("custom_attributes")
                    .and_then(|v| v.as_table().cloned()),
                resize_interpolation: c
                    .opt_string("resize_interpolation", args.resize_interpolation.as_ref()),
                alpha_mask: c.bool("alpha_mask", args.alpha_mask),
                is_reg: db && c.bool("is_reg", false),
                class_tokens: if db {
                    c.get("class_tokens")
                        .and_then(|v| v.as_str())
                        .map(str::to_string)
                } else {
                    None
                },
                caption_extension: c.string("caption_extension", &args.caption_extension),
                cache_info: c.bool("cache_info", args.cache_info),
                metadata_file: c
                    .get("metadata_file")
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
            });
        }
        out.push(DatasetBlueprint {
            kind,
            params,
            subsets: sps,
        });
    }
    out
}

/// Non-TOML DreamBooth mode: each `N_tokens` folder of --train_data_dir (then --reg_data_dir)
/// is a subset (`CU:generate_dreambooth_subsets_config_by_subdirs`). Folder order is sorted by
/// name here; sd-scripts uses unsorted `Path.iterdir()` order (spec §2.6), which on most
/// filesystems is not reproducible anyway.
pub fn dreambooth_subsets_by_subdirs(
    train_data_dir: Option<&Path>,
    reg_data_dir: Option<&Path>,
    warn: &mut dyn FnMut(String),
) -> Result<Vec<toml::Table>> {
    let mut out = Vec::new();
    for (dir, is_reg) in [(train_data_dir, false), (reg_data_dir, true)] {
        let Some(dir) = dir else { continue };
        if !dir.is_dir() {
            if is_reg {
                bail!("--reg_data_dir: {} is not a directory", dir.display());
            }
            bail!(
                "--train_data_dir: {} is not a directory (it must be the parent of folders named like 10_name)",
                dir.display()
            );
        }
        let mut subdirs: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        subdirs.sort();
        for sub in subdirs {
            let name = sub
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut tokens = name.split('_');
            let first = tokens.next().unwrap_or("");
            let Ok(n) = py_int(first) else {
                warn(format!(
                    "ignore directory without repeats / 繰り返し回数のないディレクトリを無視します: {name}"
                ));
                continue;
            };
            if n < 1 {
                continue;
            }
            let class_tokens: Vec<&str> = tokens.collect();
            let mut t = toml::Table::new();
            t.insert("image_dir".into(), Value::String(sub.display().to_string()));
            t.insert("num_repeats".into(), Value::Integer(n));
            t.insert("is_reg".into(), Value::Boolean(is_reg));
            t.insert("class_tokens".into(), Value::String(class_tokens.join("_")));
            out.push(t);
        }
    }
    Ok(out)
}

/// Python's `int(str)` for the repeat prefix: optional sign, digits, surrounding whitespace,
/// underscores between digits are not possible here (we split on "_").
fn py_int(s: &str) -> Result<i64> {
    let t = s.trim();
    if t.is_empty() {
        bail!("empty");
    }
    Ok(t.parse::<i64>()?)
}
