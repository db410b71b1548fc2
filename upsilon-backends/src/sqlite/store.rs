//! The store: data version and history, every write checked against the
//! fence in the same transaction.

use async_trait::async_trait;
use rusqlite::params;
use rusqlite::types::Value as SqlValue;
use upsilon::backend::{
    fence_to_column, BackendError, Change, Columns, HistoryColumns, HistoryEntry, Snapshot, Store,
    Value, Write,
};

use super::rows::{self, snapshot, snapshot_of, summary, HISTORY};
use super::{driver, exec, Result, Session, SqliteBackend, READ_HERE_ROWS};

#[async_trait]
impl Store for SqliteBackend {
    async fn load(&self, service: &str) -> Result<Snapshot> {
        let here = |session: &mut Session| rows::load(&session.conn, service, READ_HERE_ROWS);
        let (snap, rows) = match self.read_here(here) {
            Some(loaded) => loaded?,
            None => {
                let service = service.to_owned();
                self.call(
                    move |session| match rows::load(&session.conn, &service, usize::MAX)? {
                        Some(loaded) => Ok(loaded),
                        None => session.write(|tx, _| Ok((snapshot(tx, &service)?, 0))),
                    },
                )
                .await?
            }
        };
        self.read_here_next(rows);
        Ok(snap)
    }

    async fn claim(&self, service: &str, fence: u64) -> Result<Snapshot> {
        let service = service.to_owned();
        self.tx(move |tx, _| {
            let mut snap = snapshot(tx, &service)?;
            if snap.claim(fence)? {
                exec(
                    tx,
                    "UPDATE upsilon_fence SET store_fence = ?2 WHERE service = ?1",
                    params![service, fence_to_column(fence)?],
                )?;
            }
            Ok(snap)
        })
        .await
    }

    async fn apply(&self, service: &str, fence: u64, changes: &[Change]) -> Result<()> {
        let service = service.to_owned();
        let changes = changes.to_vec();
        self.tx(move |tx, now| {
            let touched = Change::touched(&changes);
            let mut snap = snapshot_of(tx, &service, touched.as_ref())?;
            let todo = snap.check(fence, &changes)?;
            for change in todo {
                write(tx, &service, now.wall, Columns::of(fence, change)?)?;
            }
            Ok(())
        })
        .await
    }

    async fn services(&self) -> Result<Vec<String>> {
        self.call(move |session| {
            session.read(|tx| {
                // Reads create empty state rows; a service is one the store
                // holds something of.
                let mut stmt = tx
                    .prepare_cached(
                        "SELECT service FROM upsilon_state
                      WHERE data_version IS NOT NULL OR baseline IS NOT NULL
                         OR lease_holder IS NOT NULL
                     UNION SELECT service FROM upsilon_fence WHERE granted > 0 OR store_fence > 0
                     UNION SELECT service FROM upsilon_history
                     ORDER BY 1",
                    )
                    .map_err(driver)?;
                let names = stmt
                    .query_map([], |r| r.get::<_, String>(0))
                    .map_err(driver)?;
                names.map(|n| n.map_err(driver)).collect()
            })
        })
        .await
    }

    async fn history(&self, service: &str) -> Result<Vec<HistoryEntry>> {
        let service = service.to_owned();
        self.call(move |session| {
            session.read(|tx| {
                let mut stmt = tx.prepare_cached(HISTORY).map_err(driver)?;
                let rows = stmt
                    .query_map([&service], |r| {
                        Ok(HistoryColumns {
                            summary: summary(r)?,
                            holder: r.get(10)?,
                            description: r.get(11)?,
                            started_ms: r.get(12)?,
                            finished_ms: r.get(13)?,
                            duration_ms: r.get(14)?,
                            error: r.get(15)?,
                        })
                    })
                    .map_err(driver)?;
                let mut out = Vec::new();
                for row in rows {
                    out.push(row.map_err(driver)?.decode()?);
                }
                Ok(out)
            })
        })
        .await
    }
}

fn write(tx: &rusqlite::Transaction<'_>, service: &str, now: i64, columns: Columns) -> Result<()> {
    let sql = match columns.write() {
        Write::Start => {
            "INSERT INTO upsilon_history
               (service, version, task_id, attempt, kind, fence, holder, description,
                checkpoint, checkpoint_saved_ms, checkpoint_done, checkpoint_total,
                state, started_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 'running', ?13)"
        }
        Write::Checkpoint => {
            "UPDATE upsilon_history SET checkpoint = ?5, checkpoint_saved_ms = ?6,
                    checkpoint_done = ?7, checkpoint_total = ?8
             WHERE service = ?1 AND version = ?2 AND task_id = ?3 AND attempt = ?4"
        }
        Write::Finish => {
            "UPDATE upsilon_history SET state = ?5, duration_ms = ?6, error = ?7, finished_ms = ?8
             WHERE service = ?1 AND version = ?2 AND task_id = ?3 AND attempt = ?4"
        }
        Write::DataVersion => "UPDATE upsilon_state SET data_version = ?2 WHERE service = ?1",
        Write::Baseline => {
            "UPDATE upsilon_state SET data_version = ?2, baseline = ?2 WHERE service = ?1"
        }
        other => {
            return Err(BackendError::other(format!(
                "this SQLite backend does not know the write {other:?}"
            )))
        }
    };
    let now =
        matches!(columns.write(), Write::Start | Write::Finish).then_some(SqlValue::Integer(now));
    let values = std::iter::once(SqlValue::Text(service.to_owned()))
        .chain(columns.into_values().into_iter().map(sql_value))
        .chain(now);
    tx.prepare_cached(sql)
        .and_then(|mut stmt| stmt.execute(rusqlite::params_from_iter(values)))
        .map(|_| ())
        .map_err(driver)
}

fn sql_value(value: Value) -> SqlValue {
    match value {
        Value::Text(t) => SqlValue::Text(t),
        Value::OptText(t) => t.map_or(SqlValue::Null, SqlValue::Text),
        Value::Int4(i) => SqlValue::Integer(i.into()),
        Value::Int8(i) => SqlValue::Integer(i),
        Value::OptInt8(i) => i.map_or(SqlValue::Null, SqlValue::Integer),
    }
}
