//! The names, labels and annotations of Upsilon's objects.

use std::collections::BTreeMap;

/// Label on every object Upsilon writes.
pub(crate) const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "upsilon");
/// Label: the object prefix of the backend that wrote it.
pub(crate) const PREFIX_LABEL: &str = "upsilon.dev/prefix";
/// Label: what the object is (`lease`, `state`, `history`, `meta`).
pub(crate) const PART_LABEL: &str = "upsilon.dev/part";
/// Label: the service's key (see [`service_key`]).
pub(crate) const KEY_LABEL: &str = "upsilon.dev/service-key";
/// Annotation: the service's name, as the runner knows it.
pub(crate) const SERVICE: &str = "upsilon.dev/service";
/// Annotation: the stored format of the object.
pub(crate) const FORMAT_ANNOTATION: &str = "upsilon.dev/format";
/// Lease annotation: the grant counter, the highest fence ever granted.
pub(crate) const COUNTER: &str = "upsilon.dev/fence-counter";
/// Lease annotation: the fence of the current grant (absent when free).
pub(crate) const HOLDER_FENCE: &str = "upsilon.dev/fence";
/// Lease annotation: the TTL of the current grant, in ms.
pub(crate) const TTL_MS: &str = "upsilon.dev/ttl-ms";

/// What an object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    Lease,
    State,
    History,
    Meta,
}

impl Part {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Part::Lease => "lease",
            Part::State => "state",
            Part::History => "history",
            Part::Meta => "meta",
        }
    }
}

/// A service's name as object names and label values can carry it:
/// lowercase, every character outside `a-z0-9-` as `-`, at most 40 of
/// them, then `-` and 8 hex digits of a hash of the exact name, so that
/// `Billing` and `billing`, or `a_b` and `a-b`, stay apart.
pub(crate) fn service_key(service: &str) -> String {
    let mut s: String = service
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .collect();
    s.truncate(40);
    let s = s.trim_matches('-');
    let hash = fnv1a(service.as_bytes()) as u32;
    if s.is_empty() {
        format!("s-{hash:08x}")
    } else {
        format!("{s}-{hash:08x}")
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The names of one backend's objects.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    pub(crate) prefix: String,
}

impl Names {
    /// The Lease of `service`, and its state ConfigMap (two kinds, one name).
    pub(crate) fn object(&self, service: &str) -> String {
        format!("{}-{}", self.prefix, service_key(service))
    }

    /// History page `n` of `service`.
    pub(crate) fn page(&self, service: &str, n: u64) -> String {
        format!("{}-{}-h{n}", self.prefix, service_key(service))
    }

    /// The namespace's meta ConfigMap: the fence floors of its services.
    pub(crate) fn meta(&self) -> String {
        format!("{}-meta", self.prefix)
    }

    /// The labels of an object of `service` (none for the meta object).
    pub(crate) fn labels(&self, part: Part, service: Option<&str>) -> BTreeMap<String, String> {
        let mut l = BTreeMap::from([
            (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
            (PREFIX_LABEL.to_owned(), self.prefix.clone()),
            (PART_LABEL.to_owned(), part.as_str().to_owned()),
        ]);
        if let Some(s) = service {
            l.insert(KEY_LABEL.to_owned(), service_key(s));
        }
        l
    }

    /// The label selector of every object of this prefix that is `part`.
    pub(crate) fn selector(&self, part: Part) -> String {
        format!(
            "{PREFIX_LABEL}={},{PART_LABEL}={}",
            self.prefix,
            part.as_str()
        )
    }

    /// The label selector of the history pages of `service`.
    pub(crate) fn pages_selector(&self, service: &str) -> String {
        format!(
            "{},{KEY_LABEL}={}",
            self.selector(Part::History),
            service_key(service)
        )
    }

    /// The meta object's key for the fence floor of `service`.
    pub(crate) fn floor_key(service: &str) -> String {
        format!("fence.{}", service_key(service))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_names_and_keep_services_apart() {
        let keys: Vec<String> = [
            "billing",
            "Billing",
            "a_b",
            "a-b",
            "_",
            "x.y",
            &"z".repeat(63),
        ]
        .iter()
        .map(|s| service_key(s))
        .collect();
        for k in &keys {
            assert!(super::super::options::is_dns_label(k), "{k}");
            assert!(k.len() <= 49, "{k}");
        }
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len(), "{keys:?}");
        assert!(keys[0].starts_with("billing-"));
    }
}
