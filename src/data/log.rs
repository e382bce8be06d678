//! The dataset's console lines. sd-scripts logs them through `logging` (stderr, message only);
//! we print the same messages and keep them so tests can compare them line by line.
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Info,
    Warning,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LogLine {
    pub level: Level,
    pub msg: String,
}

/// Shared, cloneable log sink. `echo` writes each message to stderr as it is recorded.
#[derive(Clone, Debug)]
pub struct DataLog {
    lines: Arc<Mutex<Vec<LogLine>>>,
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
            echo,
        }
    }

    pub fn info(&self, msg: impl Into<String>) {
        self.push(Level::Info, msg.into());
    }

    pub fn warn(&self, msg: impl Into<String>) {
        self.push(Level::Warning, msg.into());
    }

    fn push(&self, level: Level, msg: String) {
        if self.echo {
            let tag = match level {
                Level::Info => "INFO    ",
                Level::Warning => "WARNING ",
            };
            eprintln!("{tag} {msg}");
        }
        self.lines.lock().unwrap().push(LogLine { level, msg });
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
