//! `sdlora train` flags: every train_network.py option with argparse's types and defaults
//! (spec: sdscripts_cli_data.md §1.1–§1.3), parsed the way argparse does (`--flag=value`,
//! `--flag value`, store_true flags, nargs="*" lists, unambiguous prefixes), merged with a
//! `--config_file` TOML (CLI > config file > default), then checked: flags sdlora does not
//! implement are refused in one error, sd-scripts' rejected combinations give its messages.
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// How argparse converts an option's string(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgKind {
    StoreTrue,
    Str,
    Int,
    Float,
    /// sd-scripts' `int_or_float`: "N" (≥ 1) → int, "0.x" → float ratio, "N%" → ratio.
    IntOrFloat,
    Path,
}

/// An argparse default (`None` where argparse has None).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum D {
    None,
    False,
    Int(i64),
    Float(f64),
    Str(&'static str),
}

/// What sdlora does with an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S {
    /// Implemented with sd-scripts' behaviour.
    Yes,
    /// Accepted for command-line compatibility; changes nothing in sdlora (reason).
    NoEffect(&'static str),
    /// Not implemented: a non-default value is refused (reason / what to do instead).
    No(&'static str),
}

/// One option of the table in args_table.rs.
#[derive(Debug, Clone, Copy)]
pub struct FlagSpec {
    pub name: &'static str,
    pub kind: ArgKind,
    /// nargs="*": zero or more values, a list.
    pub star: bool,
    pub default: D,
    /// argparse `choices` as strings ("None" stands for Python's None).
    pub choices: &'static [&'static str],
    pub support: S,
}

/// A parsed value, with Python's types (config-file values keep their TOML type, as sd-scripts
/// does not convert them).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
}

impl Value {
    fn from_default(d: D) -> Value {
        match d {
            D::None => Value::None,
            D::False => Value::Bool(false),
            D::Int(i) => Value::Int(i),
            D::Float(f) => Value::Float(f),
            D::Str(s) => Value::Str(s.to_string()),
        }
    }
    /// Python `==` (1 == 1.0, True == 1).
    pub fn py_eq(&self, other: &Value) -> bool {
        fn num(v: &Value) -> Option<f64> {
            match v {
                Value::Int(i) => Some(*i as f64),
                Value::Float(f) => Some(*f),
                Value::Bool(b) => Some(*b as i64 as f64),
                _ => None,
            }
        }
        match (num(self), num(other)) {
            (Some(a), Some(b)) => a == b,
            _ => self == other,
        }
    }
    /// Python `str()` of the value (metadata records args this way).
    pub fn py_str(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => if *b { "True" } else { "False" }.into(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => py_float_repr(*f),
            Value::Str(s) => s.clone(),
            Value::List(v) => format!(
                "[{}]",
                v.iter()
                    .map(|x| match x {
                        Value::Str(s) => format!("'{s}'"),
                        x => x.py_str(),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::List(_) => "a list",
        }
    }
}

/// `--lr_warmup_steps` / `--lr_decay_steps`: a step count or a ratio of the total steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum IntOrFloat {
    Int(i64),
    Float(f64),
}

impl IntOrFloat {
    /// sd-scripts: `int(ratio * total)` for a float, the int itself otherwise.
    pub fn steps(&self, total: i64) -> i64 {
        match *self {
            IntOrFloat::Int(i) => i,
            IntOrFloat::Float(r) => (r * total as f64).trunc() as i64,
        }
    }
}

/// Typed extraction from a namespace value; `key` names the option in errors.
pub trait FromValue: Sized {
    fn from_value(v: &Value, key: &str) -> Result<Self>;
}

fn type_err<T>(v: &Value, key: &str, want: &str) -> Result<T> {
    bail!(
        "--{key}: expected {want}, got {} ({})",
        v.type_name(),
        v.py_str()
    )
}

impl FromValue for bool {
    fn from_value(v: &Value, key: &str) -> Result<Self> {
        match v {
            Value::Bool(b) => Ok(*b),
            Value::Int(i) => Ok(*i != 0),
            _ => type_err(v, key, "true or false"),
        }
    }
}
impl FromValue for String {
    fn from_value(v: &Value, key: &str) -> Result<Self> {
        match v {
            Value::Str(s) => Ok(s.clone()),
            _ => type_err(v, key, "a string"),
        }
    }
}
impl FromValue for i64 {
    fn from_value(v: &Value, key: &str) -> Result<Self> {
        match v {
            Value::Int(i) => Ok(*i),
            _ => type_err(v, key, "an integer"),
        }
    }
}
impl FromValue for f64 {
    fn from_value(v: &Value, key: &str) -> Result<Self> {
        match v {
            Value::Int(i) => Ok(*i as f64),
            Value::Float(f) => Ok(*f),
            _ => type_err(v, key, "a number"),
        }
    }
}
impl FromValue for IntOrFloat {
    fn from_value(v: &Value, key: &str) -> Result<Self> {
        match v {
            Value::Int(i) => Ok(IntOrFloat::Int(*i)),
            Value::Float(f) => Ok(IntOrFloat::Float(*f)),
            _ => type_err(v, key, "an integer step count or a float ratio"),
        }
    }
}
impl FromValue for PathBuf {
    fn from_value(v: &Value, key: &str) -> Result<Self> {
        Ok(PathBuf::from(String::from_value(v, key)?))
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value, key: &str) -> Result<Self> {
        match v {
            Value::None => Ok(None),
            v => T::from_value(v, key).map(Some),
        }
    }
}
impl<T: FromValue> FromValue for Vec<T> {
    fn from_value(v: &Value, key: &str) -> Result<Self> {
        match v {
            Value::List(items) => items.iter().map(|x| T::from_value(x, key)).collect(),
            // sd-scripts' "toml backward compatibility": a scalar where a list is expected
            v => Ok(vec![T::from_value(v, key)?]),
        }
    }
}

macro_rules! flags {
    ($( $name:ident : $ty:ty => $kind:ident, $star:literal, $def:expr, [$($c:literal),*], $sup:expr; )*) => {
        /// Every train_network.py option (field = option name), after CLI / config-file merging.
        #[derive(Debug, Clone)]
        pub struct TrainArgs {
            $( pub $name: $ty, )*
            /// The merged namespace with Python-typed values (for metadata and `--output_config`).
            pub raw: BTreeMap<String, Value>,
            /// Options given on the command line or in the config file.
            pub explicit: BTreeSet<String>,
        }

        /// The option table, in sd-scripts' registration order.
        pub const FLAGS: &[FlagSpec] = &[
            $( FlagSpec {
                name: stringify!($name),
                kind: ArgKind::$kind,
                star: $star,
                default: $def,
                choices: &[$($c),*],
                support: $sup,
            }, )*
        ];

        impl TrainArgs {
            fn from_namespace(ns: &BTreeMap<String, Value>, explicit: BTreeSet<String>) -> Result<Self> {
                Ok(TrainArgs {
                    $( $name: FromValue::from_value(
                        ns.get(stringify!($name)).unwrap_or(&Value::None),
                        stringify!($name),
                    )?, )*
                    raw: ns.clone(),
                    explicit,
                })
            }
        }
    };
}

include!("args_table.rs");

/// Looks an option up by name.
pub fn flag_spec(name: &str) -> Option<&'static FlagSpec> {
    FLAGS.iter().find(|f| f.name == name)
}

/// Python `int(s)`: surrounding whitespace, a sign, digits with single underscores between them.
pub fn py_int(s: &str) -> Option<i64> {
    let t = s.trim();
    let (neg, body) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    if body.is_empty()
        || body.starts_with('_')
        || body.ends_with('_')
        || body.contains("__")
        || !body.chars().all(|c| c.is_ascii_digit() || c == '_')
    {
        return None;
    }
    let v: i64 = body.replace('_', "").parse().ok()?;
    Some(if neg { -v } else { v })
}

/// Python `float(s)`: also "inf", "infinity", "nan" in any case, underscores between digits.
pub fn py_float(s: &str) -> Option<f64> {
    let t = s.trim();
    let (neg, body) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let lower = body.to_ascii_lowercase();
    let v = if lower == "inf" || lower == "infinity" {
        f64::INFINITY
    } else if lower == "nan" {
        f64::NAN
    } else {
        let bytes = body.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            if b == b'_' {
                let ok = i > 0
                    && i + 1 < bytes.len()
                    && bytes[i - 1].is_ascii_digit()
                    && bytes[i + 1].is_ascii_digit();
                if !ok {
                    return None;
                }
            }
        }
        let clean = body.replace('_', "");
        if clean.is_empty()
            || !clean
                .chars()
                .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
        {
            return None;
        }
        clean.parse::<f64>().ok()?
    };
    Some(if neg { -v } else { v })
}

/// sd-scripts' `int_or_float` type function, with its error texts.
pub fn parse_int_or_float(value: &str) -> std::result::Result<IntOrFloat, String> {
    if let Some(p) = value.strip_suffix('%') {
        return py_float(p)
            .map(|f| IntOrFloat::Float(f / 100.0))
            .ok_or_else(|| format!("Value '{value}' is not a valid percentage"));
    }
    let err = || format!("'{value}' is not an int or float");
    let f = py_float(value).ok_or_else(err)?;
    if f >= 1.0 {
        // int(value): "10.0" is rejected although float("10.0") is fine
        py_int(value).map(IntOrFloat::Int).ok_or_else(err)
    } else {
        Ok(IntOrFloat::Float(f))
    }
}

fn convert(spec: &FlagSpec, s: &str) -> Result<Value> {
    let name = spec.name;
    let v = match spec.kind {
        ArgKind::Str | ArgKind::Path => Value::Str(s.to_string()),
        ArgKind::Int => Value::Int(
            py_int(s)
                .ok_or_else(|| anyhow::anyhow!("argument --{name}: invalid int value: '{s}'"))?,
        ),
        ArgKind::Float => Value::Float(
            py_float(s)
                .ok_or_else(|| anyhow::anyhow!("argument --{name}: invalid float value: '{s}'"))?,
        ),
        ArgKind::IntOrFloat => match parse_int_or_float(s) {
            Ok(IntOrFloat::Int(i)) => Value::Int(i),
            Ok(IntOrFloat::Float(f)) => Value::Float(f),
            Err(e) => bail!("argument --{name}: {e}"),
        },
        ArgKind::StoreTrue => unreachable!("store_true options take no value"),
    };
    check_choice(spec, &v)?;
    Ok(v)
}

fn check_choice(spec: &FlagSpec, v: &Value) -> Result<()> {
    if spec.choices.is_empty() {
        return Ok(());
    }
    let shown = v.py_str();
    if spec.choices.contains(&shown.as_str()) {
        return Ok(());
    }
    let quote = |c: &str| {
        if spec.kind == ArgKind::Int || c == "None" {
            c.to_string()
        } else {
            format!("'{c}'")
        }
    };
    let shown = match v {
        Value::Str(s) => format!("'{s}'"),
        v => v.py_str(),
    };
    let list: Vec<String> = spec.choices.iter().map(|c| quote(c)).collect();
    bail!(
        "argument --{}: invalid choice: {shown} (choose from {})",
        spec.name,
        list.join(", ")
    )
}

/// argparse treats "-5" or "-1e-4" as a value, "--x" / "-x" as an option.
fn looks_like_option(tok: &str) -> bool {
    tok.starts_with('-') && tok.len() > 1 && py_float(tok).is_none()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest option names to an unknown one ("did you mean").
pub fn suggest(name: &str) -> Option<&'static str> {
    let norm = name.replace('-', "_").to_lowercase();
    FLAGS
        .iter()
        .map(|f| (edit_distance(&norm, f.name), f.name))
        .filter(|(d, n)| *d <= (n.len() / 4).max(2))
        .min()
        .map(|(_, n)| n)
}

/// Resolves `--name` like argparse: exact, else a unique prefix (allow_abbrev).
fn resolve(name: &str) -> std::result::Result<&'static FlagSpec, String> {
    if let Some(f) = flag_spec(name) {
        return Ok(f);
    }
    let matches: Vec<&FlagSpec> = if name.is_empty() {
        Vec::new()
    } else {
        FLAGS.iter().filter(|f| f.name.starts_with(name)).collect()
    };
    match matches.len() {
        1 => Ok(matches[0]),
        0 => Err(match suggest(name) {
            Some(s) => format!("--{name} (did you mean --{s}?)"),
            None => format!("--{name}"),
        }),
        _ => Err(format!(
            "ambiguous option: --{name} could match {}",
            matches
                .iter()
                .map(|f| format!("--{}", f.name))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The command line as argparse leaves it: explicitly given options only.
#[derive(Debug, Default)]
pub struct CliValues {
    pub values: BTreeMap<String, Value>,
    pub help: bool,
}

/// Parses the raw arguments of `sdlora train` (argparse semantics). Unknown options are all
/// reported in one error, each with a suggestion where one is close.
pub fn parse_cli(argv: &[String]) -> Result<CliValues> {
    let mut out = CliValues::default();
    let mut unknown: Vec<String> = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        let tok = &argv[i];
        i += 1;
        if tok == "-h" || tok == "--help" {
            out.help = true;
            continue;
        }
        let Some(body) = tok.strip_prefix("--").filter(|_| looks_like_option(tok)) else {
            unknown.push(format!(
                "'{tok}' (sd-scripts takes no positional arguments)"
            ));
            continue;
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let spec = match resolve(name) {
            Ok(s) => s,
            Err(e) if e.starts_with("ambiguous") => bail!("{e}"),
            Err(e) => {
                unknown.push(e);
                // the option's value(s), if any, are not options either: skip them
                while i < argv.len() && !looks_like_option(&argv[i]) {
                    i += 1;
                }
                continue;
            }
        };
        let value = if spec.kind == ArgKind::StoreTrue {
            if let Some(v) = inline {
                bail!("argument --{}: ignored explicit argument '{v}'", spec.name);
            }
            Value::Bool(true)
        } else if spec.star {
            let mut items = Vec::new();
            if let Some(v) = inline {
                items.push(convert(spec, &v)?);
            } else {
                while i < argv.len() && !looks_like_option(&argv[i]) {
                    items.push(convert(spec, &argv[i])?);
                    i += 1;
                }
            }
            Value::List(items)
        } else {
            let v = match inline {
                Some(v) => v,
                None if i < argv.len() && !looks_like_option(&argv[i]) => {
                    i += 1;
                    argv[i - 1].clone()
                }
                None => bail!("argument --{}: expected one argument", spec.name),
            };
            convert(spec, &v)?
        };
        out.values.insert(spec.name.to_string(), value);
    }
    if !unknown.is_empty() {
        bail!(
            "unrecognized arguments: {}\n(run `sdlora train --help` for the list of sd-scripts options)",
            unknown.join(", ")
        );
    }
    Ok(out)
}

fn toml_to_value(v: &toml::Value, key: &str) -> Result<Value> {
    Ok(match v {
        toml::Value::String(s) => Value::Str(s.clone()),
        toml::Value::Integer(i) => Value::Int(*i),
        toml::Value::Float(f) => Value::Float(*f),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Array(a) => Value::List(
            a.iter()
                .map(|x| toml_to_value(x, key))
                .collect::<Result<Vec<_>>>()?,
        ),
        toml::Value::Datetime(d) => Value::Str(d.to_string()),
        toml::Value::Table(_) => bail!("key `{key}`: nested tables are not options"),
    })
}

/// `--config_file` path as sd-scripts forms it: ".toml" appended when missing.
pub fn config_file_path(arg: &str) -> PathBuf {
    if arg.ends_with(".toml") {
        PathBuf::from(arg)
    } else {
        PathBuf::from(format!("{arg}.toml"))
    }
}

/// Reads a `--config_file` TOML: every section flattened into one namespace, section names
/// ignored, a later duplicate key wins (spec §1.1). Unknown keys are returned separately.
pub fn read_config_file(path: &Path) -> Result<(BTreeMap<String, Value>, Vec<String>)> {
    if !path.exists() {
        bail!("{} not found.", path.display());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("config file {} is not valid TOML", path.display()))?;
    let mut flat = BTreeMap::new();
    let mut unknown = Vec::new();
    let mut put = |k: &str, v: &toml::Value| -> Result<()> {
        if flag_spec(k).is_none() {
            unknown.push(k.to_string());
            return Ok(());
        }
        let val = toml_to_value(v, k).with_context(|| format!("config file {}", path.display()))?;
        flat.insert(k.to_string(), val);
        Ok(())
    };
    // Python's toml keeps file order and a later section overrides an earlier one; toml::Table
    // iterates sorted, so take the order of the `[section]` headers from the text.
    let mut order: Vec<String> = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if let Some(name) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            let name = name.trim().trim_matches('"').to_string();
            if !name.starts_with('[') && table.contains_key(&name) && !order.contains(&name) {
                order.push(name);
            }
        }
    }
    let mut keys: Vec<&String> = table.keys().filter(|k| !order.contains(k)).collect();
    keys.extend(order.iter());
    for section in keys {
        match &table[section.as_str()] {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    put(k, v)?;
                }
            }
            v => put(section, v)?,
        }
    }
    Ok((flat, unknown))
}

/// What `parse_train_args` decided.
pub enum ArgsOutcome {
    /// Train with these arguments (notices: lines to log, e.g. ignored config keys).
    Run(Box<TrainArgs>, Vec<String>),
    /// `--help`: print this text, exit 0.
    Help(String),
    /// `--output_config`: the config file was written, exit 0.
    ConfigWritten(PathBuf),
}

/// The whole sd-scripts parsing pipeline (spec §1.1): CLI, then `--config_file`, then defaults.
pub fn parse_train_args(argv: &[String]) -> Result<ArgsOutcome> {
    let cli = parse_cli(argv)?;
    if cli.help {
        return Ok(ArgsOutcome::Help(help_text()));
    }
    let mut notices = Vec::new();
    let mut ns: BTreeMap<String, Value> = BTreeMap::new();
    let mut explicit: BTreeSet<String> = cli.values.keys().cloned().collect();
    let config_arg = match cli.values.get("config_file") {
        Some(Value::Str(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    let output_config = matches!(cli.values.get("output_config"), Some(Value::Bool(true)));
    if let (Some(arg), false) = (&config_arg, output_config) {
        let path = config_file_path(arg);
        let (flat, unknown) = read_config_file(&path)?;
        notices.push(format!("Loading settings from {}...", path.display()));
        for k in unknown {
            notices.push(format!(
                "config file {}: `{k}` is not a train_network.py option; ignored",
                path.display()
            ));
        }
        for (k, v) in flat {
            explicit.insert(k.clone());
            ns.insert(k, v);
        }
    }
    // explicit CLI values override the config file
    for (k, v) in cli.values {
        ns.insert(k, v);
    }
    for f in FLAGS {
        ns.entry(f.name.to_string())
            .or_insert_with(|| Value::from_default(f.default));
    }
    let args = TrainArgs::from_namespace(&ns, explicit).map_err(|e| match &config_arg {
        Some(c) if !output_config => e.context(format!(
            "in --config_file {} or on the command line",
            config_file_path(c).display()
        )),
        _ => e,
    })?;
    if output_config {
        let Some(arg) = config_arg else {
            bail!("--output_config needs --config_file to name the file to write");
        };
        let path = config_file_path(&arg);
        if path.exists() {
            bail!(
                "Config file already exists. Aborting... / 出力先の設定ファイルが既に存在します: {}",
                path.display()
            );
        }
        crate::io::write_bytes_atomic(&path, args.output_config_toml().as_bytes())?;
        return Ok(ArgsOutcome::ConfigWritten(path));
    }
    Ok(ArgsOutcome::Run(Box::new(args), notices))
}

fn value_to_toml(v: &Value) -> Option<toml::Value> {
    Some(match v {
        Value::None => return None,
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Int(i) => toml::Value::Integer(*i),
        Value::Float(f) => toml::Value::Float(*f),
        Value::Str(s) => toml::Value::String(s.clone()),
        Value::List(l) => toml::Value::Array(l.iter().filter_map(value_to_toml).collect()),
    })
}

/// Help text: every option with its type, default and sdlora support.
pub fn help_text() -> String {
    let mut s = String::from(
        "usage: sdlora train [options]  (kohya-ss/sd-scripts train_network.py options)\n\n",
    );
    for f in FLAGS {
        let ty = match (f.kind, f.star) {
            (ArgKind::StoreTrue, _) => String::new(),
            (k, star) => format!(
                " {}{}",
                format!("{k:?}").to_uppercase(),
                if star { " [...]" } else { "" }
            ),
        };
        let def = match f.default {
            D::None | D::False => String::new(),
            d => format!(" (default: {})", Value::from_default(d).py_str()),
        };
        let sup = match f.support {
            S::Yes => String::new(),
            S::NoEffect(r) => format!("  [accepted, no effect: {r}]"),
            S::No(r) => format!("  [not supported: {r}]"),
        };
        s.push_str(&format!("  --{}{ty}{def}{sup}\n", f.name));
    }
    s
}

/// The lr schedulers sdlora implements (transformers' names).
pub const LR_SCHEDULERS: &[&str] = &[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
];

/// transformers 4.54.1 `SchedulerType` values plus sd-scripts' extras, for the error text.
const ALL_SCHEDULERS: &[&str] = &[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
];

impl TrainArgs {
    /// Parses a list of arguments (test and library convenience); `--help` and
    /// `--output_config` are errors here.
    pub fn parse(argv: &[String]) -> Result<TrainArgs> {
        match parse_train_args(argv)? {
            ArgsOutcome::Run(a, _) => Ok(*a),
            _ => bail!("--help / --output_config do not produce training arguments"),
        }
    }

    /// Whether option `name` differs from its argparse default.
    pub fn is_set(&self, name: &str) -> bool {
        let Some(spec) = flag_spec(name) else {
            return false;
        };
        let v = self.raw.get(name).unwrap_or(&Value::None);
        !v.py_eq(&Value::from_default(spec.default))
    }

    /// Every option or value sdlora cannot honour, as "--flag (reason)"; the caller refuses the
    /// run with all of them at once.
    pub fn unsupported(&self) -> Vec<String> {
        let mut out = Vec::new();
        for f in FLAGS {
            if let S::No(reason) = f.support {
                if self.is_set(f.name) {
                    out.push(format!("--{} ({reason})", f.name));
                }
            }
        }
        if let Some(w) = &self.log_with {
            if w == "wandb" || w == "all" {
                out.push(format!(
                    "--log_with {w} (Weights & Biases logging is not supported; use tensorboard)"
                ));
            }
        }
        if let Some(m) = &self.network_module {
            if m != "networks.lora" {
                out.push(format!(
                    "--network_module {m} (only networks.lora is implemented)"
                ));
            }
        }
        if let Err(e) = crate::train::optim::build::resolve_kind(
            &self.optimizer_type,
            self.use_8bit_adam,
            self.use_lion_optimizer,
        ) {
            let msg = e.to_string();
            if msg.contains("not supported") {
                out.push(msg);
            }
        }
        if ALL_SCHEDULERS.contains(&self.lr_scheduler.as_str())
            && !LR_SCHEDULERS.contains(&self.lr_scheduler.as_str())
        {
            out.push(format!(
                "--lr_scheduler {} (sdlora implements {})",
                self.lr_scheduler,
                LR_SCHEDULERS.join(", ")
            ));
        }
        out
    }

    /// sd-scripts' argument checks and adjustments (`verify_training_args`,
    /// `prepare_dataset_args`, the checks at the start of `NetworkTrainer.train`, spec §1.3),
    /// with their message texts. Returns the warning lines to log.
    pub fn verify(&mut self) -> Result<Vec<String>> {
        let unsupported = self.unsupported();
        if !unsupported.is_empty() {
            bail!(
                "sdlora does not implement these options: {}",
                unsupported.join("; ")
            );
        }
        let mut warn = Vec::new();
        if self.v2 && self.clip_skip.is_some() {
            warn.push("v2 with clip_skip will be unexpected / v2でclip_skipを使用することは想定されていません".into());
        }
        if self.cache_latents_to_disk && !self.cache_latents {
            self.cache_latents = true;
            self.raw.insert("cache_latents".into(), Value::Bool(true));
            warn.push("cache_latents_to_disk is enabled, so cache_latents is also enabled / cache_latents_to_diskが有効なため、cache_latentsを有効にします".into());
        }
        if self.adaptive_noise_scale.is_some() && self.noise_offset.is_none() {
            bail!("adaptive_noise_scale requires noise_offset / adaptive_noise_scaleを使用するにはnoise_offsetが必要です");
        }
        if self.scale_v_pred_loss_like_noise_pred && !self.v_parameterization {
            bail!("scale_v_pred_loss_like_noise_pred can be enabled only with v_parameterization / scale_v_pred_loss_like_noise_predはv_parameterizationが有効なときのみ有効にできます");
        }
        // Python truthiness: --v_pred_like_loss 0 is off
        if self.v_pred_like_loss.is_some_and(|v| v != 0.0) && self.v_parameterization {
            bail!("v_pred_like_loss cannot be enabled with v_parameterization / v_pred_like_lossはv_parameterizationが有効なときには有効にできません");
        }
        if self.zero_terminal_snr && !self.v_parameterization {
            warn.push("zero_terminal_snr is enabled, but v_parameterization is not enabled. training will be unexpected / zero_terminal_snrが有効ですが、v_parameterizationが有効ではありません。学習結果は想定外になる可能性があります".into());
        }
        // prepare_dataset_args
        if let Some(ext) = self.caption_extention.take() {
            self.caption_extension = ext;
        }
        if let Some(r) = &self.resolution {
            self.parse_resolution(r)?;
        }
        if let Some(r) = &self.face_crop_aug_range {
            let parts: Vec<Option<f64>> = r.split(',').map(py_float).collect();
            let ok = parts.len() == 2 && parts.iter().all(|p| p.is_some()) && parts[0] <= parts[1];
            if !ok {
                bail!("face_crop_aug_range must be two floats / face_crop_aug_rangeは'下限,上限'で指定してください: {r}");
            }
        }
        if self.dataset_config.is_some()
            && (self.train_data_dir.is_some()
                || self.reg_data_dir.is_some()
                || self.in_json.is_some())
        {
            warn.push("ignoring the following options because config file is found: train_data_dir, reg_data_dir, in_json / 設定ファイルが利用されるため以下のオプションは無視されます: train_data_dir, reg_data_dir, in_json".into());
        }
        if self.full_fp16 && self.mixed_precision != "fp16" {
            bail!("full_fp16 requires mixed precision='fp16' / full_fp16を使う場合はmixed_precision='fp16'を指定してください。");
        }
        if self.full_bf16 && self.mixed_precision != "bf16" {
            bail!("full_bf16 requires mixed precision='bf16' / full_bf16を使う場合はmixed_precision='bf16'を指定してください。");
        }
        // get_optimizer's alias conflicts (AssertionError texts)
        crate::train::optim::build::resolve_kind(
            &self.optimizer_type,
            self.use_8bit_adam,
            self.use_lion_optimizer,
        )?;
        if !ALL_SCHEDULERS.contains(&self.lr_scheduler.as_str())
            && !self.lr_scheduler.starts_with("adafactor")
        {
            let list: Vec<String> = ALL_SCHEDULERS.iter().map(|s| format!("'{s}'")).collect();
            bail!(
                "'{}' is not a valid SchedulerType, please select one of [{}]",
                self.lr_scheduler,
                list.join(", ")
            );
        }
        if matches!(self.log_with.as_deref(), Some("tensorboard" | "all"))
            && self.logging_dir.is_none()
        {
            bail!("logging_dir is required when log_with is tensorboard / Tensorboardを使う場合、logging_dirを指定してください");
        }
        if let (Some(e), Some(s)) = (self.initial_epoch, self.initial_step) {
            let _ = (e, s); // both allowed; initial_step wins (spec §5.3)
        }
        for (name, v) in [
            ("train_batch_size", self.train_batch_size),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
        ] {
            if v < 1 {
                bail!("--{name} must be at least 1 (got {v})");
            }
        }
        Ok(warn)
    }

    fn parse_resolution(&self, r: &str) -> Result<(i64, i64)> {
        let bad = || {
            anyhow::anyhow!(
                "resolution must be 'size' or 'width,height' / resolution（解像度）は'サイズ'または'幅','高さ'で指定してください: {r}"
            )
        };
        let parts: Vec<i64> = r
            .split(',')
            .map(|p| py_int(p).ok_or_else(bad))
            .collect::<Result<_>>()?;
        match parts.as_slice() {
            [s] => Ok((*s, *s)),
            [w, h] => Ok((*w, *h)),
            _ => Err(bad()),
        }
    }

    /// `--resolution` as sd-scripts' `(W, H)` tuple ("512" → (512, 512)).
    pub fn resolution_wh(&self) -> Result<Option<(i64, i64)>> {
        self.resolution
            .as_deref()
            .map(|r| self.parse_resolution(r))
            .transpose()
    }

    /// `--text_encoder_lr` as train_network.py uses it for networks.lora: the first element.
    pub fn text_encoder_lr_single(&self) -> Option<f64> {
        self.text_encoder_lr
            .as_ref()
            .and_then(|v| v.first().copied())
    }

    /// `--network_alpha` with its Python type, None when it is argparse's default (the int 1).
    /// sd-scripts stores `torch.tensor(alpha)`: a value from the command line is a float (float32
    /// alpha, "1.0" in the metadata, even for `--network_alpha=1`); an integer from a
    /// `--config_file` TOML stays an int (int64 alpha).
    pub fn network_alpha_given(&self) -> Option<crate::lora::Alpha> {
        match self.raw.get("network_alpha") {
            None | Some(Value::None) => None,
            Some(Value::Int(1)) if !self.explicit.contains("network_alpha") => None,
            Some(Value::Int(i)) => Some(crate::lora::Alpha::int(*i)),
            _ => Some(crate::lora::Alpha::float(self.network_alpha)),
        }
    }

    /// `--network_args` as (key, value) string pairs, split at the first "=" (LoRA semantics).
    pub fn network_args_pairs(&self) -> Result<Vec<(String, String)>> {
        self.network_args
            .iter()
            .flatten()
            .map(|a| {
                a.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| anyhow::anyhow!("--network_args `{a}`: expected key=value"))
            })
            .collect()
    }

    /// `--face_crop_aug_range` as (lo, hi).
    pub fn face_crop_range(&self) -> Option<(f64, f64)> {
        let r = self.face_crop_aug_range.as_deref()?;
        let (a, b) = r.split_once(',')?;
        Some((py_float(a)?, py_float(b)?))
    }

    /// The TOML `--output_config` writes: non-default options except config_file,
    /// output_config and wandb_api_key.
    pub fn output_config_toml(&self) -> String {
        let mut t = toml::Table::new();
        for f in FLAGS {
            if matches!(f.name, "config_file" | "output_config" | "wandb_api_key") {
                continue;
            }
            if self.is_set(f.name) {
                if let Some(v) = self.raw.get(f.name).and_then(value_to_toml) {
                    t.insert(f.name.to_string(), v);
                }
            }
        }
        toml::to_string(&t).unwrap_or_default()
    }
}

/// Python's `repr(float)`: shortest round-trip digits, scientific notation when the decimal
/// exponent is < -4 or >= 16 (e.g. 0.0001, 1e-05, 2e-06, 1.0, 1e+16). Metadata and log lines
/// print floats this way.
pub fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // `{:e}` gives the shortest round-trip mantissa, e.g. "1.5e-5"
    let sci = format!("{:e}", f);
    let (mant, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("exponent is an integer");
    let neg = mant.starts_with('-');
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if neg { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let s = if exp >= 0 {
            if n <= exp + 1 {
                format!("{digits}{}.0", "0".repeat((exp + 1 - n) as usize))
            } else {
                format!(
                    "{}.{}",
                    &digits[..(exp + 1) as usize],
                    &digits[(exp + 1) as usize..]
                )
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() == 1 {
            digits.clone()
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        let esign = if exp < 0 { "-" } else { "+" };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}
