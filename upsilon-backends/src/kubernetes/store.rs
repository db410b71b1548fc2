//! The store: [`Store`] for [`KubernetesBackend`] on the state ConfigMap
//! (every fenced write, conditional on its `resourceVersion`) and the
//! history pages (see `state.rs`).

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use futures_util::future::join_all;
use k8s_openapi::api::core::v1::ConfigMap;
use tracing::debug;
use upsilon::backend::{
    BackendError, Change, Columns, HistoryEntry, Snapshot, Store, Value, Write,
};

use super::api::{chain, Written};
use super::names::{Part, PART_LABEL, PREFIX_LABEL};
use super::state::{
    by_page, check_pending, clip, entry_key, holds_anything, page_object, page_rows, pages,
    service_of, Finish, Mark, Pending, Row, State, DESCRIPTION_MAX, ERROR_MAX,
};
use super::watch::{rv_number, Entry};
use super::{wall_ms, Inner, KubernetesBackend};

/// What the state watch keeps of a state ConfigMap: its data version and
/// baseline.
pub(crate) fn project(cm: &ConfigMap) -> Option<(String, Entry)> {
    let service = service_of(&cm.metadata)?;
    let version = cm.metadata.resource_version.clone().unwrap_or_default();
    let data = cm.data.as_ref();
    Some((
        service,
        Entry {
            rv: rv_number(Some(&version)),
            version,
            a: data.and_then(|d| d.get("dataVersion").cloned()),
            b: data.and_then(|d| d.get("baseline").cloned()),
        },
    ))
}

fn text(v: &Value) -> Result<String, BackendError> {
    match v {
        Value::Text(t) => Ok(t.clone()),
        other => Err(BackendError::other(format!("expected text, got {other:?}"))),
    }
}

fn int(v: &Value) -> Result<i64, BackendError> {
    match v {
        Value::Int4(i) => Ok(i64::from(*i)),
        Value::Int8(i) => Ok(*i),
        other => Err(BackendError::other(format!(
            "expected a number, got {other:?}"
        ))),
    }
}

impl Inner {
    /// The state of `service`; rebuilt from its history pages when its
    /// ConfigMap is missing (never written, or deleted).
    pub(crate) async fn read_state(&self, service: &str) -> Result<State, BackendError> {
        let name = self.names.object(service);
        match self.configmaps.get(&name).await? {
            Some(cm) => {
                let state = State::decode(cm, &name)?;
                check_pending(&state)?;
                Ok(state)
            }
            None => {
                let mut rows = BTreeMap::new();
                for page in self
                    .configmaps
                    .list(&self.names.pages_selector(service))
                    .await?
                {
                    let name = page.metadata.name.clone().unwrap_or_default();
                    rows.extend(page_rows(&page, &name)?);
                }
                State::from_rows(&rows)
            }
        }
    }

    fn is_copied(&self, service: &str, e: &Pending) -> bool {
        self.copied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .is_some_and(|s| s.contains(&entry_key(e)))
    }

    /// Copies committed history entries to their pages; a row already
    /// there is left as it is.
    async fn copy(&self, service: &str, entries: &[Pending]) -> Result<(), BackendError> {
        for (n, group) in by_page(entries) {
            let name = self.names.page(service, n);
            let mut done = false;
            for _ in 0..self.options.conflict_retries {
                let found = self.configmaps.get(&name).await?;
                let mut rows = match &found {
                    Some(cm) => page_rows(cm, &name)?,
                    None => BTreeMap::new(),
                };
                let mut changed = false;
                for e in &group {
                    changed |= e.apply(&mut rows);
                }
                if !changed {
                    done = true;
                    break;
                }
                let page = page_object(&self.names, service, n, found, &rows)?;
                if let Written::Stored(_) = self.configmaps.put(&page).await? {
                    done = true;
                    break;
                }
            }
            if !done {
                return Err(self.contended("copying history to a page of", service));
            }
            let mut copied = self.copied.lock().unwrap_or_else(|p| p.into_inner());
            let set = copied.entry(service.to_owned()).or_default();
            set.extend(group.iter().map(|e| entry_key(e)));
        }
        Ok(())
    }

    /// Forgets copied entries that are no longer pending.
    fn prune_copied(&self, service: &str, pending: &[Pending]) {
        let keep: BTreeSet<String> = pending.iter().map(entry_key).collect();
        if let Some(set) = self
            .copied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(service)
        {
            set.retain(|k| keep.contains(k));
        }
    }
}

#[async_trait]
impl Store for KubernetesBackend {
    async fn load(&self, service: &str) -> Result<Snapshot, BackendError> {
        Ok(self.inner.read_state(service).await?.snapshot()?.0)
    }

    async fn claim(&self, service: &str, fence: u64) -> Result<Snapshot, BackendError> {
        let i = &self.inner;
        for _ in 0..i.options.conflict_retries {
            let mut state = i.read_state(service).await?;
            let (mut snap, _) = state.snapshot()?;
            if !snap.claim(fence)? {
                return Ok(snap);
            }
            state.fence = fence;
            let cm = state.encode(&i.names, service)?;
            match i.configmaps.put(&cm).await? {
                Written::Stored(_) => return Ok(snap),
                Written::Raced => continue,
            }
        }
        Err(i.contended("claiming the store of", service))
    }

    async fn apply(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
    ) -> Result<(), BackendError> {
        let i = &self.inner;
        for _ in 0..i.options.conflict_retries {
            let mut state = i.read_state(service).await?;
            // Entries committed by a write whose copy did not finish (a
            // crash, another node's): copied first, so that the pending
            // list stays short.
            let unknown: Vec<Pending> = state
                .pending
                .iter()
                .filter(|e| !i.is_copied(service, e))
                .cloned()
                .collect();
            if !unknown.is_empty() {
                i.copy(service, &unknown).await?;
            }
            let (mut snap, mut newest) = state.snapshot()?;
            let todo = snap.check(fence, changes)?;
            if todo.is_empty() {
                return Ok(());
            }
            let now = wall_ms();
            let mut entries = Vec::new();
            for change in todo {
                let columns = Columns::of(fence, change)?;
                let v = columns.values();
                match columns.write() {
                    Write::Start => {
                        let row = Row {
                            id: state.next_row,
                            version: text(&v[0])?,
                            task: text(&v[1])?,
                            attempt: int(&v[2])?,
                            kind: text(&v[3])?,
                            state: upsilon::backend::AttemptState::Running.as_str().to_owned(),
                            fence: int(&v[4])?,
                            holder: text(&v[5])?,
                            description: clip(text(&v[6])?, DESCRIPTION_MAX),
                            started: now,
                            finished: None,
                            duration_ms: None,
                            error: None,
                            checkpoint: columns.checkpoint().cloned(),
                        };
                        let (key, _) = row.summary().decode()?;
                        newest.insert(key, row.id);
                        state.next_row += 1;
                        entries.push(Pending::Start(row));
                    }
                    Write::Finish => {
                        let (version, task) = (text(&v[0])?, text(&v[1])?);
                        let key = upsilon::TaskKey {
                            version: upsilon::backend::version_from_column(&version, "a version")?,
                            id: task.clone(),
                        };
                        let id = newest.get(&key).copied().ok_or_else(|| {
                            BackendError::corrupt(format!(
                                "the summary of {key} names no row to finish"
                            ))
                        })?;
                        let error = match &v[5] {
                            Value::OptText(e) => e.clone().map(|e| clip(e, ERROR_MAX)),
                            other => {
                                return Err(BackendError::other(format!(
                                    "expected an optional error text, got {other:?}"
                                )))
                            }
                        };
                        entries.push(Pending::Finish(Finish {
                            id,
                            version,
                            task,
                            attempt: int(&v[2])?,
                            fence: i64::try_from(fence).unwrap_or(i64::MAX),
                            state: text(&v[3])?,
                            finished: now,
                            duration_ms: int(&v[4])?,
                            error,
                        }));
                    }
                    Write::Checkpoint => {
                        let (version, task) = (text(&v[0])?, text(&v[1])?);
                        let key = upsilon::TaskKey {
                            version: upsilon::backend::version_from_column(&version, "a version")?,
                            id: task.clone(),
                        };
                        let id = newest.get(&key).copied().ok_or_else(|| {
                            BackendError::corrupt(format!(
                                "the summary of {key} names no row to checkpoint"
                            ))
                        })?;
                        let checkpoint = columns.checkpoint().cloned().ok_or_else(|| {
                            BackendError::other("a checkpoint write without its checkpoint")
                        })?;
                        entries.push(Pending::Checkpoint(Mark {
                            id,
                            version,
                            task,
                            attempt: int(&v[2])?,
                            fence: i64::try_from(fence).unwrap_or(i64::MAX),
                            checkpoint,
                        }));
                    }
                    Write::DataVersion => state.data_version = Some(text(&v[0])?),
                    Write::Baseline => {
                        let version = text(&v[0])?;
                        state.data_version = Some(version.clone());
                        state.baseline = Some(version);
                    }
                    other => {
                        return Err(BackendError::other(format!(
                            "this Kubernetes backend does not know the write {other:?}"
                        )))
                    }
                }
            }
            state.set_tasks(&snap, &newest);
            state.pending.retain(|e| !i.is_copied(service, e));
            state.pending.extend(entries.iter().cloned());
            let cm = state.encode(&i.names, service)?;
            match i.configmaps.put(&cm).await? {
                Written::Stored(_) => {
                    i.prune_copied(service, &state.pending);
                    // Committed: the copy to the pages can wait for the next
                    // write if it fails now (the entries stay pending, and
                    // `history` reads them there).
                    if let Err(e) = i.copy(service, &entries).await {
                        debug!(%service, error = %chain(&e), "copying history to its page failed; the next write copies it");
                    }
                    return Ok(());
                }
                Written::Raced => continue,
            }
        }
        Err(i.contended("writing the store of", service))
    }

    async fn history(&self, service: &str) -> Result<Vec<HistoryEntry>, BackendError> {
        let i = &self.inner;
        let state = i.read_state(service).await?;
        let names: Vec<String> = pages(state.next_row)
            .map(|n| i.names.page(service, n))
            .collect();
        let found = join_all(names.iter().map(|n| i.configmaps.get(n))).await;
        let mut rows = BTreeMap::new();
        for (name, page) in names.iter().zip(found) {
            if let Some(cm) = page? {
                rows.extend(page_rows(&cm, name)?);
            }
        }
        for e in &state.pending {
            e.apply(&mut rows);
        }
        rows.into_values().map(Row::decode).collect()
    }

    async fn services(&self) -> Result<Vec<String>, BackendError> {
        let i = &self.inner;
        let selector = format!("{PREFIX_LABEL}={}", i.names.prefix);
        let (leases, configmaps) =
            tokio::join!(i.leases.list(&selector), i.configmaps.list(&selector));
        let mut out = BTreeSet::new();
        for lease in leases? {
            let held = lease
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_deref())
                .is_some_and(|h| !h.is_empty());
            let counted = lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(super::names::COUNTER))
                .is_some_and(|c| c != "0");
            if held || counted {
                out.extend(service_of(&lease.metadata));
            }
        }
        for cm in configmaps? {
            let part = cm
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(PART_LABEL))
                .cloned();
            let name = cm.metadata.name.clone().unwrap_or_default();
            let holds = match part.as_deref() {
                // One that does not read still holds something of its
                // service: listed, so that an operator finds it.
                Some(p) if p == Part::State.as_str() => {
                    State::decode(cm.clone(), &name).map_or(true, |s| holds_anything(&s))
                }
                Some(p) if p == Part::History.as_str() => {
                    cm.data.as_ref().is_some_and(|d| !d.is_empty())
                }
                _ => false,
            };
            if holds {
                out.extend(service_of(&cm.metadata));
            }
        }
        Ok(out.into_iter().collect())
    }
}
