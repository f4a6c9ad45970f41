//! Progress of long CLI work (verify, export, gc): a bar with bytes and
//! throughput redrawn in place on a terminal, a plain line every few
//! seconds (and one at the end) when stderr is a file or a pipe, nothing
//! with `--json`. Always on stderr: stdout stays the command's result.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Bar,
    Lines,
    Off,
}

/// One task's progress: `add` as bytes are done, `finish` at the end.
pub struct Progress {
    what: String,
    total: Option<u64>,
    mode: Mode,
    start: Instant,
    state: Mutex<State>,
}

struct State {
    done: u64,
    items: u64,
    last_draw: Option<Instant>,
}

impl Progress {
    /// Progress of `what` over `total` bytes (unknown: `None`); silent
    /// when `quiet` (`--json`).
    pub fn new(what: impl Into<String>, total: Option<u64>, quiet: bool) -> Self {
        let mode = if quiet {
            Mode::Off
        } else if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Lines
        };
        Self {
            what: what.into(),
            total,
            mode,
            start: Instant::now(),
            state: Mutex::new(State {
                done: 0,
                items: 0,
                last_draw: None,
            }),
        }
    }

    /// `bytes` more done.
    pub fn add(&self, bytes: u64) {
        self.add_item(bytes, 0);
    }

    /// `bytes` more done, and `items` more of what is counted besides
    /// (steps deleted).
    pub fn add_item(&self, bytes: u64, items: u64) {
        if self.mode == Mode::Off {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.done += bytes;
        s.items += items;
        let every = match self.mode {
            Mode::Bar => Duration::from_millis(100),
            _ => Duration::from_secs(2),
        };
        let now = Instant::now();
        if s.last_draw.is_some_and(|t| now - t < every) {
            return;
        }
        // The first plain line waits a whole period: short work prints
        // only its final line.
        if self.mode == Mode::Lines && s.last_draw.is_none() {
            s.last_draw = Some(now);
            return;
        }
        s.last_draw = Some(now);
        self.draw(&s, false);
    }

    /// The final line (a bar is completed and ended with a newline).
    pub fn finish(&self) {
        if self.mode == Mode::Off {
            return;
        }
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.draw(&s, true);
    }

    fn draw(&self, s: &State, last: bool) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-6);
        let rate = s.done as f64 / secs;
        let items = if s.items > 0 {
            format!("  {} steps", s.items)
        } else {
            String::new()
        };
        let line = match self.total {
            Some(total) if total > 0 => {
                let frac = (s.done as f64 / total as f64).min(1.0);
                let eta = if rate > 0.0 && !last {
                    format!(
                        "  ETA {:.0} s",
                        (total.saturating_sub(s.done)) as f64 / rate
                    )
                } else {
                    String::new()
                };
                let bar = if self.mode == Mode::Bar {
                    let width = 24;
                    let full = (frac * width as f64) as usize;
                    format!(
                        " [{}{}]",
                        "#".repeat(full),
                        " ".repeat(width - full.min(width))
                    )
                } else {
                    String::new()
                };
                format!(
                    "{}{bar} {:>3.0}%  {} / {}  {}/s{items}{eta}",
                    self.what,
                    frac * 100.0,
                    human(s.done),
                    human(total),
                    human(rate as u64)
                )
            }
            _ => format!(
                "{}  {}  {}/s{items}",
                self.what,
                human(s.done),
                human(rate as u64)
            ),
        };
        let line = if last {
            format!("{line}  in {secs:.2} s")
        } else {
            line
        };
        let mut err = std::io::stderr().lock();
        let _ = match (self.mode, last) {
            (Mode::Bar, false) => write!(err, "\r\x1b[2K{line}"),
            (Mode::Bar, true) => writeln!(err, "\r\x1b[2K{line}"),
            _ => writeln!(err, "{line}"),
        };
        let _ = err.flush();
    }
}

/// Bytes in binary units: `512 B`, `1.5 MiB`, `2.00 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
