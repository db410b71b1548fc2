//! Reading script replies into the kit's column values, and the history
//! rows as they are stored (one JSON object per row).

use redis::Value;
use serde::{Deserialize, Serialize};
use upsilon::backend::{
    fence_from_column, BackendError, CheckpointColumns, HistoryColumns, Snapshot, StateColumns,
    StoredLease, SummaryColumns,
};
use upsilon::TaskKey;

use super::error::unexpected;

/// A text value of a reply: `None` for a missing field (nil, or `false`
/// under RESP3).
pub(super) fn text(v: &Value, what: &str) -> Result<Option<String>, BackendError> {
    match v {
        Value::Nil | Value::Boolean(false) => Ok(None),
        Value::BulkString(bytes) => String::from_utf8(bytes.clone())
            .map(Some)
            .map_err(|_| BackendError::corrupt(format!("{what} is not UTF-8 text"))),
        Value::SimpleString(s) => Ok(Some(s.clone())),
        Value::VerbatimString { text, .. } => Ok(Some(text.clone())),
        Value::Int(i) => Ok(Some(i.to_string())),
        other => Err(unexpected(what, other)),
    }
}

/// An integer stored as text; `None` when missing.
pub(super) fn int(v: &Value, what: &str) -> Result<Option<i64>, BackendError> {
    text(v, what)?
        .map(|t| {
            t.parse::<i64>()
                .map_err(|_| BackendError::corrupt(format!("{what} is {t:?}, not an integer")))
        })
        .transpose()
}

/// A fence counter; missing is 0.
pub(super) fn fence(v: &Value, what: &str) -> Result<u64, BackendError> {
    fence_from_column(int(v, what)?.unwrap_or(0), what)
}

/// The items of an array reply of at least `n` items.
pub(super) fn items(v: Value, n: usize, what: &str) -> Result<Vec<Value>, BackendError> {
    match v {
        Value::Array(items) if items.len() >= n => Ok(items),
        other => Err(unexpected(what, &other)),
    }
}

/// The server's time from the two items `TIME` returns, in ms since the
/// epoch.
pub(super) fn now_ms(secs: &Value, micros: &Value) -> Result<i64, BackendError> {
    let s = int(secs, "the server's time")?;
    let us = int(micros, "the server's time")?;
    match (s, us) {
        (Some(s), Some(us)) => Ok(s.saturating_mul(1000).saturating_add(us / 1000)),
        _ => Err(BackendError::other("the server did not say the time")),
    }
}

/// A lease hash as `HMGET holder fence expires_at_ms granted_at_ms` reads it.
pub(super) fn lease(fields: &[Value]) -> Result<Option<StoredLease>, BackendError> {
    let holder = text(&fields[0], "the lease's holder")?;
    let fence = int(&fields[1], "the lease's fence")?;
    let expires = int(&fields[2], "the lease's expiry")?;
    let granted = int(&fields[3], "the lease's grant time")?;
    Ok(
        StoredLease::from_columns(holder.as_deref(), fence, expires)?
            .map(|l| l.granted_at(granted)),
    )
}

/// A history row as it is stored: every column, as JSON. The row id (the
/// history hash's field) only finds it; these are its columns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Row {
    pub(super) version: String,
    pub(super) task_id: String,
    pub(super) attempt: i64,
    pub(super) kind: String,
    pub(super) state: String,
    pub(super) fence: i64,
    pub(super) holder: String,
    pub(super) description: String,
    pub(super) started_ms: i64,
    pub(super) finished_ms: Option<i64>,
    pub(super) duration_ms: Option<i64>,
    pub(super) error: Option<String>,
    /// Absent from rows written before checkpoints existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) checkpoint: Option<CheckpointColumns>,
}

impl Row {
    pub(super) fn parse(id: &str, json: &str) -> Result<Row, BackendError> {
        serde_json::from_str(json).map_err(|e| {
            BackendError::corrupt(format!("the history row {id:?} does not read: {e}"))
        })
    }

    pub(super) fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a row serialises")
    }

    pub(super) fn summary(&self) -> SummaryColumns {
        SummaryColumns {
            version: self.version.clone(),
            task_id: self.task_id.clone(),
            attempt: self.attempt,
            kind: self.kind.clone(),
            state: self.state.clone(),
            fence: self.fence,
            checkpoint: self.checkpoint.clone(),
        }
    }

    pub(super) fn history(self) -> HistoryColumns {
        HistoryColumns {
            summary: self.summary(),
            holder: self.holder,
            description: self.description,
            started_ms: self.started_ms,
            finished_ms: self.finished_ms,
            duration_ms: self.duration_ms,
            error: self.error,
        }
    }
}

/// The id of a task's row `attempt`: the history hash's field. A version
/// has no spaces and the attempt is the digits after the last `#`, so no
/// two rows share an id.
pub(super) fn row_id(version: &str, task_id: &str, attempt: i64) -> String {
    format!("{}{attempt}", task_prefix(version, task_id))
}

/// What every row id of a task starts with.
pub(super) fn task_prefix(version: &str, task_id: &str) -> String {
    format!("{version} {task_id}#")
}

pub(super) fn key_prefix(key: &TaskKey) -> String {
    task_prefix(&key.version.to_string(), &key.id)
}

/// The store as `READ_STORE` returns it.
pub(super) struct StoreRead {
    pub(super) now_ms: i64,
    /// The raw values the write compares: format, revision, store fence.
    pub(super) format: String,
    pub(super) rev: String,
    pub(super) store: String,
    pub(super) state: StateColumns,
    /// (id, row), in the order read.
    pub(super) rows: Vec<(String, Row)>,
}

impl StoreRead {
    pub(super) fn decode(reply: Value) -> Result<StoreRead, BackendError> {
        let v = items(reply, 8, "reading the store")?;
        let now_ms = now_ms(&v[0], &v[1])?;
        let format = text(&v[2], "the stored format")?.unwrap_or_default();
        let store = text(&v[3], "the store's fence")?.unwrap_or_default();
        let store_fence = int(&v[3], "the store's fence")?.unwrap_or(0);
        int(&v[4], "the store's revision")?;
        let rev = text(&v[4], "the store's revision")?.unwrap_or_else(|| "0".to_owned());
        let state = StateColumns {
            data_version: text(&v[5], "the data version")?,
            baseline: text(&v[6], "the baseline")?,
            store_fence,
        };
        let flat = match &v[7] {
            Value::Array(a) => a,
            other => return Err(unexpected("reading the history", other)),
        };
        let mut rows = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks(2) {
            let id = text(&pair[0], "a history row id")?.unwrap_or_default();
            let json = pair
                .get(1)
                .map(|j| text(j, "a history row"))
                .transpose()?
                .flatten()
                .ok_or_else(|| {
                    BackendError::corrupt(format!(
                        "the history row {id:?} is listed in the order of rows and missing from the history"
                    ))
                })?;
            let row = Row::parse(&id, &json)?;
            rows.push((id, row));
        }
        Ok(StoreRead {
            now_ms,
            format,
            rev,
            store,
            state,
            rows,
        })
    }

    /// The snapshot: the state, and the rows' summaries.
    pub(super) fn snapshot(&self) -> Result<Snapshot, BackendError> {
        Snapshot::from_columns(
            self.state.clone(),
            self.rows.iter().map(|(_, r)| r.summary()),
        )
    }
}
