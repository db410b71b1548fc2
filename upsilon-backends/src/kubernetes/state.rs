//! The state ConfigMap and the history pages: what they hold, and how it
//! reads back.
//!
//! A service's state ConfigMap is the one object every fenced write goes
//! through (Kubernetes writes one object atomically, never two): the data
//! version, the baseline, the store's fence, a summary of each task's
//! history (enough for `Snapshot::check`), the next row id, and the history
//! entries written since they were last copied to the pages (`pending`).
//! The pages hold the history rows, 100 per page, by row id; a row reaches
//! its page only after the write that made it committed, so a page never
//! holds a row that did not.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ObjectMeta;
use serde::{Deserialize, Serialize};
use upsilon::backend::{
    version_from_column, AttemptState, BackendError, CheckpointColumns, HistoryColumns,
    HistoryEntry, LastRow, Snapshot, SummaryColumns, TaskSummary,
};
use upsilon::TaskKey;

use super::names::{Names, Part, FORMAT_ANNOTATION, SERVICE};
use super::FORMAT;

/// History rows per page: with the longest description and error a row
/// keeps (see [`DESCRIPTION_MAX`], [`ERROR_MAX`]) a page stays under
/// 700 KiB, within the 1 MiB a ConfigMap may hold.
pub(crate) const ROWS_PER_PAGE: u64 = 100;
/// The longest task description a row keeps, in bytes.
pub(crate) const DESCRIPTION_MAX: usize = 2048;
/// The longest error text a row keeps, in bytes.
pub(crate) const ERROR_MAX: usize = 4096;
/// The largest state ConfigMap this backend writes (the API server refuses
/// more than 1 MiB of data).
pub(crate) const STATE_MAX: usize = 1_000_000;

/// One history row as a page keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Row {
    pub(crate) id: u64,
    pub(crate) version: String,
    pub(crate) task: String,
    pub(crate) attempt: i64,
    pub(crate) kind: String,
    pub(crate) state: String,
    pub(crate) fence: i64,
    pub(crate) holder: String,
    pub(crate) description: String,
    pub(crate) started: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) finished: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) duration_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    /// Absent from rows written before checkpoints existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) checkpoint: Option<CheckpointColumns>,
}

impl Row {
    pub(crate) fn summary(&self) -> SummaryColumns {
        SummaryColumns {
            version: self.version.clone(),
            task_id: self.task.clone(),
            attempt: self.attempt,
            kind: self.kind.clone(),
            state: self.state.clone(),
            fence: self.fence,
            checkpoint: self.checkpoint.clone(),
        }
    }

    pub(crate) fn decode(self) -> Result<HistoryEntry, BackendError> {
        HistoryColumns {
            summary: self.summary(),
            holder: self.holder,
            description: self.description,
            started_ms: self.started,
            finished_ms: self.finished,
            duration_ms: self.duration_ms,
            error: self.error,
        }
        .decode()
    }

    /// Whether `finish` is the end of this row: same task, attempt and fence.
    fn matches(&self, finish: &Finish) -> bool {
        self.is(&finish.version, &finish.task, finish.attempt, finish.fence)
    }

    fn is(&self, version: &str, task: &str, attempt: i64, fence: i64) -> bool {
        self.version == version
            && self.task == task
            && self.attempt == attempt
            && self.fence == fence
    }
}

/// The end of a row, as a pending entry keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Finish {
    pub(crate) id: u64,
    pub(crate) version: String,
    pub(crate) task: String,
    pub(crate) attempt: i64,
    pub(crate) fence: i64,
    pub(crate) state: String,
    pub(crate) finished: i64,
    pub(crate) duration_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

/// A history write that committed in the state ConfigMap and may not be
/// in its page yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub(crate) enum Pending {
    /// A new row.
    Start(Row),
    /// The end of a row.
    Finish(Finish),
    /// A running row's new checkpoint.
    Checkpoint(Mark),
}

/// A running row's checkpoint, as a pending entry keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Mark {
    pub(crate) id: u64,
    pub(crate) version: String,
    pub(crate) task: String,
    pub(crate) attempt: i64,
    pub(crate) fence: i64,
    pub(crate) checkpoint: CheckpointColumns,
}

impl Pending {
    pub(crate) fn id(&self) -> u64 {
        match self {
            Pending::Start(r) => r.id,
            Pending::Finish(f) => f.id,
            Pending::Checkpoint(m) => m.id,
        }
    }

    /// Applies this entry to the rows of a page; whether anything changed.
    /// A row that is there already is kept (it is this entry, or further
    /// along); an end applies only to a running row of the same attempt.
    pub(crate) fn apply(&self, rows: &mut BTreeMap<u64, Row>) -> bool {
        match self {
            Pending::Start(r) => {
                if rows.contains_key(&r.id) {
                    return false;
                }
                rows.insert(r.id, r.clone());
                true
            }
            Pending::Finish(f) => match rows.get_mut(&f.id) {
                Some(row) if row.matches(f) && row.state == AttemptState::Running.as_str() => {
                    row.state = f.state.clone();
                    row.finished = Some(f.finished);
                    row.duration_ms = Some(f.duration_ms);
                    row.error = f.error.clone();
                    true
                }
                _ => false,
            },
            Pending::Checkpoint(m) => match rows.get_mut(&m.id) {
                Some(row)
                    if row.is(&m.version, &m.task, m.attempt, m.fence)
                        && row.state == AttemptState::Running.as_str()
                        && row.checkpoint.as_ref() != Some(&m.checkpoint) =>
                {
                    row.checkpoint = Some(m.checkpoint.clone());
                    true
                }
                _ => false,
            },
        }
    }
}

/// The summary of one task's history, as the state ConfigMap keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Summary {
    pub(crate) version: String,
    pub(crate) task: String,
    pub(crate) rows: u32,
    pub(crate) completed: bool,
    pub(crate) attempt: i64,
    pub(crate) kind: String,
    pub(crate) state: String,
    pub(crate) fence: i64,
    /// The id of the task's newest row.
    pub(crate) row: u64,
    /// The newest row's checkpoint; absent from states written before
    /// checkpoints existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) checkpoint: Option<CheckpointColumns>,
}

/// A service's state ConfigMap, read.
#[derive(Debug, Clone, Default)]
pub(crate) struct State {
    /// The object as read (`None`: there is none yet).
    pub(crate) object: Option<ConfigMap>,
    pub(crate) data_version: Option<String>,
    pub(crate) baseline: Option<String>,
    pub(crate) fence: u64,
    pub(crate) next_row: u64,
    pub(crate) tasks: Vec<Summary>,
    pub(crate) pending: Vec<Pending>,
}

fn number(data: &BTreeMap<String, String>, key: &str, what: &str) -> Result<u64, BackendError> {
    match data.get(key) {
        None => Ok(0),
        Some(t) => t
            .parse()
            .map_err(|_| BackendError::corrupt(format!("{what} {t:?} is not a whole number"))),
    }
}

fn json<T: for<'de> Deserialize<'de> + Default>(
    data: &BTreeMap<String, String>,
    key: &str,
    what: &str,
) -> Result<T, BackendError> {
    match data.get(key) {
        None => Ok(T::default()),
        Some(t) => serde_json::from_str(t)
            .map_err(|e| BackendError::corrupt(format!("{what} does not parse: {e}"))),
    }
}

/// Checks the `upsilon.dev/format` annotation of an object: newer is
/// refused, missing or not a number is corrupt.
pub(crate) fn check_format(meta: &ObjectMeta, what: &str) -> Result<(), BackendError> {
    let found = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(FORMAT_ANNOTATION))
        .ok_or_else(|| {
            BackendError::corrupt(format!("{what} has no {FORMAT_ANNOTATION} annotation"))
        })?;
    BackendError::check_format(found, FORMAT, &format!("the format of {what}"))
}

/// The annotations every object carries: its service and format.
pub(crate) fn annotations(service: Option<&str>) -> BTreeMap<String, String> {
    let mut a = BTreeMap::from([(FORMAT_ANNOTATION.to_owned(), FORMAT.to_string())]);
    if let Some(s) = service {
        a.insert(SERVICE.to_owned(), s.to_owned());
    }
    a
}

/// The service an object says it belongs to.
pub(crate) fn service_of(meta: &ObjectMeta) -> Option<String> {
    meta.annotations.as_ref()?.get(SERVICE).cloned()
}

impl State {
    /// Reads a state ConfigMap.
    pub(crate) fn decode(cm: ConfigMap, name: &str) -> Result<State, BackendError> {
        let what = format!("the state ConfigMap {name}");
        check_format(&cm.metadata, &what)?;
        let empty = BTreeMap::new();
        let data = cm.data.as_ref().unwrap_or(&empty);
        let state = State {
            data_version: data.get("dataVersion").cloned(),
            baseline: data.get("baseline").cloned(),
            fence: number(data, "fence", &format!("{what}: the fence"))?,
            next_row: number(data, "nextRow", &format!("{what}: the next row"))?,
            tasks: json(data, "tasks", &format!("{what}: the task summaries"))?,
            pending: json(data, "pending", &format!("{what}: the pending history"))?,
            object: None,
        };
        Ok(State {
            object: Some(cm),
            ..state
        })
    }

    /// A state rebuilt from the history pages alone (its ConfigMap is gone):
    /// the task summaries, the next row id and the newest fence the rows
    /// carry; no data version, no baseline.
    pub(crate) fn from_rows(rows: &BTreeMap<u64, Row>) -> Result<State, BackendError> {
        let mut snapshot = Snapshot::default();
        let mut newest: BTreeMap<TaskKey, u64> = BTreeMap::new();
        let mut fence = 0;
        for row in rows.values() {
            let (key, last, checkpoint) = row.summary().decode_checkpointed()?;
            fence = fence.max(last.fence);
            newest.insert(key.clone(), row.id);
            snapshot.fold_row_checkpointed(key, last, checkpoint);
        }
        let mut state = State {
            fence,
            next_row: rows.keys().next_back().map_or(0, |id| id + 1),
            ..State::default()
        };
        state.set_tasks(&snapshot, &newest);
        Ok(state)
    }

    /// The newest fence the state or its history has seen.
    pub(crate) fn newest_fence(&self) -> u64 {
        self.tasks
            .iter()
            .map(|t| t.fence.max(0) as u64)
            .fold(self.fence, u64::max)
    }

    /// The snapshot this state holds, and each task's newest row id.
    pub(crate) fn snapshot(&self) -> Result<(Snapshot, BTreeMap<TaskKey, u64>), BackendError> {
        let mut snap = Snapshot::from_columns(
            upsilon::backend::StateColumns {
                data_version: self.data_version.clone(),
                baseline: self.baseline.clone(),
                store_fence: i64::try_from(self.newest_fence()).map_err(|_| {
                    BackendError::corrupt("the store's fence does not fit a signed 64-bit number")
                })?,
            },
            [],
        )?;
        let mut rows = BTreeMap::new();
        for t in &self.tasks {
            let (key, last, checkpoint): (TaskKey, LastRow, _) = SummaryColumns {
                version: t.version.clone(),
                task_id: t.task.clone(),
                attempt: t.attempt,
                kind: t.kind.clone(),
                state: t.state.clone(),
                fence: t.fence,
                checkpoint: t.checkpoint.clone(),
            }
            .decode_checkpointed()?;
            if t.rows < last.attempt {
                return Err(BackendError::corrupt(format!(
                    "the summary of {key} counts {} rows and its newest is attempt {}",
                    t.rows, last.attempt
                )));
            }
            rows.insert(key.clone(), t.row);
            snap.tasks.insert(
                key,
                TaskSummary {
                    rows: t.rows,
                    completed: t.completed,
                    last,
                    checkpoint,
                },
            );
        }
        Ok((snap, rows))
    }

    /// Takes the task summaries of `snapshot`, with their newest row ids.
    pub(crate) fn set_tasks(&mut self, snapshot: &Snapshot, rows: &BTreeMap<TaskKey, u64>) {
        self.tasks = snapshot
            .tasks
            .iter()
            .map(|(key, t)| Summary {
                version: key.version.to_string(),
                task: key.id.clone(),
                rows: t.rows,
                completed: t.completed,
                attempt: i64::from(t.last.attempt),
                kind: t.last.kind.as_str().to_owned(),
                state: t.last.state.as_str().to_owned(),
                fence: t.last.fence as i64,
                row: rows.get(key).copied().unwrap_or_default(),
                checkpoint: t
                    .checkpoint
                    .as_ref()
                    .and_then(|c| CheckpointColumns::of(c).ok()),
            })
            .collect();
    }

    /// The ConfigMap that stores this state for `service`: the one read,
    /// with its `resourceVersion` as the write's precondition, or a new one.
    pub(crate) fn encode(&self, names: &Names, service: &str) -> Result<ConfigMap, BackendError> {
        let mut data = BTreeMap::new();
        if let Some(v) = &self.data_version {
            data.insert("dataVersion".to_owned(), v.clone());
        }
        if let Some(v) = &self.baseline {
            data.insert("baseline".to_owned(), v.clone());
        }
        data.insert("fence".to_owned(), self.fence.to_string());
        data.insert("nextRow".to_owned(), self.next_row.to_string());
        data.insert("tasks".to_owned(), to_json(&self.tasks)?);
        data.insert("pending".to_owned(), to_json(&self.pending)?);
        let size: usize = data.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > STATE_MAX {
            return Err(BackendError::Rejected(format!(
                "the state ConfigMap of `{service}` would hold {size} bytes ({} task summaries), \
                 more than the {STATE_MAX} this backend writes (Kubernetes refuses ConfigMaps over 1 MiB)",
                self.tasks.len()
            )));
        }
        let mut cm = self.object.clone().unwrap_or_else(|| ConfigMap {
            metadata: ObjectMeta {
                name: Some(names.object(service)),
                labels: Some(names.labels(Part::State, Some(service))),
                annotations: Some(annotations(Some(service))),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        });
        cm.data = Some(data);
        Ok(cm)
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<String, BackendError> {
    serde_json::to_string(value).map_err(BackendError::other)
}

/// The rows of a history page, by id.
pub(crate) fn page_rows(cm: &ConfigMap, name: &str) -> Result<BTreeMap<u64, Row>, BackendError> {
    check_format(&cm.metadata, &format!("the history page {name}"))?;
    let mut rows = BTreeMap::new();
    for (key, text) in cm.data.iter().flatten() {
        let row: Row = serde_json::from_str(text).map_err(|e| {
            BackendError::corrupt(format!(
                "row {key} of the history page {name} does not parse: {e}"
            ))
        })?;
        rows.insert(row.id, row);
    }
    Ok(rows)
}

/// The page of `rows` for `service`: `template` (the page as read, its
/// `resourceVersion` the precondition) or a new one.
pub(crate) fn page_object(
    names: &Names,
    service: &str,
    n: u64,
    template: Option<ConfigMap>,
    rows: &BTreeMap<u64, Row>,
) -> Result<ConfigMap, BackendError> {
    let mut data = BTreeMap::new();
    for (id, row) in rows {
        data.insert(
            format!("r{id:08}"),
            serde_json::to_string(row).map_err(BackendError::other)?,
        );
    }
    let mut cm = template.unwrap_or_else(|| ConfigMap {
        metadata: ObjectMeta {
            name: Some(names.page(service, n)),
            labels: Some(names.labels(Part::History, Some(service))),
            annotations: Some(annotations(Some(service))),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    });
    cm.data = Some(data);
    Ok(cm)
}

/// `text`, cut at `max` bytes (on a character boundary) with a note of how
/// long it was.
pub(crate) fn clip(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub(64);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [cut: {} bytes in all]", &text[..end], text.len())
}

/// The pages that hold ids `0..next_row`.
pub(crate) fn pages(next_row: u64) -> impl Iterator<Item = u64> {
    0..next_row.div_ceil(ROWS_PER_PAGE)
}

/// The pending entries, by page.
pub(crate) fn by_page(entries: &[Pending]) -> BTreeMap<u64, Vec<&Pending>> {
    let mut out: BTreeMap<u64, Vec<&Pending>> = BTreeMap::new();
    for e in entries {
        out.entry(e.id() / ROWS_PER_PAGE).or_default().push(e);
    }
    out
}

/// A key naming one pending entry, to remember which were copied.
pub(crate) fn entry_key(e: &Pending) -> String {
    match e {
        Pending::Start(r) => format!("s{}", r.id),
        Pending::Finish(f) => format!("f{}:{}", f.id, f.state),
        Pending::Checkpoint(m) => {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            m.checkpoint.hash(&mut h);
            format!("c{}:{:016x}", m.id, h.finish())
        }
    }
}

/// Whether the state holds anything of its service (for `services`).
pub(crate) fn holds_anything(state: &State) -> bool {
    state.data_version.is_some()
        || state.baseline.is_some()
        || state.fence > 0
        || !state.tasks.is_empty()
}

/// Parses `kind` and `state` once, so that a bad pending entry is found at
/// read time rather than when it is copied.
pub(crate) fn check_pending(state: &State) -> Result<(), BackendError> {
    for e in &state.pending {
        match e {
            Pending::Start(r) => {
                r.summary().decode()?;
            }
            Pending::Finish(f) => {
                AttemptState::parse(&f.state)?;
                version_from_column(&f.version, "a pending history entry's version")?;
            }
            Pending::Checkpoint(m) => {
                version_from_column(&m.version, "a pending history entry's version")?;
            }
        }
    }
    Ok(())
}
