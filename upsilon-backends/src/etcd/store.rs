//! The store: data version and history, every write one transaction that
//! commits only if the service's fence key is unchanged since the read the
//! write was checked on.
//!
//! Every store write (a claim, an apply) and every grant rewrites the fence
//! key, so that compare alone orders all of a service's writes: a write
//! commits only if no other was made since its read, in particular no claim
//! of a newer fence. A write that loses the compare is read and checked
//! again, and a stale holder then gets [`BackendError::StaleFence`] from
//! [`Snapshot::check`]. The keys a write puts are compared too (a history
//! row it creates must not exist, the state key and the rows it changes
//! must be as read), so that an edit by hand between the read and the write
//! is not overwritten.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp};
use upsilon::backend::{
    BackendError, Change, Columns, HistoryColumns, HistoryEntry, Snapshot, StateColumns, Store,
    SummaryColumns, Value, Write,
};
use upsilon::TaskKey;

use super::error::contended;
use super::keys::{decode, encode, FenceValue, HistoryValue, StateValue};
use super::lock::TRIES;
use super::{now_ms, EtcdBackend};

/// What a store operation read of a service, at one revision.
struct Loaded {
    fence_kv: Option<KeyValue>,
    counters: FenceValue,
    state_kv: Option<KeyValue>,
    state: StateValue,
    /// History rows by key, with the key-values they were read from.
    rows: BTreeMap<String, (KeyValue, HistoryValue)>,
    snapshot: Snapshot,
}

fn summary(v: &HistoryValue) -> SummaryColumns {
    SummaryColumns {
        version: v.version.clone(),
        task_id: v.task_id.clone(),
        attempt: v.attempt,
        kind: v.kind.clone(),
        state: v.state.clone(),
        fence: v.fence,
        checkpoint: v.checkpoint.clone(),
    }
}

/// History rows decoded, oldest first (by create revision).
fn rows_of(kvs: &[KeyValue]) -> Result<Vec<(KeyValue, HistoryValue)>, BackendError> {
    let mut rows = kvs
        .iter()
        .map(|kv| Ok((kv.clone(), decode::<HistoryValue>(kv.key(), kv.value())?)))
        .collect::<Result<Vec<_>, BackendError>>()?;
    rows.sort_by_key(|(kv, _)| kv.create_revision());
    Ok(rows)
}

/// A compare that `key` is as `kv` shows it (or missing, for `None`).
fn unchanged(key: &str, kv: Option<&KeyValue>) -> Compare {
    match kv {
        Some(kv) => Compare::mod_revision(key, CompareOp::Equal, kv.mod_revision()),
        None => Compare::create_revision(key, CompareOp::Equal, 0),
    }
}

fn text(values: &[Value], i: usize) -> Result<String, BackendError> {
    match values.get(i) {
        Some(Value::Text(t)) => Ok(t.clone()),
        other => Err(BackendError::other(format!(
            "a write's value {i} is {other:?}, not text"
        ))),
    }
}

fn int(values: &[Value], i: usize) -> Result<i64, BackendError> {
    match values.get(i) {
        Some(Value::Int4(n)) => Ok(i64::from(*n)),
        Some(Value::Int8(n)) => Ok(*n),
        other => Err(BackendError::other(format!(
            "a write's value {i} is {other:?}, not a number"
        ))),
    }
}

impl EtcdBackend {
    /// The fence key, the state key and the history rows of `service` (of
    /// the tasks in `only`, or all), at one revision, as a snapshot.
    async fn load_rows(
        &self,
        service: &str,
        only: Option<&BTreeSet<&TaskKey>>,
    ) -> Result<Loaded, BackendError> {
        let keys = &self.inner.keys;
        let mut ranges = vec![
            TxnOp::get(keys.fence(service), None),
            TxnOp::get(keys.state(service), None),
        ];
        let prefix = || Some(GetOptions::new().with_prefix());
        match only {
            None => ranges.push(TxnOp::get(keys.history(service), prefix())),
            Some(tasks) => {
                ranges.extend(tasks.iter().map(|t| {
                    TxnOp::get(keys.task(service, &t.version.to_string(), &t.id), prefix())
                }))
            }
        }
        let read = self.read("reading the store", ranges).await?;
        let fence_kv = read.one(0).cloned();
        let counters: FenceValue = match &fence_kv {
            Some(kv) => decode(kv.key(), kv.value())?,
            None => FenceValue::default(),
        };
        let state_kv = read.one(1).cloned();
        let state: StateValue = match &state_kv {
            Some(kv) => decode(kv.key(), kv.value())?,
            None => StateValue::default(),
        };
        let all: Vec<KeyValue> = read.ranges[2..].iter().flatten().cloned().collect();
        let rows = rows_of(&all)?;
        let store_fence = i64::try_from(counters.store_fence).map_err(|_| {
            BackendError::corrupt(format!(
                "the store's fence {} does not fit 63 bits",
                counters.store_fence
            ))
        })?;
        let snapshot = Snapshot::from_columns(
            StateColumns {
                data_version: state.data_version.clone(),
                baseline: state.baseline.clone(),
                store_fence,
            },
            rows.iter().map(|(_, v)| summary(v)),
        )?;
        let rows = rows
            .into_iter()
            .map(|(kv, v)| (String::from_utf8_lossy(kv.key()).into_owned(), (kv, v)))
            .collect();
        Ok(Loaded {
            fence_kv,
            counters,
            state_kv,
            state,
            rows,
            snapshot,
        })
    }

    /// The transaction that writes `todo` on what `loaded` read, or `None`
    /// when there is nothing to write.
    fn apply_txn(
        &self,
        service: &str,
        fence: u64,
        loaded: &Loaded,
        todo: &[&Change],
    ) -> Result<Option<Txn>, BackendError> {
        if todo.is_empty() {
            return Ok(None);
        }
        let keys = &self.inner.keys;
        let now = now_ms();
        let mut state = loaded.state.clone();
        let mut state_changed = false;
        // Rows this write puts, with the key-value each replaces.
        let mut puts: BTreeMap<String, (Option<&KeyValue>, HistoryValue)> = BTreeMap::new();
        for change in todo {
            let columns = Columns::of(fence, change)?;
            let v = columns.values();
            match columns.write() {
                Write::Start => {
                    let (version, task_id, attempt) = (text(v, 0)?, text(v, 1)?, int(v, 2)?);
                    let key = keys.row(service, &version, &task_id, attempt);
                    let row = HistoryValue {
                        version,
                        task_id,
                        attempt,
                        kind: text(v, 3)?,
                        state: "running".to_owned(),
                        fence: int(v, 4)?,
                        holder: text(v, 5)?,
                        description: text(v, 6)?,
                        started_ms: now,
                        finished_ms: None,
                        duration_ms: None,
                        error: None,
                        checkpoint: columns.checkpoint().cloned(),
                    };
                    let replaces = loaded.rows.get(&key).map(|(kv, _)| kv);
                    puts.insert(key, (replaces, row));
                }
                Write::Finish => {
                    let (version, task_id, attempt) = (text(v, 0)?, text(v, 1)?, int(v, 2)?);
                    let key = keys.row(service, &version, &task_id, attempt);
                    let (replaces, mut row) = match puts.remove(&key) {
                        Some(put) => put,
                        None => match loaded.rows.get(&key) {
                            Some((kv, row)) => (Some(kv), row.clone()),
                            None => {
                                return Err(BackendError::corrupt(format!(
                                    "the history row {key} that a finish ends is missing"
                                )))
                            }
                        },
                    };
                    row.state = text(v, 3)?;
                    row.duration_ms = Some(int(v, 4)?);
                    row.error = match v.get(5) {
                        Some(Value::OptText(e)) => e.clone(),
                        _ => None,
                    };
                    row.finished_ms = Some(now);
                    puts.insert(key, (replaces, row));
                }
                Write::Checkpoint => {
                    let (version, task_id, attempt) = (text(v, 0)?, text(v, 1)?, int(v, 2)?);
                    let key = keys.row(service, &version, &task_id, attempt);
                    let (replaces, mut row) = match puts.remove(&key) {
                        Some(put) => put,
                        None => match loaded.rows.get(&key) {
                            Some((kv, row)) => (Some(kv), row.clone()),
                            None => {
                                return Err(BackendError::corrupt(format!(
                                    "the history row {key} that a checkpoint updates is missing"
                                )))
                            }
                        },
                    };
                    row.checkpoint = columns.checkpoint().cloned();
                    puts.insert(key, (replaces, row));
                }
                Write::DataVersion => {
                    state.data_version = Some(text(v, 0)?);
                    state_changed = true;
                }
                Write::Baseline => {
                    let version = text(v, 0)?;
                    state.data_version = Some(version.clone());
                    state.baseline = Some(version);
                    state_changed = true;
                }
                other => {
                    return Err(BackendError::other(format!(
                        "this etcd backend does not know the write {other:?}"
                    )))
                }
            }
        }
        let fence_key = keys.fence(service);
        let mut compares = vec![
            self.format_unchanged(),
            unchanged(&fence_key, loaded.fence_kv.as_ref()),
        ];
        // Rewritten as read: its mod revision orders the service's writes.
        let mut ops = vec![TxnOp::put(
            fence_key.as_str(),
            encode(&loaded.counters),
            None,
        )];
        if state_changed {
            let state_key = keys.state(service);
            compares.push(unchanged(&state_key, loaded.state_kv.as_ref()));
            ops.push(TxnOp::put(state_key, encode(&state), None));
        }
        for (key, (replaces, row)) in puts {
            compares.push(unchanged(&key, replaces));
            ops.push(TxnOp::put(key, encode(&row), None));
        }
        Ok(Some(Txn::new().when(compares).and_then(ops)))
    }
}

#[async_trait]
impl Store for EtcdBackend {
    async fn load(&self, service: &str) -> Result<Snapshot, BackendError> {
        Ok(self.load_rows(service, None).await?.snapshot)
    }

    async fn claim(&self, service: &str, fence: u64) -> Result<Snapshot, BackendError> {
        let fence_key = self.inner.keys.fence(service);
        for _ in 0..TRIES {
            let loaded = self.load_rows(service, None).await?;
            let mut snapshot = loaded.snapshot;
            if !snapshot.claim(fence)? {
                return Ok(snapshot);
            }
            let counters = FenceValue {
                store_fence: fence,
                ..loaded.counters
            };
            let txn = Txn::new()
                .when([
                    self.format_unchanged(),
                    unchanged(&fence_key, loaded.fence_kv.as_ref()),
                ])
                .and_then([TxnOp::put(fence_key.as_str(), encode(&counters), None)]);
            if self.txn("claiming the store", txn).await?.succeeded() {
                return Ok(snapshot);
            }
        }
        Err(contended("claiming the store", TRIES))
    }

    async fn apply(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
    ) -> Result<(), BackendError> {
        let touched = Change::touched(changes);
        for _ in 0..TRIES {
            let loaded = self.load_rows(service, touched.as_ref()).await?;
            let mut snapshot = loaded.snapshot.clone();
            let todo = snapshot.check(fence, changes)?;
            let Some(txn) = self.apply_txn(service, fence, &loaded, &todo)? else {
                return Ok(());
            };
            if self.txn("writing to the store", txn).await?.succeeded() {
                return Ok(());
            }
        }
        Err(contended("writing to the store", TRIES))
    }

    async fn history(&self, service: &str) -> Result<Vec<HistoryEntry>, BackendError> {
        let read = self
            .read(
                "reading the history",
                vec![TxnOp::get(
                    self.inner.keys.history(service),
                    Some(GetOptions::new().with_prefix()),
                )],
            )
            .await?;
        rows_of(&read.ranges[0])?
            .into_iter()
            .map(|(_, v)| {
                HistoryColumns {
                    summary: summary(&v),
                    holder: v.holder,
                    description: v.description,
                    started_ms: v.started_ms,
                    finished_ms: v.finished_ms,
                    duration_ms: v.duration_ms,
                    error: v.error,
                }
                .decode()
            })
            .collect()
    }

    async fn services(&self) -> Result<Vec<String>, BackendError> {
        let keys = &self.inner.keys;
        let read = self
            .read(
                "listing the services",
                vec![TxnOp::get(
                    keys.services(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )],
            )
            .await?;
        // Reads write nothing, so every service with a key holds something.
        let names: BTreeSet<String> = read.ranges[0]
            .iter()
            .filter_map(|kv| keys.parse(kv.key()).map(|(service, _)| service))
            .collect();
        Ok(names.into_iter().collect())
    }
}
