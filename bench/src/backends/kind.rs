//! The backends scenario 6 can measure, their names in `--backends` and
//! in the table, and what each one's rows compare it with.

/// A backend scenario 6 can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Postgres,
    Sqlite,
    #[cfg(feature = "redis")]
    Redis,
    #[cfg(feature = "etcd")]
    Etcd,
    #[cfg(feature = "kubernetes")]
    Kubernetes,
}

impl Kind {
    /// Every backend compiled in, in the table's order.
    pub const ALL: &'static [Kind] = &[
        Kind::Postgres,
        Kind::Sqlite,
        #[cfg(feature = "redis")]
        Kind::Redis,
        #[cfg(feature = "etcd")]
        Kind::Etcd,
        #[cfg(feature = "kubernetes")]
        Kind::Kubernetes,
    ];

    /// Its name in `--backends`.
    pub fn flag(self) -> &'static str {
        match self {
            Kind::Postgres => "postgres",
            Kind::Sqlite => "sqlite",
            #[cfg(feature = "redis")]
            Kind::Redis => "redis",
            #[cfg(feature = "etcd")]
            Kind::Etcd => "etcd",
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => "kubernetes",
        }
    }

    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Postgres => "PostgreSQL",
            Kind::Sqlite => "SQLite",
            #[cfg(feature = "redis")]
            Kind::Redis => "Redis",
            #[cfg(feature = "etcd")]
            Kind::Etcd => "etcd",
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => "Kubernetes (stand-in)",
        }
    }

    /// Whether a killed holder's lease is taken over before its TTL runs
    /// out, because the server sees the holder's session end.
    pub(super) fn session_tie(self) -> bool {
        matches!(self, Kind::Postgres)
    }

    /// What the server's own count in 6d counts, and a note on it.
    pub(super) fn count_name(self) -> (&'static str, &'static str) {
        match self {
            #[cfg(feature = "etcd")]
            Kind::Etcd => ("gRPC messages received by the server", ""),
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => ("API requests the stand-in served", ""),
            _ => ("server commands", " (scripts' own included)"),
        }
    }

    /// The lease TTL 6c gives it: `--ttl-ms`, or the backend's shortest.
    pub(super) fn ttl_ms(self, asked: u64) -> u64 {
        match self {
            #[cfg(feature = "etcd")]
            Kind::Etcd => {
                let min = upsilon_backends::etcd::MIN_TTL.as_millis() as u64;
                // etcd grants whole seconds.
                asked.max(min).div_ceil(1000) * 1000
            }
            _ => asked,
        }
    }

    /// What the bare client does in 6a.
    pub(super) fn bare_name(self) -> &'static str {
        match self {
            Kind::Postgres => "tokio-postgres connect + SELECT 1",
            Kind::Sqlite => "rusqlite open + SELECT 1",
            #[cfg(feature = "redis")]
            Kind::Redis => "redis crate connect + GET",
            #[cfg(feature = "etcd")]
            Kind::Etcd => "etcd-client connect + get",
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => "a new reqwest client + one GET of a ConfigMap",
        }
    }

    /// What 6b's floor is, for `n` receivers; `None`: the backend has no
    /// notifications (its nodes poll).
    pub(super) fn floor_name(self, n: usize) -> Option<String> {
        match self {
            Kind::Postgres => Some(format!(
                "the floor: one NOTIFY to {n} LISTENing connections"
            )),
            Kind::Sqlite => None,
            #[cfg(feature = "redis")]
            Kind::Redis => Some(format!(
                "the floor: one PUBLISH to {n} subscribed connections"
            )),
            #[cfg(feature = "etcd")]
            Kind::Etcd => Some(format!("the floor: one put to {n} watchers")),
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => Some(format!("the floor: one ConfigMap update to {n} watchers")),
        }
    }
}

/// Parses one name of `--backends`.
pub fn kind(s: &str) -> Result<Kind, String> {
    let s = s.trim();
    Kind::ALL
        .iter()
        .copied()
        .find(|k| k.flag() == s)
        .ok_or_else(|| {
            let names: Vec<&str> = Kind::ALL.iter().map(|k| k.flag()).collect();
            format!(
                "no backend {s:?} in this build; it has {}",
                names.join(", ")
            )
        })
}
