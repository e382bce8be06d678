//! The dataset's console lines. sd-scripts logs them through `logging` (stderr, message only);
//! we print the same messages and keep them so tests can compare them line by line.
//!
//! Every line also carries the place sd-scripts logs it from ([`Site`]), because sd-scripts'
//! console handler draws from the *global* Python `random`: rich's `RichHandler` (the default
//! handler, `library/utils.py: setup_logging`) renders the path column with file links, and every
//! link style rich parses or copies gets a `randint(0, 999999)` link id (`rich/style.py`). Each
//! rendered record costs 6 draws (two link spans, three copies each), plus one the first time a
//! source file is linked and one the first time a (file, line) is (`Style.parse` is cached for
//! the whole process). Those draws sit between `set_seed(seed)` and the dataset's
//! `random.randint(0, 2**31)`, so they decide the epoch shuffles. [`DataLog::settle`] replays them
//! on our copy of the global RNG (measured against sd-scripts + rich 14.1: the same dataset seed).
use super::pyrandom::PyRandom;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Info,
    Warning,
}

impl Level {
    /// Python's numeric logging level.
    fn number(self) -> u32 {
        match self {
            Level::Info => 20,
            Level::Warning => 30,
        }
    }
}

/// The logging call in sd-scripts that prints a line: its source file and line number (as of
/// sd-scripts 48d368f, 2026-02; only "same call or not" matters for the RNG, not the numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Site {
    pub file: &'static str,
    pub line: u32,
}

/// A logging call in sd-scripts' `library/train_util.py`.
pub const fn train_util(line: u32) -> Site {
    Site {
        file: "train_util.py",
        line,
    }
}

/// A logging call in sd-scripts' `library/config_util.py`.
pub const fn config_util(line: u32) -> Site {
    Site {
        file: "config_util.py",
        line,
    }
}

/// A logging call in sd-scripts' `train_network.py`.
pub const fn train_network(line: u32) -> Site {
    Site {
        file: "train_network.py",
        line,
    }
}

/// sd-scripts' console handler, from `--console_log_simple`, `--console_log_file` and
/// `--console_log_level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ConsoleHandler {
    /// A plain `StreamHandler` / `FileHandler`: logging draws no random numbers.
    #[default]
    Plain,
    /// rich's `RichHandler` showing records at or above `min_level` (Python's numeric level).
    Rich { min_level: u32 },
}

impl ConsoleHandler {
    /// The handler sd-scripts' `setup_logging(args)` installs for these flags (rich installed,
    /// as sd-scripts' requirements.txt pins it).
    pub fn from_flags(simple: bool, log_file: bool, level: Option<&str>) -> Self {
        if simple || log_file {
            return ConsoleHandler::Plain;
        }
        let min_level = match level.unwrap_or("INFO") {
            "DEBUG" => 10,
            "INFO" => 20,
            "WARNING" => 30,
            "ERROR" => 40,
            _ => 50,
        };
        ConsoleHandler::Rich { min_level }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LogLine {
    pub level: Level,
    pub msg: String,
}

/// rich's process-wide link-style cache and the draws owed to the global RNG.
#[derive(Debug, Default)]
struct RichDraws {
    handler: ConsoleHandler,
    files: HashSet<&'static str>,
    sites: HashSet<Site>,
    owed: u64,
}

impl RichDraws {
    fn record(&mut self, level: Level, site: Site) {
        let ConsoleHandler::Rich { min_level } = self.handler else {
            return;
        };
        if level.number() < min_level {
            return;
        }
        self.owed += 6;
        if self.files.insert(site.file) {
            self.owed += 1;
        }
        if self.sites.insert(site) {
            self.owed += 1;
        }
    }
}

/// Shared, cloneable log sink. `echo` writes each message to stderr as it is recorded.
#[derive(Clone, Debug)]
pub struct DataLog {
    lines: Arc<Mutex<Vec<LogLine>>>,
    rich: Arc<Mutex<RichDraws>>,
    pub echo: bool,
}

impl Default for DataLog {
    fn default() -> Self {
        Self::new(true)
    }
}

impl DataLog {
    pub fn new(echo: bool) -> Self {
        DataLog {
            lines: Arc::new(Mutex::new(Vec::new())),
            rich: Arc::default(),
            echo,
        }
    }

    /// Which handler sd-scripts would log through (default: plain, no draws).
    pub fn set_console(&self, handler: ConsoleHandler) {
        self.rich.lock().unwrap().handler = handler;
    }

    pub fn info(&self, site: Site, msg: impl Into<String>) {
        self.push(Level::Info, Some(site), msg.into());
    }

    pub fn warn(&self, site: Site, msg: impl Into<String>) {
        self.push(Level::Warning, Some(site), msg.into());
    }

    /// A line sd-scripts logs in a DataLoader worker process: its rich draws land on that
    /// worker's RNG, which the worker reseeds itself, so it does not count here.
    pub fn info_in_worker(&self, msg: impl Into<String>) {
        self.push(Level::Info, None, msg.into());
    }

    /// A record sd-scripts logs here that sdlora does not print (e.g. its tokenizer loading):
    /// it only counts for the RNG.
    pub fn unprinted(&self, level: Level, site: Site) {
        self.rich.lock().unwrap().record(level, site);
    }

    fn push(&self, level: Level, site: Option<Site>, msg: String) {
        if self.echo {
            let tag = match level {
                Level::Info => "INFO    ",
                Level::Warning => "WARNING ",
            };
            eprintln!("{tag} {msg}");
        }
        if let Some(site) = site {
            self.rich.lock().unwrap().record(level, site);
        }
        self.lines.lock().unwrap().push(LogLine { level, msg });
    }

    /// Makes the draws the records logged since the last settle (or reseed) made on sd-scripts'
    /// global RNG: call right before that RNG is used.
    pub fn settle(&self, rng: &mut PyRandom) {
        let owed = std::mem::take(&mut self.rich.lock().unwrap().owed);
        for _ in 0..owed {
            rng.randint(0, 999_999);
        }
    }

    /// Forgets owed draws: sd-scripts is about to reseed the global RNG, which erases them.
    pub fn discard_owed(&self) {
        self.rich.lock().unwrap().owed = 0;
    }

    /// Draws owed and not yet settled (tests).
    pub fn owed_draws(&self) -> u64 {
        self.rich.lock().unwrap().owed
    }

    /// Everything recorded so far.
    pub fn lines(&self) -> Vec<LogLine> {
        self.lines.lock().unwrap().clone()
    }

    /// The recorded messages split into physical lines (a multi-line message counts as several).
    pub fn text_lines(&self) -> Vec<String> {
        self.lines()
            .iter()
            .flat_map(|l| l.msg.split('\n').map(str::to_string).collect::<Vec<_>>())
            .collect()
    }
}
