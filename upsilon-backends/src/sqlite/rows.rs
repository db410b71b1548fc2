//! Reading a service's rows inside a transaction.

use std::collections::BTreeSet;

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use upsilon::backend::{
    BackendError, CheckpointColumns, Snapshot, StateColumns, StoredLease, SummaryColumns,
};
use upsilon::TaskKey;

use super::{driver, Now, Result};

/// A service's state row and its fences.
pub(super) struct StateRow {
    pub(super) columns: StateColumns,
    pub(super) granted: i64,
    lease: Option<StoredLease>,
    lease_boot: Option<String>,
}

impl StateRow {
    /// The lease, unless it was written in an earlier boot of the host: its
    /// holder died with that boot, and the lease clock restarted.
    pub(super) fn lease(&self, now: &Now) -> Option<&StoredLease> {
        self.lease
            .as_ref()
            .filter(|_| self.lease_boot.as_deref() == Some(&*now.boot))
    }
}

/// The state row and the fences of `service`, each created if missing. In
/// a write transaction only.
pub(super) fn state(tx: &Transaction<'_>, service: &str) -> Result<StateRow> {
    if let Some(row) = find_state(tx, service)? {
        return Ok(row);
    }
    for table in ["upsilon_state", "upsilon_fence"] {
        tx.prepare_cached(&format!(
            "INSERT OR IGNORE INTO {table} (service) VALUES (?1)"
        ))
        .and_then(|mut insert| insert.execute([service]))
        .map_err(driver)?;
    }
    find_state(tx, service)?
        .ok_or_else(|| BackendError::other(format!("the state row of {service} is missing")))
}

/// The state row and the fences of `service`, if it has both.
pub(super) fn find_state(tx: &Transaction<'_>, service: &str) -> Result<Option<StateRow>> {
    let mut stmt = tx
        .prepare_cached(
            "SELECT s.data_version, s.baseline, f.store_fence, f.granted,
                    s.lease_holder, s.lease_fence, s.lease_expires_ms, s.lease_boot
             FROM upsilon_state s JOIN upsilon_fence f ON f.service = s.service
             WHERE s.service = ?1",
        )
        .map_err(driver)?;
    let found = stmt
        .query_row([service], |r| {
            Ok((
                StateColumns {
                    data_version: r.get(0)?,
                    baseline: r.get(1)?,
                    store_fence: r.get(2)?,
                },
                r.get::<_, i64>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<i64>>(5)?,
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, Option<String>>(7)?,
            ))
        })
        .optional()
        .map_err(driver)?;
    let Some((columns, granted, holder, fence, expires, lease_boot)) = found else {
        return Ok(None);
    };
    Ok(Some(StateRow {
        columns,
        granted,
        lease: StoredLease::from_columns(holder.as_deref(), fence, expires)?,
        lease_boot,
    }))
}

/// A service's whole store in one statement, outside any explicit
/// transaction, so that SQLite reads it as one snapshot of the file: the
/// stored format beside every row, the state row and its fences, and each
/// history row (none: one row of `NULL`s, from the outer join) with its id.
/// The rows come in the order of the history's index; [`load`] puts them in
/// the order they were written, which costs less than SQLite's sorter.
pub(super) const LOAD: &str = "
SELECT (SELECT value FROM upsilon_meta WHERE key = 'format'),
       s.data_version, s.baseline, f.store_fence, h.id,
       h.version, h.task_id, h.attempt, h.kind, h.state, h.fence, h.checkpoint,
       h.checkpoint_saved_ms, h.checkpoint_done, h.checkpoint_total
  FROM upsilon_state s JOIN upsilon_fence f ON f.service = s.service
  LEFT JOIN upsilon_history h ON h.service = s.service
 WHERE s.service = ?1";

/// The snapshot of `service` in one statement ([`LOAD`]), with the number
/// of history rows it folds; `None` when its rows are missing (a write
/// creates them) or its history has more than `at_most` rows (read no
/// further). Refuses a store of a format this build does not know, as
/// [`super::schema::check_stored`] does.
pub(super) fn load(
    conn: &Connection,
    service: &str,
    at_most: usize,
) -> Result<Option<(Snapshot, usize)>> {
    let mut stmt = conn.prepare_cached(LOAD).map_err(driver)?;
    let mut rows = stmt.query([service]).map_err(driver)?;
    let Some(first) = rows.next().map_err(driver)? else {
        return Ok(None);
    };
    let format: Option<String> = first.get(0).map_err(driver)?;
    super::schema::check_format_column(format.as_deref())?;
    let state = StateColumns {
        data_version: first.get(1).map_err(driver)?,
        baseline: first.get(2).map_err(driver)?,
        store_fence: first.get(3).map_err(driver)?,
    };
    let mut history = Vec::new();
    let mut row = Some(first);
    while let Some(r) = row {
        if let Some(id) = r.get::<_, Option<i64>>(4).map_err(driver)? {
            if history.len() == at_most {
                return Ok(None);
            }
            history.push((id, summary_at(r, 5).map_err(driver)?));
        }
        row = rows.next().map_err(driver)?;
    }
    history.sort_unstable_by_key(|(id, _)| *id);
    let rows = history.len();
    let snap = Snapshot::from_columns(state, history.into_iter().map(|(_, row)| row))?;
    Ok(Some((snap, rows)))
}

/// The summaries of a service's tasks, from every column of the history.
pub(super) const HISTORY: &str = "
SELECT version, task_id, attempt, kind, state, fence, checkpoint, checkpoint_saved_ms,
       checkpoint_done, checkpoint_total, holder, description, started_ms, finished_ms,
       duration_ms, error
  FROM upsilon_history WHERE service = ?1 ORDER BY id";

pub(super) fn summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<SummaryColumns> {
    summary_at(r, 0)
}

/// A task's summary from the ten columns of `r` from `at` on, in the order
/// of [`HISTORY`].
fn summary_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<SummaryColumns> {
    Ok(SummaryColumns {
        version: r.get(at)?,
        task_id: r.get(at + 1)?,
        attempt: r.get(at + 2)?,
        kind: r.get(at + 3)?,
        state: r.get(at + 4)?,
        fence: r.get(at + 5)?,
        checkpoint: CheckpointColumns::from_nullable(
            r.get(at + 6)?,
            r.get(at + 7)?,
            r.get(at + 8)?,
            r.get(at + 9)?,
        ),
    })
}

/// The state of `service` with the summaries of every task, its rows created
/// if missing. In a write transaction only.
pub(super) fn snapshot(tx: &Transaction<'_>, service: &str) -> Result<Snapshot> {
    snapshot_of(tx, service, None)
}

/// The state of `service` with the summaries of the tasks in `only`, or of
/// every task, its rows created if missing. In a write transaction only. A
/// write needs only the tasks it touches, so that its cost does not grow
/// with the history.
pub(super) fn snapshot_of(
    tx: &Transaction<'_>,
    service: &str,
    only: Option<&BTreeSet<&TaskKey>>,
) -> Result<Snapshot> {
    let row = state(tx, service)?;
    snapshot_with(tx, row, service, only)
}

/// The state `row` of `service` with the summaries of the tasks in `only`,
/// or of every task.
pub(super) fn snapshot_with(
    tx: &Transaction<'_>,
    row: StateRow,
    service: &str,
    only: Option<&BTreeSet<&TaskKey>>,
) -> Result<Snapshot> {
    let mut rows = Vec::new();
    match only {
        None => {
            let mut stmt = tx.prepare_cached(HISTORY).map_err(driver)?;
            for r in stmt.query_map([service], summary).map_err(driver)? {
                rows.push(r.map_err(driver)?);
            }
        }
        Some(keys) => {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT version, task_id, attempt, kind, state, fence, checkpoint, checkpoint_saved_ms,
                            checkpoint_done, checkpoint_total FROM upsilon_history
                     WHERE service = ?1 AND version = ?2 AND task_id = ?3 ORDER BY id",
                )
                .map_err(driver)?;
            for k in keys {
                let found = stmt
                    .query_map(params![service, k.version.to_string(), k.id], summary)
                    .map_err(driver)?;
                for r in found {
                    rows.push(r.map_err(driver)?);
                }
            }
        }
    }
    Snapshot::from_columns(row.columns, rows)
}
