//! The store: data version, baseline, fence and history, every write
//! checked by the kit on what a script read, and written by a script that
//! checks that nothing moved since.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;
use upsilon::backend::{
    jitter, AttemptState, BackendError, Change, Columns, HistoryEntry, Notice, Snapshot, Store,
    Value as Bound, Write,
};
use upsilon::TaskKey;

use super::error::unexpected;
use super::lock::{busy, CONFLICT_RETRIES};
use super::rows::{key_prefix, row_id, text, Row, StoreRead};
use super::scripts::{READ_STORE, WRITE};
use super::{check_format, Keys, RedisBackend, FORMAT};

/// One write of the `WRITE` script: op, field, value.
type Op = (&'static str, String, String);

impl RedisBackend {
    /// The store of `service`: every row, or the rows of the tasks in
    /// `only`. Refuses a newer format.
    async fn read_store(
        &self,
        k: &Keys,
        only: Option<&BTreeSet<&TaskKey>>,
    ) -> Result<StoreRead, BackendError> {
        let mut read = READ_STORE.prepare_invoke();
        read.key(&k.meta)
            .key(&k.state)
            .key(&k.history)
            .key(&k.order);
        match only {
            None => {
                read.arg("all");
            }
            Some(keys) => {
                read.arg("some");
                for key in keys {
                    read.arg(key_prefix(key));
                }
            }
        }
        let found = StoreRead::decode(self.eval("reading the store", &read).await?)?;
        check_format(&found.format)?;
        Ok(found)
    }

    /// Writes `ops` if nothing moved since `read`, and publishes `wake` (the
    /// payload that wakes waiters) if any; `false` if something moved.
    async fn write(
        &self,
        k: &Keys,
        read: &StoreRead,
        wake: Option<&str>,
        ops: &[Op],
    ) -> Result<bool, BackendError> {
        let mut write = WRITE.prepare_invoke();
        write
            .key(&k.meta)
            .key(&k.state)
            .key(&k.history)
            .key(&k.order)
            .arg(&read.format)
            .arg(&read.rev)
            .arg(&read.store)
            .arg(FORMAT)
            .arg(&self.inner.channel)
            .arg(wake.unwrap_or(""));
        for (op, field, value) in ops {
            write.arg(*op).arg(field).arg(value);
        }
        match self.eval("writing to the store", &write).await? {
            Value::Int(1) => Ok(true),
            Value::Int(0) => {
                tokio::time::sleep(jitter(Duration::from_millis(2))).await;
                Ok(false)
            }
            other => Err(unexpected("writing to the store", &other)),
        }
    }

    /// [`Store::apply`], publishing `notice` (if any) in place of the
    /// service's name when the write wakes waiters.
    async fn apply_noticed(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
        notice: Option<&Notice>,
    ) -> Result<(), BackendError> {
        let k = self.keys(service)?;
        let touched = Change::touched(changes);
        for _ in 0..CONFLICT_RETRIES {
            let read = self.read_store(&k, touched.as_ref()).await?;
            let mut snap = read.snapshot()?;
            let todo = snap.check(fence, changes)?;
            if todo.is_empty() {
                return Ok(());
            }
            let mut wake = false;
            let mut found: BTreeMap<String, Row> = read.rows.iter().cloned().collect();
            let mut rows: BTreeMap<String, Row> = BTreeMap::new();
            let mut appended = Vec::new();
            let mut state = Vec::new();
            for change in todo {
                let columns = Columns::of(fence, change)?;
                wake |= columns.wakes_waiters();
                let write = columns.write();
                let checkpoint = columns.checkpoint().cloned();
                let v = columns.into_values();
                match write {
                    Write::Start => {
                        let row = Row {
                            version: txt(&v[0]),
                            task_id: txt(&v[1]),
                            attempt: num(&v[2]),
                            kind: txt(&v[3]),
                            state: AttemptState::Running.as_str().to_owned(),
                            fence: num(&v[4]),
                            holder: txt(&v[5]),
                            description: txt(&v[6]),
                            started_ms: read.now_ms,
                            finished_ms: None,
                            duration_ms: None,
                            error: None,
                            checkpoint,
                        };
                        let id = row_id(&row.version, &row.task_id, row.attempt);
                        appended.push(id.clone());
                        found.remove(&id);
                        rows.insert(id, row);
                    }
                    Write::Finish => {
                        let id = row_id(&txt(&v[0]), &txt(&v[1]), num(&v[2]));
                        let mut row = match rows.remove(&id).or_else(|| found.remove(&id)) {
                            Some(row) => row,
                            None => {
                                return Err(BackendError::corrupt(format!(
                                    "the history row {id:?} that the summaries name is missing"
                                )))
                            }
                        };
                        row.state = txt(&v[3]);
                        row.duration_ms = Some(num(&v[4]));
                        row.error = match &v[5] {
                            Bound::OptText(t) => t.clone(),
                            other => Some(txt(other)),
                        };
                        row.finished_ms = Some(read.now_ms);
                        rows.insert(id, row);
                    }
                    Write::Checkpoint => {
                        let id = row_id(&txt(&v[0]), &txt(&v[1]), num(&v[2]));
                        let mut row = match rows.remove(&id).or_else(|| found.remove(&id)) {
                            Some(row) => row,
                            None => {
                                return Err(BackendError::corrupt(format!(
                                    "the history row {id:?} that the summaries name is missing"
                                )))
                            }
                        };
                        row.checkpoint = checkpoint;
                        rows.insert(id, row);
                    }
                    Write::DataVersion => {
                        state.push(("S", "data_version".to_owned(), txt(&v[0])));
                    }
                    Write::Baseline => {
                        state.push(("S", "data_version".to_owned(), txt(&v[0])));
                        state.push(("S", "baseline".to_owned(), txt(&v[0])));
                    }
                    other => {
                        return Err(BackendError::other(format!(
                            "this Redis backend does not know the write {other:?}"
                        )))
                    }
                }
            }
            let mut ops: Vec<Op> = rows
                .into_iter()
                .map(|(id, row)| ("H", id, row.to_json()))
                .collect();
            ops.extend(appended.into_iter().map(|id| ("O", String::new(), id)));
            ops.extend(state);
            let payload = match notice {
                Some(n) => n.encode(service),
                None => service.to_owned(),
            };
            let wake = wake.then_some(payload.as_str());
            if self.write(&k, &read, wake, &ops).await? {
                return Ok(());
            }
        }
        Err(busy(service))
    }
}

#[async_trait]
impl Store for RedisBackend {
    async fn load(&self, service: &str) -> Result<Snapshot, BackendError> {
        let k = self.keys(service)?;
        self.read_store(&k, None).await?.snapshot()
    }

    async fn claim(&self, service: &str, fence: u64) -> Result<Snapshot, BackendError> {
        let k = self.keys(service)?;
        for _ in 0..CONFLICT_RETRIES {
            let read = self.read_store(&k, None).await?;
            let mut snap = read.snapshot()?;
            if !snap.claim(fence)? {
                return Ok(snap);
            }
            let raise = [("M", "store".to_owned(), fence.to_string())];
            if self.write(&k, &read, None, &raise).await? {
                return Ok(snap);
            }
        }
        Err(busy(service))
    }

    async fn apply(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
    ) -> Result<(), BackendError> {
        self.apply_noticed(service, fence, changes, None).await
    }

    /// Published in the write's own script, so only once it commits, in
    /// place of the service's name.
    async fn apply_with_notice(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
        notice: &Notice,
    ) -> Result<(), BackendError> {
        self.apply_noticed(service, fence, changes, Some(notice))
            .await
    }

    fn notice(&self, service: &str) -> Option<Notice> {
        self.inner.wakeups.notice(service)
    }

    async fn history(&self, service: &str) -> Result<Vec<HistoryEntry>, BackendError> {
        let k = self.keys(service)?;
        let read = self.read_store(&k, None).await?;
        read.rows
            .into_iter()
            .map(|(_, row)| row.history().decode())
            .collect()
    }

    async fn services(&self) -> Result<Vec<String>, BackendError> {
        let prefix = &self.inner.options.prefix;
        let pattern = format!("{prefix}:{{*");
        let head = format!("{prefix}:{{");
        let mut found = BTreeSet::new();
        let mut cursor = 0u64;
        loop {
            let mut conn = self.inner.conn.clone();
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let reply = self
                .timed("listing the services", scan.query_async::<Value>(&mut conn))
                .await?;
            let (next, keys) = match reply {
                Value::Array(mut v) if v.len() == 2 => {
                    let keys = v.pop().unwrap_or_default();
                    (v.pop().unwrap_or_default(), keys)
                }
                other => return Err(unexpected("listing the services", &other)),
            };
            let Value::Array(keys) = keys else {
                return Err(unexpected("listing the services", &keys));
            };
            for key in &keys {
                let Some(key) = text(key, "a key")? else {
                    continue;
                };
                let service = key.strip_prefix(&head).and_then(|rest| {
                    ["meta", "lease", "state", "history", "order"]
                        .iter()
                        .find_map(|kind| rest.strip_suffix(&format!("}}:{kind}")))
                });
                if let Some(s) = service.filter(|s| !s.is_empty()) {
                    found.insert(s.to_owned());
                }
            }
            cursor = match text(&next, "the scan cursor")?.map(|c| c.parse::<u64>()) {
                Some(Ok(c)) => c,
                _ => return Err(unexpected("listing the services", &next)),
            };
            if cursor == 0 {
                return Ok(found.into_iter().collect());
            }
        }
    }
}

fn txt(v: &Bound) -> String {
    match v {
        Bound::Text(t) => t.clone(),
        Bound::OptText(t) => t.clone().unwrap_or_default(),
        Bound::Int4(i) => i.to_string(),
        Bound::Int8(i) => i.to_string(),
        Bound::OptInt8(i) => i.map(|i| i.to_string()).unwrap_or_default(),
    }
}

fn num(v: &Bound) -> i64 {
    match v {
        Bound::Int4(i) => (*i).into(),
        Bound::Int8(i) => *i,
        Bound::Text(t) | Bound::OptText(Some(t)) => t.parse().unwrap_or_default(),
        Bound::OptText(None) | Bound::OptInt8(None) => 0,
        Bound::OptInt8(Some(i)) => *i,
    }
}
