//! Where Upsilon's keys live under the prefix, and what their values hold.
//!
//! ```text
//! PREFIX/format                          "1": the stored format
//! PREFIX/s/SERVICE/lock                  the lease: attached to an etcd lease
//! PREFIX/s/SERVICE/fence                 the fence offset and the store's fence
//! PREFIX/s/SERVICE/state                 the data version and the baseline
//! PREFIX/s/SERVICE/h/VERSION/TASK/ATTEMPT  one history row per task attempt
//! ```
//!
//! Service, version and task id are percent-encoded (every byte but
//! `A-Z a-z 0-9 _ - .`), so that no name can reach into another's keys.
//! Values are JSON objects.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use upsilon::backend::BackendError;

/// The keys of one installation (one prefix).
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
}

/// What a key under `PREFIX/s/` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Lock,
    Fence,
    State,
    History,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    pub(super) fn format(&self) -> String {
        format!("{}/format", self.prefix)
    }

    /// The prefix of every service's keys.
    pub(super) fn services(&self) -> String {
        format!("{}/s/", self.prefix)
    }

    fn service(&self, service: &str) -> String {
        format!("{}/s/{}/", self.prefix, escape(service))
    }

    pub(super) fn lock(&self, service: &str) -> String {
        self.service(service) + "lock"
    }

    pub(super) fn fence(&self, service: &str) -> String {
        self.service(service) + "fence"
    }

    pub(super) fn state(&self, service: &str) -> String {
        self.service(service) + "state"
    }

    /// The prefix of every history row of `service`.
    pub(super) fn history(&self, service: &str) -> String {
        self.service(service) + "h/"
    }

    /// The prefix of the rows of one task.
    pub(super) fn task(&self, service: &str, version: &str, id: &str) -> String {
        format!(
            "{}{}/{}/",
            self.history(service),
            escape(version),
            escape(id)
        )
    }

    /// The row of one attempt of a task.
    pub(super) fn row(&self, service: &str, version: &str, id: &str, attempt: i64) -> String {
        format!("{}{attempt:010}", self.task(service, version, id))
    }

    /// The service and kind of a key under [`Keys::services`].
    pub(super) fn parse(&self, key: &[u8]) -> Option<(String, Kind)> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.services())?;
        let (service, what) = rest.split_once('/')?;
        let kind = match what {
            "lock" => Kind::Lock,
            "fence" => Kind::Fence,
            "state" => Kind::State,
            _ if what.starts_with("h/") => Kind::History,
            _ => return None,
        };
        Some((unescape(service)?, kind))
    }
}

fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"_-.".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unescape(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The lease key's value. Its fence is the key's create revision plus
/// `offset`, the fence offset the grant was made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct LockValue {
    /// [`Holder::encode`](upsilon::Holder::encode).
    pub(super) holder: String,
    pub(super) offset: u64,
    /// The grant's time on the granting node's wall clock (ms).
    pub(super) granted_at_ms: i64,
    /// The TTL asked for (ms); the etcd lease's TTL is this in whole seconds,
    /// rounded up.
    pub(super) ttl_ms: u64,
}

/// The fence key's value: the counters a grant and a claim read, kept apart
/// from the state so that deleting that leaves the fence where it was.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct FenceValue {
    /// Added to the lease key's create revision to make a fence; only grows.
    pub(super) offset: u64,
    /// The newest fence the store has seen (claimed).
    pub(super) store_fence: u64,
}

/// The state key's value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StateValue {
    pub(super) data_version: Option<String>,
    pub(super) baseline: Option<String>,
}

/// A history row's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct HistoryValue {
    pub(super) version: String,
    pub(super) task_id: String,
    pub(super) attempt: i64,
    pub(super) kind: String,
    pub(super) state: String,
    pub(super) fence: i64,
    pub(super) holder: String,
    pub(super) description: String,
    /// Wall clock of the node that wrote it (ms since the epoch).
    pub(super) started_ms: i64,
    pub(super) finished_ms: Option<i64>,
    pub(super) duration_ms: Option<i64>,
    pub(super) error: Option<String>,
    /// Absent from rows written before checkpoints existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) checkpoint: Option<upsilon::backend::CheckpointColumns>,
}

/// Decodes the JSON value of `key`; a value that does not parse is corrupt.
pub(super) fn decode<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, BackendError> {
    serde_json::from_slice(value).map_err(|e| {
        BackendError::corrupt(format!(
            "the value of etcd key {:?} does not parse ({e})",
            String::from_utf8_lossy(key)
        ))
    })
}

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("Upsilon's values always serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_reach_into_other_keys() {
        let k = Keys::new("/upsilon");
        assert_eq!(k.lock("billing"), "/upsilon/s/billing/lock");
        assert_eq!(k.lock("a/b"), "/upsilon/s/a%2Fb/lock");
        assert_eq!(
            k.row("svc", "1.0.0-rc.1", "add/col", 2),
            "/upsilon/s/svc/h/1.0.0-rc.1/add%2Fcol/0000000002"
        );
        assert_eq!(
            k.parse(k.lock("a/b").as_bytes()),
            Some(("a/b".to_owned(), Kind::Lock))
        );
        assert_eq!(
            k.parse(k.row("x%y", "1.0", "t", 1).as_bytes()),
            Some(("x%y".to_owned(), Kind::History))
        );
        assert_eq!(k.parse(b"/upsilon/format"), None);
        assert_eq!(k.parse(b"/other/s/a/lock"), None);
    }

    #[test]
    fn values_that_do_not_parse_are_corrupt() {
        let err = decode::<FenceValue>(b"/upsilon/s/a/fence", b"{\"offset\": -1}").unwrap_err();
        assert!(matches!(err, BackendError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("/upsilon/s/a/fence"), "{err}");
        let v = FenceValue {
            offset: 3,
            store_fence: 9,
        };
        assert_eq!(decode::<FenceValue>(b"k", &encode(&v)).unwrap(), v);
    }
}
