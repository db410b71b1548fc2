//! `status`: where a service's upgrade stands.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use upsilon::backend::{AttemptState, Checkpoint, HistoryEntry, LeaseInfo, Snapshot};
use upsilon::TaskKey;

use super::Ctx;
use crate::exit::Failure;
use crate::json::{LeaseJson, RowJson};
use crate::output::Output;
use crate::text;

/// Everything `status` reads of one service.
#[derive(Debug, Clone)]
pub(crate) struct Read {
    pub(crate) service: String,
    pub(crate) snapshot: Snapshot,
    pub(crate) lease: Option<LeaseInfo>,
    pub(crate) history: Vec<HistoryEntry>,
}

impl Read {
    pub(crate) async fn of(ctx: &Ctx, service: &str) -> Result<Read, Failure> {
        let (snapshot, lease) = ctx.known(service).await?;
        let history = ctx.history(service).await?;
        Ok(Read {
            service: service.to_owned(),
            snapshot,
            lease,
            history,
        })
    }

    /// The backend's clock when the lease was read, or this host's.
    fn now_ms(&self) -> i64 {
        self.lease.as_ref().map_or_else(text::now_ms, |l| l.now_ms)
    }

    /// The newest row of each task (unlocks left out), in the order the
    /// tasks first ran.
    pub(crate) fn last_rows(&self) -> Vec<&HistoryEntry> {
        let mut order: Vec<&TaskKey> = Vec::new();
        let mut last: BTreeMap<&TaskKey, &HistoryEntry> = BTreeMap::new();
        for row in self.history.iter().filter(|r| !r.key.is_unlock()) {
            if last.insert(&row.key, row).is_none() {
                order.push(&row.key);
            }
        }
        order.into_iter().map(|k| last[k]).collect()
    }

    /// The newest row still recorded running, if any.
    pub(crate) fn running(&self) -> Option<&HistoryEntry> {
        self.last_rows()
            .into_iter()
            .filter(|r| r.state == AttemptState::Running)
            .max_by_key(|r| r.started_at_ms)
    }

    /// Whether `row`'s holder still holds the lease it was written under.
    pub(crate) fn is_live(&self, row: &HistoryEntry) -> bool {
        self.lease
            .as_ref()
            .is_some_and(|l| l.fence == row.fence && l.holder == row.holder)
    }

    /// How long `row` has been running.
    pub(crate) fn elapsed(&self, row: &HistoryEntry) -> Duration {
        text::between(row.started_at_ms, self.now_ms())
    }

    fn last_unlock(&self) -> Option<&HistoryEntry> {
        self.history.iter().rev().find(|r| r.key.is_unlock())
    }

    pub(crate) fn json(&self) -> StatusJson {
        let s = &self.service;
        StatusJson {
            service: s.clone(),
            data_version: self.snapshot.data_version.as_ref().map(|v| v.to_string()),
            baseline: self.snapshot.baseline.as_ref().map(|v| v.to_string()),
            fence: self.snapshot.fence,
            lease: self.lease.as_ref().map(LeaseJson::from),
            tasks: self
                .last_rows()
                .iter()
                .map(|r| RowJson::new(s, r))
                .collect(),
            running: self.running().map(|r| RunningJson {
                row: RowJson::new(s, r),
                elapsed_ms: self.elapsed(r).as_millis() as u64,
                live: self.is_live(r),
            }),
            last_unlock: self.last_unlock().map(|r| RowJson::new(s, r)),
        }
    }

    pub(crate) fn text(&self) -> String {
        let mut out = String::new();
        let snap = &self.snapshot;
        let _ = writeln!(out, "service {}", self.service);
        let baseline = snap
            .baseline
            .as_ref()
            .map(|b| format!(" (baselined at {b})"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  data version  {}{baseline}",
            text::version(snap.data_version.as_ref())
        );
        let _ = writeln!(out, "  store fence   {}", snap.fence);
        let _ = writeln!(out, "  lease         {}", lease_line(self.lease.as_ref()));
        if let Some(row) = self.running() {
            let _ = writeln!(out, "  running       {}", self.running_line(row));
        }
        let rows = self.last_rows();
        if rows.is_empty() {
            let _ = writeln!(out, "  tasks         none recorded");
        } else {
            let _ = writeln!(out, "  tasks (the last attempt of each)");
            out.push_str(&table(&rows, "    "));
        }
        if let Some(u) = self.last_unlock() {
            let _ = writeln!(
                out,
                "  last unlock   {} by {}: {}",
                text::timestamp(u.started_at_ms),
                u.holder,
                u.description
            );
        }
        out
    }

    pub(crate) fn running_line(&self, row: &HistoryEntry) -> String {
        let what = format!(
            "{} attempt {}{}, started {} ({} ago) by {}",
            row.key,
            row.attempt,
            if row.kind == upsilon::backend::AttemptKind::Rollback {
                " (rollback)"
            } else {
                ""
            },
            text::timestamp(row.started_at_ms),
            text::duration(self.elapsed(row)),
            row.holder
        );
        let what = match &row.checkpoint {
            Some(c) => format!(
                "{what}; at {} ({} ago)",
                checkpoint_line(c),
                text::duration(text::between(c.saved_at_ms, text::now_ms()))
            ),
            None => what,
        };
        if self.is_live(row) {
            what
        } else {
            format!("{what}; its holder no longer holds the lease (it died, lost it or was unlocked), so the next holder runs it again")
        }
    }
}

/// The lease in one line.
pub(crate) fn lease_line(lease: Option<&LeaseInfo>) -> String {
    let Some(l) = lease else {
        return "free".to_owned();
    };
    let held = match l.held_for() {
        Some(d) => format!("for {}", text::duration(d)),
        None => {
            "for an unknown time (this backend does not record when a lease was granted)".to_owned()
        }
    };
    format!(
        "held by {} with fence {}, {held}; expires in {}",
        l.holder,
        l.fence,
        text::duration(l.expires_in())
    )
}

/// A checkpoint in one line: its position (clipped), when it was saved,
/// the progress it records.
pub(crate) fn checkpoint_line(c: &Checkpoint) -> String {
    const LONGEST: usize = 120;
    let mut position: String = c.position.chars().take(LONGEST).collect();
    if position.len() < c.position.len() {
        position.push('…');
    }
    let progress = match (c.done, c.total) {
        (Some(d), Some(t)) if t > 0 => format!(", {d}/{t} done ({}%)", d * 100 / t),
        (Some(d), _) => format!(", {d} done"),
        _ => String::new(),
    };
    format!(
        "{position}, saved {}{progress}",
        text::timestamp(c.saved_at_ms)
    )
}

/// History rows as an aligned table.
pub(crate) fn table(rows: &[&HistoryEntry], indent: &str) -> String {
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                r.key.version.to_string(),
                r.key.id.clone(),
                format!("#{}", r.attempt),
                r.kind.as_str().to_owned(),
                r.state.as_str().to_owned(),
                format!("fence {}", r.fence),
                text::timestamp(r.started_at_ms),
                r.duration.map(text::duration).unwrap_or_else(|| "-".into()),
                r.holder.to_string(),
            ]
        })
        .collect();
    let mut widths = [0; 9];
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for (row, entry) in cells.iter().zip(rows) {
        out.push_str(indent);
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                out.push_str(c);
            } else {
                let _ = write!(out, "{c:<w$}  ");
            }
        }
        out.push('\n');
        if let Some(e) = &entry.error {
            let _ = writeln!(out, "{indent}  error: {e}");
        }
        if let Some(c) = &entry.checkpoint {
            let _ = writeln!(out, "{indent}  checkpoint: {}", checkpoint_line(c));
        }
    }
    out
}

/// `status --json` for one service.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StatusJson {
    service: String,
    data_version: Option<String>,
    baseline: Option<String>,
    fence: u64,
    lease: Option<LeaseJson>,
    tasks: Vec<RowJson>,
    running: Option<RunningJson>,
    last_unlock: Option<RowJson>,
}

#[derive(Debug, Clone, Serialize)]
struct RunningJson {
    #[serde(flatten)]
    row: RowJson,
    elapsed_ms: u64,
    live: bool,
}

#[derive(Debug, Clone, Serialize)]
struct AllJson {
    services: Vec<StatusJson>,
}

/// Reads every service the command covers.
pub(crate) async fn read_all(ctx: &Ctx) -> Result<Vec<Read>, Failure> {
    let mut reads = Vec::new();
    for service in ctx.services().await? {
        reads.push(Read::of(ctx, &service).await?);
    }
    Ok(reads)
}

/// What `status` prints for `reads`: one service's object when the service
/// was given, `{"services": [...]}` otherwise.
pub(crate) fn render(ctx: &Ctx, reads: &[Read]) -> Output {
    let text = if reads.is_empty() {
        "the store holds no service yet\n".to_owned()
    } else {
        reads.iter().map(Read::text).collect::<Vec<_>>().join("\n")
    };
    match (ctx.service.is_some(), reads) {
        (true, [one]) => Output::new(one.json(), text),
        _ => Output::new(
            AllJson {
                services: reads.iter().map(Read::json).collect(),
            },
            text,
        ),
    }
}

pub(crate) async fn run(ctx: &Ctx) -> Result<Output, Failure> {
    let reads = read_all(ctx).await?;
    Ok(render(ctx, &reads))
}
