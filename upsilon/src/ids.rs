//! Identities every part of Upsilon shares: a task's key, a lease holder,
//! and the boxed error tasks return. A leaf: it depends on no other module.

use std::fmt;

use semver::Version;

/// The error a task returns: anything that converts into a boxed error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The identity of a task in a store: its version and its id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskKey {
    /// The version the task belongs to.
    pub version: Version,
    /// The task's id (the fn name unless `id = "..."` was given).
    pub id: String,
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.id, self.version)
    }
}

/// Who holds (or asks for) a lease: host, pod name when set, pid, a per-run id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Holder {
    /// Host name.
    pub host: String,
    /// Kubernetes pod name (`POD_NAME`), when set.
    pub pod: Option<String>,
    /// Process id.
    pub pid: u32,
    /// Random id of this run, distinct for every process start.
    pub run_id: String,
}

impl Holder {
    /// This process: host from `HOSTNAME` or the kernel, pod from `POD_NAME`,
    /// and a fresh run id.
    pub fn current() -> Holder {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown-host".to_owned());
        let pod = std::env::var("POD_NAME").ok().filter(|p| !p.is_empty());
        Holder {
            host,
            pod,
            pid: std::process::id(),
            run_id: format!("{:016x}", crate::util::random_u64()),
        }
    }

    /// One-line form kept by backends; [`Holder::decode`] reads it back.
    pub fn encode(&self) -> String {
        format!(
            "{};{};{};{}",
            escape(&self.host),
            self.pod.as_deref().map(escape).unwrap_or_default(),
            self.pid,
            escape(&self.run_id)
        )
    }

    /// Reads what [`Holder::encode`] wrote.
    pub fn decode(text: &str) -> Result<Holder, InvalidHolder> {
        let invalid = || InvalidHolder {
            text: text.to_owned(),
        };
        let parts: Vec<&str> = text.split(';').collect();
        let [host, pod, pid, run_id] = parts[..] else {
            return Err(invalid());
        };
        Ok(Holder {
            host: unescape(host).ok_or_else(invalid)?,
            pod: if pod.is_empty() {
                None
            } else {
                Some(unescape(pod).ok_or_else(invalid)?)
            },
            pid: pid.parse().map_err(|_| invalid())?,
            run_id: unescape(run_id).ok_or_else(invalid)?,
        })
    }
}

/// A stored holder that is not in the form [`Holder::encode`] writes.
/// Converts into a corrupt-store error for backends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lease holder {text:?} is not in the `host;pod;pid;run` form")]
pub struct InvalidHolder {
    text: String,
}

fn escape(s: &str) -> String {
    s.replace('%', "%25").replace(';', "%3B")
}

fn unescape(s: &str) -> Option<String> {
    let out = s.replace("%3B", ";").replace("%25", "%");
    (!s.contains(';')).then_some(out)
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pod {
            Some(pod) => write!(f, "pod {pod} on {}", self.host)?,
            None => write!(f, "{}", self.host)?,
        }
        write!(f, " (pid {}, run {})", self.pid, self.run_id)
    }
}
