//! The rows of the result table, printed as a table and written as JSON.

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

/// What a figure counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Ms,
    S,
    Count,
    /// A count per second.
    PerS,
    MsPerNode,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Unit::Ms => "ms",
            Unit::S => "s",
            Unit::Count => "count",
            Unit::PerS => "/s",
            Unit::MsPerNode => "ms/node",
        }
    }

    fn show(self, v: f64) -> String {
        let n = if v.abs() >= 100.0 {
            format!("{v:.0}")
        } else if v.abs() >= 10.0 {
            format!("{v:.1}")
        } else if v.abs() >= 1.0 {
            format!("{v:.2}")
        } else {
            format!("{v:.3}")
        };
        match self {
            Unit::Count => n,
            Unit::PerS => format!("{n}/s"),
            u => format!("{n} {}", u.name()),
        }
    }
}

/// The target a figure is judged against.
#[derive(Debug, Clone)]
pub enum Target {
    /// Reported, not judged.
    None,
    /// upsilon / baseline at most this.
    RatioAtMost(f64, String),
    /// The figure itself at most this, in its unit.
    AtMost(f64, String),
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub measure: String,
    pub unit: Unit,
    pub upsilon: f64,
    pub baseline: Option<(String, f64)>,
    pub target: Target,
}

impl Row {
    pub fn new(scenario: &str, measure: impl Into<String>, unit: Unit, upsilon: f64) -> Row {
        Row {
            scenario: scenario.to_owned(),
            measure: measure.into(),
            unit,
            upsilon,
            baseline: None,
            target: Target::None,
        }
    }

    /// The figure it is compared with, measured in the same run, and what it is.
    pub fn vs(mut self, name: impl Into<String>, value: f64) -> Row {
        self.baseline = Some((name.into(), value));
        self
    }

    pub fn ratio_at_most(mut self, r: f64, text: impl Into<String>) -> Row {
        self.target = Target::RatioAtMost(r, text.into());
        self
    }

    pub fn at_most(mut self, v: f64, text: impl Into<String>) -> Row {
        self.target = Target::AtMost(v, text.into());
        self
    }

    pub fn ratio(&self) -> Option<f64> {
        let (_, b) = self.baseline.as_ref()?;
        (*b > 0.0).then(|| self.upsilon / b)
    }

    pub fn met(&self) -> Option<bool> {
        match &self.target {
            Target::None => None,
            Target::RatioAtMost(r, _) => self.ratio().map(|x| x <= *r),
            Target::AtMost(v, _) => Some(self.upsilon <= *v),
        }
    }

    fn target_text(&self) -> &str {
        match &self.target {
            Target::None => "-",
            Target::RatioAtMost(_, t) | Target::AtMost(_, t) => t,
        }
    }

    fn json(&self) -> Value {
        let (baseline_name, baseline) = match &self.baseline {
            Some((n, v)) => (Value::from(n.clone()), Value::from(*v)),
            None => (Value::Null, Value::Null),
        };
        json!({
            "scenario": self.scenario,
            "measure": self.measure,
            "unit": self.unit.name(),
            "upsilon": self.upsilon,
            "baseline_name": baseline_name,
            "baseline": baseline,
            "ratio": self.ratio(),
            "target": self.target_text(),
            "met": self.met(),
        })
    }
}

/// Everything one run measured.
#[derive(Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Per scenario: samples and settings, for the JSON.
    pub details: Map<String, Value>,
}

impl Report {
    pub fn push(&mut self, row: Row) {
        eprintln!(
            "  {} {}: {}{}",
            row.scenario,
            row.measure,
            row.unit.show(row.upsilon),
            row.baseline
                .as_ref()
                .map(|(n, v)| format!(" (baseline {n}: {})", row.unit.show(*v)))
                .unwrap_or_default()
        );
        self.rows.push(row);
    }

    pub fn detail(&mut self, key: &str, value: Value) {
        self.details.insert(key.to_owned(), value);
    }

    /// The table, one row per figure, in Markdown.
    pub fn table(&self) -> String {
        let header = [
            "scenario", "measure", "upsilon", "baseline", "ratio", "target", "met?",
        ];
        let mut lines: Vec<[String; 7]> = Vec::new();
        for r in &self.rows {
            lines.push([
                r.scenario.clone(),
                match &r.baseline {
                    Some((n, _)) => format!("{} (vs {n})", r.measure),
                    None => r.measure.clone(),
                },
                r.unit.show(r.upsilon),
                r.baseline
                    .as_ref()
                    .map_or("-".to_owned(), |(_, v)| r.unit.show(*v)),
                r.ratio().map_or("-".to_owned(), |x| format!("{x:.2}x")),
                r.target_text().to_owned(),
                match r.met() {
                    Some(true) => "yes".to_owned(),
                    Some(false) => "NO".to_owned(),
                    None => "-".to_owned(),
                },
            ]);
        }
        let mut widths = header.map(str::len);
        for l in &lines {
            for (w, c) in widths.iter_mut().zip(l) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &[String]| {
            out.push('|');
            for (c, w) in cells.iter().zip(widths) {
                let _ = write!(out, " {c:<w$} |");
            }
            out.push('\n');
        };
        line(&header.map(str::to_owned));
        line(&widths.map(|w| "-".repeat(w)));
        for l in &lines {
            line(l);
        }
        out
    }

    pub fn json(&self, meta: Value) -> Value {
        json!({
            "meta": meta,
            "rows": self.rows.iter().map(Row::json).collect::<Vec<_>>(),
            "details": self.details,
        })
    }
}
