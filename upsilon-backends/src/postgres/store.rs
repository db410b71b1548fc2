//! The store: [`Store`] for [`PostgresBackend`], the snapshot it reads
//! under the state row's lock, and the statements a write sends.

use std::collections::BTreeSet;

use async_trait::async_trait;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::Row;
use upsilon::backend::{
    fence_to_column, BackendError, Change, CheckpointColumns, Columns, HistoryColumns,
    HistoryEntry, Notice, Snapshot, StateColumns, Store, SummaryColumns, Value, Write,
};
use upsilon::TaskKey;

use super::error::driver;
use super::known::Known;
use super::pipeline::{first_error, int4, int8, opt_int8, opt_text, text, text_array, Param, Stmt};
use super::pool::Conn;
use super::{format_of, get, sql, PostgresBackend};

/// The columns a snapshot needs of one history row, from `first` on.
fn summary(row: &Row, first: usize) -> Result<SummaryColumns, BackendError> {
    Ok(SummaryColumns {
        version: get(row, first, "a history row's version")?,
        task_id: get(row, first + 1, "a history row's task id")?,
        attempt: get::<i32>(row, first + 2, "an attempt number")?.into(),
        kind: get(row, first + 3, "an attempt kind")?,
        state: get(row, first + 4, "an attempt state")?,
        fence: get(row, first + 5, "a history row's fence")?,
        checkpoint: CheckpointColumns::from_nullable(
            get(row, first + 6, "a checkpoint's position")?,
            get(row, first + 7, "a checkpoint's time")?,
            get(row, first + 8, "a checkpoint's done count")?,
            get(row, first + 9, "a checkpoint's total")?,
        ),
    })
}

/// The snapshot from the rows of `Sql::snapshot`: the state columns on the
/// first row, then one row per history row (none when its columns are null).
pub(super) fn snapshot_of(rows: &[Row]) -> Result<Snapshot, BackendError> {
    let first = rows
        .first()
        .ok_or_else(|| BackendError::corrupt("the snapshot query returned no row"))?;
    format_of(first, 0)?;
    let state = state_of(first)?;
    let mut history = Vec::with_capacity(rows.len());
    for row in rows {
        if get::<Option<&str>>(row, 4, "a history row's version")?.is_some() {
            history.push(summary(row, 4)?);
        }
    }
    Snapshot::from_columns(state, history)
}

/// The state columns of the first row of a snapshot read.
fn state_of(first: &Row) -> Result<StateColumns, BackendError> {
    Ok(StateColumns {
        data_version: get(first, 1, "the data version")?,
        baseline: get(first, 2, "the baseline")?,
        store_fence: get::<Option<i64>>(first, 3, "the store fence")?.unwrap_or(0),
    })
}

impl PostgresBackend {
    /// Begins a transaction, locks the state row of `service` (creating it if
    /// missing) and reads the snapshot, with the summaries of the tasks in
    /// `only` (every task for `None`): one round trip. A write reads only
    /// what it touches, so that its cost does not grow with the history.
    async fn locked_snapshot(
        &self,
        c: &Conn<'_>,
        service: &str,
        only: Option<&BTreeSet<&TaskKey>>,
    ) -> Result<Snapshot, BackendError> {
        let sql = &self.inner.sql;
        let read_snapshot = self.snapshot_stmt(service, only);
        let read = [
            Stmt::Simple("BEGIN"),
            Stmt::Typed(&sql.ensure_row, vec![text(service)]),
            Stmt::Typed(&sql.lock_row, vec![text(service)]),
            read_snapshot,
        ];
        let rows = first_error(c.pipeline(&read).await).map_err(driver)?;
        snapshot_of(&rows[3])
    }

    /// Reads the snapshot of `service` outside any transaction, with the
    /// summaries of the tasks in `only` (every task for `None`): one round
    /// trip.
    pub(super) async fn read_snapshot(
        &self,
        service: &str,
        only: Option<&BTreeSet<&TaskKey>>,
    ) -> Result<Snapshot, BackendError> {
        self.with_tables(|| async move {
            let mut conn = self.conn().await?;
            let stmt = [self.snapshot_stmt(service, only)];
            let op = async {
                let rows = first_error(conn.pipeline(&stmt).await).map_err(driver)?;
                let snapshot = snapshot_of(&rows[0])?;
                if let (None, Some(row)) = (only, rows[0].first()) {
                    self.learn_idle_timeout(row, sql::SNAPSHOT_IDLE_TIMEOUT);
                    self.inner.reads.read(service, state_of(row)?);
                }
                Ok(snapshot)
            };
            let result = self.timed(op).await;
            self.settle(&mut conn, "reading the store", result).await
        })
        .await
    }

    /// The statement that reads the snapshot of `service` with the
    /// summaries of the tasks in `only` (every task for `None`).
    fn snapshot_stmt<'s>(&'s self, service: &str, only: Option<&BTreeSet<&TaskKey>>) -> Stmt<'s> {
        let sql = &self.inner.sql;
        match only {
            None => Stmt::Typed(&sql.snapshot, vec![text(service)]),
            Some(keys) => Stmt::Typed(
                &sql.snapshot_of_tasks,
                vec![
                    text(service),
                    text_array(keys.iter().map(|k| k.version.to_string()).collect()),
                    text_array(keys.iter().map(|k| k.id.clone()).collect()),
                ],
            ),
        }
    }

    /// A fenced write, with the holder's `notice` if any.
    async fn write(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
        notice: Option<&Notice>,
    ) -> Result<(), BackendError> {
        // The store moves by this handle's own hand: not a move a later
        // request of this handle should be told of.
        self.inner.reads.forget(service);
        // A write that moves the store's stage hands the lease's wake locks
        // on: the new stage's are held before the write commits, the old
        // ones let go once it has (see `takeover.rs`). The last write of a
        // finished plan (the one with the holder's notice) lets them go
        // first instead: the nodes blocked on them then wait idle, and its
        // notification reaches them as soon as it commits.
        let holding = &self.inner.holding;
        let hand_off = match notice {
            Some(_) => {
                if let Some(let_go) = holding.wake_off(service, fence) {
                    let_go.run().await;
                }
                None
            }
            None => holding.hand_off(service, fence, changes, |stage| {
                self.wake_keys(service, fence, stage)
            }),
        };
        if let Some(h) = &hand_off {
            h.take(holding, service, fence).await;
        }
        let result = self.write_once(service, fence, changes, notice).await;
        if let (Ok(()), Some(h)) = (&result, hand_off) {
            h.finish(holding, service, fence).await;
        }
        result
    }

    /// [`Store::write`]'s flight, and its retry when what this handle knew
    /// of the store was out of date.
    async fn write_once(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
        notice: Option<&Notice>,
    ) -> Result<(), BackendError> {
        self.with_tables(|| async move {
            let mut conn = self.conn().await?;
            let op = async {
                let c = &conn;
                if let Some(known) = self.inner.known.take(service, fence) {
                    if let Some(known) = self
                        .write_known(c, service, fence, changes, notice, known)
                        .await?
                    {
                        self.inner.known.put(service, fence, known);
                        return Ok(());
                    }
                }
                self.write_read_first(c, service, fence, changes, notice)
                    .await
            };
            let result = self.timed(op).await;
            self.settle(&mut conn, "writing to the store", result).await
        })
        .await
    }

    /// The write of `changes` when this handle knows what the store holds
    /// (`known`, which it took): checks them against it, then sends one
    /// flight: `BEGIN`, the guard, the writes, the notification and
    /// `COMMIT`. The guard locks the state row and fails unless it still
    /// holds `fence` and `known`'s data version and baseline, and the store
    /// revision is still `known`'s: nobody wrote the service's store rows
    /// since. Then the transaction is aborted, the
    /// `COMMIT` rolls it back, and this returns `None`, as it does when
    /// `known` refuses the changes: the caller reads the store first
    /// ([`PostgresBackend::write_read_first`]), which refuses precisely or
    /// writes. Returns what the store holds after the commit.
    async fn write_known(
        &self,
        c: &Conn<'_>,
        service: &str,
        fence: u64,
        changes: &[Change],
        notice: Option<&Notice>,
        mut known: Known,
    ) -> Result<Option<Known>, BackendError> {
        let sql = &self.inner.sql;
        let touched = Change::touched(changes);
        let mut part = known.snapshot.subset(touched.as_ref());
        let Ok(todo) = part.check(fence, changes) else {
            // Refused by what this handle knows: the store, read under its
            // lock, refuses in its own words, or takes the changes if
            // someone else changed it since.
            self.inner.known.put(service, fence, known);
            return Ok(None);
        };
        let mut write = Vec::with_capacity(todo.len() + 4);
        write.push(Stmt::Simple("BEGIN"));
        write.push(Stmt::Typed(
            &sql.guard,
            vec![
                text(service),
                int8(fence_to_column(fence)?),
                text(super::FORMAT.to_string()),
                opt_text(known.snapshot.data_version.as_ref().map(|v| v.to_string())),
                opt_text(known.snapshot.baseline.as_ref().map(|v| v.to_string())),
                text(known.revision.clone()),
            ],
        ));
        self.push_writes(&mut write, service, fence, &todo, notice)?;
        write.push(Stmt::Simple("COMMIT"));
        let mut results = c.pipeline(&write).await;
        if guard_failed(&results[1]) {
            // Aborted: the `COMMIT` answered as a rollback, and nothing was
            // written (unless its answer is an error: the outcome is then
            // that of the connection's end, a rollback too).
            return match results.pop() {
                Some(Err(e)) => Err(driver(e)),
                _ => Ok(None),
            };
        }
        let rows = first_error(results).map_err(driver)?;
        let revision = revision_of(&rows[1], 1)?;
        known.snapshot.absorb(part);
        Ok(Some(Known {
            revision,
            snapshot: known.snapshot,
        }))
    }

    /// The write of `changes` in two round trips: lock the state row and
    /// read the snapshot, check the changes, then write. When this handle
    /// claimed `service` with `fence`, it reads the whole snapshot and keeps
    /// what the store holds after the commit, so that its next write takes
    /// one round trip again.
    async fn write_read_first(
        &self,
        c: &Conn<'_>,
        service: &str,
        fence: u64,
        changes: &[Change],
        notice: Option<&Notice>,
    ) -> Result<(), BackendError> {
        let sql = &self.inner.sql;
        let keep = self.inner.known.holds(service, fence);
        let touched = Change::touched(changes);
        let only = if keep { None } else { touched.as_ref() };
        let mut snap = self.locked_snapshot(c, service, only).await?;
        let todo = snap.check(fence, changes)?;
        let mut write = Vec::with_capacity(todo.len() + 3);
        self.push_writes(&mut write, service, fence, &todo, notice)?;
        let bump = keep || !todo.is_empty();
        if bump {
            write.push(Stmt::Typed(&sql.bump_revision, vec![text(service)]));
        }
        write.push(Stmt::Simple("COMMIT"));
        let rows = first_error(c.pipeline(&write).await).map_err(driver)?;
        if keep {
            let revision = revision_of(&rows[write.len() - 2], 0)?;
            self.inner.known.put(
                service,
                fence,
                Known {
                    revision,
                    snapshot: snap,
                },
            );
        } else if bump {
            // Written under another fence than the one claimed here: what
            // this handle knew is out of date.
            self.inner.known.forget(service);
        }
        Ok(())
    }

    /// Pushes the statements that write `todo` for `service` with `fence`,
    /// then, if one of them wakes waiters, the notifications: the holder's
    /// `notice` first, so that a listener has it when the service's own
    /// notification (which nodes of older releases wait for) wakes it.
    fn push_writes<'s>(
        &'s self,
        write: &mut Vec<Stmt<'s>>,
        service: &str,
        fence: u64,
        todo: &[&Change],
        notice: Option<&Notice>,
    ) -> Result<(), BackendError> {
        let sql = &self.inner.sql;
        let mut notify = false;
        for change in todo {
            let columns = Columns::of(fence, change)?;
            notify |= columns.wakes_waiters();
            write.push(self.write_stmt(service, columns)?);
        }
        if notify {
            if let Some(n) = notice {
                write.push(Stmt::Typed(
                    &sql.notify,
                    vec![text(sql.channel.clone()), text(n.encode(service))],
                ));
            }
            write.push(Stmt::Typed(
                &sql.notify,
                vec![text(sql.channel.clone()), text(service)],
            ));
        }
        Ok(())
    }

    /// The statement that stores `columns` for `service`.
    fn write_stmt<'s>(&'s self, service: &str, columns: Columns) -> Result<Stmt<'s>, BackendError> {
        let sql = &self.inner.sql;
        let statement = match columns.write() {
            Write::Start => &sql.start,
            Write::Finish => &sql.finish,
            Write::Checkpoint => &sql.checkpoint,
            Write::DataVersion => &sql.data_version,
            Write::Baseline => &sql.baseline,
            other => {
                return Err(BackendError::other(format!(
                    "this PostgreSQL backend does not know the write {other:?}"
                )))
            }
        };
        Ok(Stmt::Typed(statement, bound(service, columns)))
    }
}

#[async_trait]
impl Store for PostgresBackend {
    async fn load(&self, service: &str) -> Result<Snapshot, BackendError> {
        self.read_snapshot(service, None).await
    }

    async fn claim(&self, service: &str, fence: u64) -> Result<Snapshot, BackendError> {
        // Whatever the claim's outcome, what this handle knew of the
        // service belongs to an older claim.
        self.inner.known.forget(service);
        self.inner.reads.forget(service);
        self.with_tables(|| async move {
            let sql = &self.inner.sql;
            let mut conn = self.conn().await?;
            let op = async {
                let c = &conn;
                let mut snap = self.locked_snapshot(c, service, None).await?;
                let mut write = Vec::with_capacity(3);
                if snap.claim(fence)? {
                    write.push(Stmt::Typed(
                        &sql.raise_fence,
                        vec![text(service), int8(fence_to_column(fence)?)],
                    ));
                }
                write.push(Stmt::Typed(&sql.bump_revision, vec![text(service)]));
                write.push(Stmt::Simple("COMMIT"));
                let rows = first_error(c.pipeline(&write).await).map_err(driver)?;
                let revision = revision_of(&rows[write.len() - 2], 0)?;
                self.inner.known.claimed(
                    service,
                    fence,
                    Known {
                        revision,
                        snapshot: snap.clone(),
                    },
                );
                Ok(snap)
            };
            let result = self.timed(op).await;
            self.settle(&mut conn, "claiming the store", result).await
        })
        .await
    }

    /// Checks `changes` and writes them; one round trip when this handle
    /// knows what the store holds (see [`PostgresBackend::write_known`]),
    /// two otherwise.
    async fn apply(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
    ) -> Result<(), BackendError> {
        self.write(service, fence, changes, None).await
    }

    /// [`Store::apply`], with `notice` in a `NOTIFY` of the same
    /// transaction, so delivered only once it commits.
    async fn apply_with_notice(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
        notice: &Notice,
    ) -> Result<(), BackendError> {
        self.write(service, fence, changes, Some(notice)).await
    }

    /// The newest notice the listening session received.
    fn notice(&self, service: &str) -> Option<Notice> {
        self.inner.wakeups.notice(service)
    }

    async fn services(&self) -> Result<Vec<String>, BackendError> {
        self.with_tables(|| async move {
            let sql = &self.inner.sql;
            let mut conn = self.conn().await?;
            let stmts = [
                Stmt::Typed(&sql.format, vec![]),
                Stmt::Typed(&sql.services, vec![]),
            ];
            let op = async {
                let rows = first_error(conn.pipeline(&stmts).await).map_err(driver)?;
                match rows[0].first() {
                    Some(r) => format_of(r, 0)?,
                    None => {
                        return Err(BackendError::corrupt("the meta table has no `format` row"))
                    }
                }
                let mut names = rows[1]
                    .iter()
                    .map(|r| get::<String>(r, 0, "a service name"))
                    .collect::<Result<Vec<_>, _>>()?;
                // Byte order, whatever the database's collation.
                names.sort();
                Ok(names)
            };
            let result = self.timed(op).await;
            self.settle(&mut conn, "listing the services", result).await
        })
        .await
    }

    async fn history(&self, service: &str) -> Result<Vec<HistoryEntry>, BackendError> {
        self.with_tables(|| async move {
            let sql = &self.inner.sql;
            let mut conn = self.conn().await?;
            let stmts = [
                Stmt::Typed(&sql.format, vec![]),
                Stmt::Typed(&sql.history_rows, vec![text(service)]),
            ];
            let op = async {
                let rows = first_error(conn.pipeline(&stmts).await).map_err(driver)?;
                match rows[0].first() {
                    Some(r) => format_of(r, 0)?,
                    None => {
                        return Err(BackendError::corrupt("the meta table has no `format` row"))
                    }
                }
                let mut out = Vec::with_capacity(rows[1].len());
                for r in &rows[1] {
                    let columns = HistoryColumns {
                        summary: summary(r, 0)?,
                        holder: get(r, 10, "a history row's holder")?,
                        description: get(r, 11, "a history row's description")?,
                        started_ms: get(r, 12, "a start time")?,
                        finished_ms: get(r, 13, "an end time")?,
                        duration_ms: get(r, 14, "a duration")?,
                        error: get(r, 15, "an error text")?,
                    };
                    out.push(columns.decode()?);
                }
                Ok(out)
            };
            let result = self.timed(op).await;
            self.settle(&mut conn, "reading the history", result).await
        })
        .await
    }
}

/// Whether a guard of [`PostgresBackend::write_known`] failed: the store
/// changed since this handle's last write.
fn guard_failed(result: &Result<Vec<Row>, tokio_postgres::Error>) -> bool {
    matches!(result, Err(e) if e.code() == Some(&SqlState::DIVISION_BY_ZERO))
}

/// The store revision in column `idx` of the only row of `rows`.
pub(super) fn revision_of(rows: &[Row], idx: usize) -> Result<String, BackendError> {
    let row = rows
        .first()
        .ok_or_else(|| BackendError::corrupt("the store revision was not returned"))?;
    get::<Option<String>>(row, idx, "the store revision")?
        .ok_or_else(|| BackendError::corrupt("the store revision is null"))
}

/// `$1`, the service, then the values of `columns` from `$2` on.
pub(super) fn bound(service: &str, columns: Columns) -> Vec<(Param, Type)> {
    std::iter::once(text(service))
        .chain(columns.into_values().into_iter().map(|v| match v {
            Value::Text(t) => text(t),
            Value::OptText(t) => opt_text(t),
            Value::Int4(i) => int4(i),
            Value::Int8(i) => int8(i),
            Value::OptInt8(i) => opt_int8(i),
        }))
        .collect()
}
