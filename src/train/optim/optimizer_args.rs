//! `--optimizer_args key=value ...` as sd-scripts parses them: split on "=" (exactly one), value
//! through Python's `ast.literal_eval` (spec: sdscripts_cli_data.md §1.2, §1.5). Only the literal
//! forms a hyper-parameter can take are supported: numbers, True/False/None, strings, tuples
//! (with or without parentheses) and lists.
use anyhow::{bail, Result};

/// A Python literal.
#[derive(Debug, Clone, PartialEq)]
pub enum PyValue {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<PyValue>),
    List(Vec<PyValue>),
}

impl PyValue {
    /// Python's `float(x)` view of a number (bools are ints in Python).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            PyValue::Int(i) => Some(*i as f64),
            PyValue::Float(f) => Some(*f),
            PyValue::Bool(b) => Some(*b as i64 as f64),
            _ => None,
        }
    }
    /// Python truthiness.
    pub fn truthy(&self) -> bool {
        match self {
            PyValue::None => false,
            PyValue::Bool(b) => *b,
            PyValue::Int(i) => *i != 0,
            PyValue::Float(f) => *f != 0.0,
            PyValue::Str(s) => !s.is_empty(),
            PyValue::Tuple(v) | PyValue::List(v) => !v.is_empty(),
        }
    }
    /// Elements of a tuple or list.
    pub fn as_seq(&self) -> Option<&[PyValue]> {
        match self {
            PyValue::Tuple(v) | PyValue::List(v) => Some(v),
            _ => None,
        }
    }
    /// Python `str`: like `repr` except a top-level string is unquoted (metadata `k=v` lists).
    pub fn py_str(&self) -> String {
        match self {
            PyValue::Str(s) => s.clone(),
            v => v.repr(),
        }
    }
    /// Python `repr`, as sd-scripts logs the kwargs dict.
    pub fn repr(&self) -> String {
        match self {
            PyValue::None => "None".into(),
            PyValue::Bool(b) => if *b { "True" } else { "False" }.into(),
            PyValue::Int(i) => i.to_string(),
            PyValue::Float(f) => crate::train::args::py_float_repr(*f),
            PyValue::Str(s) => format!("'{s}'"),
            PyValue::Tuple(v) if v.len() == 1 => format!("({},)", v[0].repr()),
            PyValue::Tuple(v) => format!(
                "({})",
                v.iter().map(|x| x.repr()).collect::<Vec<_>>().join(", ")
            ),
            PyValue::List(v) => format!(
                "[{}]",
                v.iter().map(|x| x.repr()).collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

struct P<'a> {
    s: &'a [u8],
    i: usize,
    src: &'a str,
}

impl P<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && (self.s[self.i] as char).is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn err<T>(&self) -> Result<T> {
        bail!("malformed Python literal: {:?}", self.src)
    }
    /// expr := item ("," item)* [","]  — a bare comma list is a tuple
    fn expr(&mut self) -> Result<PyValue> {
        let first = self.item()?;
        self.ws();
        if self.peek() != Some(b',') {
            return Ok(first);
        }
        let mut v = vec![first];
        while self.peek() == Some(b',') {
            self.i += 1;
            self.ws();
            if self.peek().is_none() {
                break;
            }
            v.push(self.item()?);
            self.ws();
        }
        Ok(PyValue::Tuple(v))
    }
    fn seq(&mut self, close: u8) -> Result<(Vec<PyValue>, bool)> {
        let mut v = Vec::new();
        let mut trailing_comma = false;
        loop {
            self.ws();
            if self.peek() == Some(close) {
                self.i += 1;
                return Ok((v, trailing_comma));
            }
            v.push(self.item()?);
            self.ws();
            match self.peek() {
                Some(b',') => {
                    self.i += 1;
                    trailing_comma = true;
                }
                Some(c) if c == close => trailing_comma = false,
                _ => return self.err(),
            }
        }
    }
    fn item(&mut self) -> Result<PyValue> {
        self.ws();
        match self.peek() {
            Some(b'(') => {
                self.i += 1;
                let (v, trailing) = self.seq(b')')?;
                // "(x)" is just x; "(x,)" and "()" are tuples
                if v.len() == 1 && !trailing {
                    Ok(v.into_iter().next().expect("one element"))
                } else {
                    Ok(PyValue::Tuple(v))
                }
            }
            Some(b'[') => {
                self.i += 1;
                Ok(PyValue::List(self.seq(b']')?.0))
            }
            Some(q @ (b'\'' | b'"')) => {
                self.i += 1;
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i] != q {
                    if self.s[self.i] == b'\\' {
                        return self.err(); // escapes are not needed for hyper-parameters
                    }
                    self.i += 1;
                }
                if self.i >= self.s.len() {
                    return self.err();
                }
                let out = self.src[start..self.i].to_string();
                self.i += 1;
                Ok(PyValue::Str(out))
            }
            Some(_) => {
                let start = self.i;
                while self.i < self.s.len() && !b",)] \t".contains(&self.s[self.i]) {
                    self.i += 1;
                }
                let tok = &self.src[start..self.i];
                match tok {
                    "True" => return Ok(PyValue::Bool(true)),
                    "False" => return Ok(PyValue::Bool(false)),
                    "None" => return Ok(PyValue::None),
                    _ => {}
                }
                parse_number(tok).map_or_else(|| self.err(), Ok)
            }
            None => self.err(),
        }
    }
}

/// A Python int or float literal with optional sign (`ast.literal_eval` accepts unary +/-).
fn parse_number(tok: &str) -> Option<PyValue> {
    let (neg, body) = match tok.as_bytes().first()? {
        b'-' => (true, &tok[1..]),
        b'+' => (false, &tok[1..]),
        _ => (false, tok),
    };
    let body_clean = body.replace('_', "");
    if body.is_empty() || body.starts_with('_') || body.ends_with('_') || body.contains("__") {
        return None;
    }
    if body_clean.chars().all(|c| c.is_ascii_digit()) {
        // Python 3 rejects leading zeros in non-zero decimal ints
        if body_clean.len() > 1
            && body_clean.starts_with('0')
            && !body_clean.trim_matches('0').is_empty()
        {
            return None;
        }
        let v: i64 = body_clean.parse().ok()?;
        return Some(PyValue::Int(if neg { -v } else { v }));
    }
    let ok = body_clean
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'));
    if !ok || !body_clean.chars().next()?.is_ascii_digit() && !body_clean.starts_with('.') {
        return None;
    }
    let v: f64 = body_clean.parse().ok()?;
    Some(PyValue::Float(if neg { -v } else { v }))
}

/// Python's `ast.literal_eval(s)` for hyper-parameter literals.
pub fn literal_eval(s: &str) -> Result<PyValue> {
    let mut p = P {
        s: s.as_bytes(),
        i: 0,
        src: s,
    };
    let v = p.expr()?;
    p.ws();
    if p.i != s.len() {
        return p.err();
    }
    Ok(v)
}

/// Parses `key=value` pairs in order; a later duplicate key overrides an earlier one, as in the
/// Python dict. `flag` names the option in errors (`--optimizer_args`, `--lr_scheduler_args`).
pub fn parse_kwargs(args: &[String], flag: &str) -> Result<Vec<(String, PyValue)>> {
    let mut out: Vec<(String, PyValue)> = Vec::new();
    for arg in args {
        let parts: Vec<&str> = arg.split('=').collect();
        if parts.len() != 2 {
            bail!(
                "{flag}: `{arg}` must be exactly one key=value pair (sd-scripts splits on every \"=\")"
            );
        }
        let value = literal_eval(parts[1])
            .map_err(|e| anyhow::anyhow!("{flag}: value of `{}`: {e}", parts[0]))?;
        if let Some(slot) = out.iter_mut().find(|(k, _)| k == parts[0]) {
            slot.1 = value;
        } else {
            out.push((parts[0].to_string(), value));
        }
    }
    Ok(out)
}

/// The kwargs dict as Python prints it, e.g. `{'weight_decay': 0.1, 'betas': (0.9, 0.99)}`.
pub fn kwargs_repr(kwargs: &[(String, PyValue)]) -> String {
    let items: Vec<String> = kwargs
        .iter()
        .map(|(k, v)| format!("'{k}': {}", v.repr()))
        .collect();
    format!("{{{}}}", items.join(", "))
}
