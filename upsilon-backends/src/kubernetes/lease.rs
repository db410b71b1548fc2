//! The Lease object: [`View`], a Lease read, with its holder, fence,
//! counter and TTL; what the Lease watch keeps of it; and the Lease as
//! written by a grant, a renewal and a release.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease as K8sLease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::chrono::Utc;
use kube::api::ObjectMeta;
use upsilon::backend::{ttl_ms, BackendError};
use upsilon::Holder;

use super::names::{Names, Part, COUNTER, HOLDER_FENCE, TTL_MS};
use super::state::{annotations, check_format, service_of};
use super::watch::{rv_number, Entry};

/// A Lease, read.
#[derive(Debug, Clone)]
pub(super) struct View {
    pub(super) object: Option<K8sLease>,
    pub(super) rv: String,
    /// The holder and the fence of its grant, while held.
    pub(super) held: Option<(Holder, u64)>,
    pub(super) counter: u64,
    pub(super) ttl: Duration,
    pub(super) granted_at_ms: Option<i64>,
}

fn annotation<'a>(o: &'a K8sLease, key: &str) -> Option<&'a str> {
    o.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn micro_ms(t: &MicroTime) -> i64 {
    t.0.timestamp_millis()
}

fn now_micro() -> MicroTime {
    MicroTime(Utc::now())
}

impl View {
    pub(super) fn read(object: Option<K8sLease>, name: &str) -> Result<View, BackendError> {
        let Some(o) = object else {
            return Ok(View {
                object: None,
                rv: String::new(),
                held: None,
                counter: 0,
                ttl: Duration::ZERO,
                granted_at_ms: None,
            });
        };
        let what = format!("the Lease {name}");
        check_format(&o.metadata, &what)?;
        let number = |key: &str| -> Result<Option<u64>, BackendError> {
            annotation(&o, key)
                .map(|t| {
                    t.parse::<u64>().map_err(|_| {
                        BackendError::corrupt(format!(
                            "{what}: annotation {key} is {t:?}, not a whole number"
                        ))
                    })
                })
                .transpose()
        };
        let counter = number(COUNTER)?.unwrap_or(0);
        let fence = number(HOLDER_FENCE)?;
        let spec = o.spec.clone().unwrap_or_default();
        let ttl = match number(TTL_MS)? {
            Some(ms) => Duration::from_millis(ms),
            None => Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64),
        };
        let holder = spec
            .holder_identity
            .as_deref()
            .filter(|h| !h.is_empty())
            .map(Holder::decode)
            .transpose()?;
        Ok(View {
            rv: o.metadata.resource_version.clone().unwrap_or_default(),
            held: holder.zip(fence),
            counter,
            ttl,
            granted_at_ms: spec.acquire_time.as_ref().map(micro_ms),
            object: Some(o),
        })
    }
}

/// What the Lease watch keeps of a Lease: its holder and fence.
pub(crate) fn project(o: &K8sLease) -> Option<(String, Entry)> {
    let service = service_of(&o.metadata)?;
    let version = o.metadata.resource_version.clone().unwrap_or_default();
    Some((
        service,
        Entry {
            rv: rv_number(Some(&version)),
            version,
            a: o.spec
                .as_ref()
                .and_then(|s| s.holder_identity.clone())
                .filter(|h| !h.is_empty()),
            b: annotation(o, HOLDER_FENCE).map(str::to_owned),
        },
    ))
}

/// The Lease after a grant of `fence` to `holder`: written over `base` (the
/// one read) or new.
pub(super) fn granted(
    names: &Names,
    service: &str,
    base: Option<K8sLease>,
    holder: &Holder,
    fence: u64,
    ttl: Duration,
) -> Result<K8sLease, BackendError> {
    let mut o = base.unwrap_or_else(|| K8sLease {
        metadata: ObjectMeta {
            name: Some(names.object(service)),
            labels: Some(names.labels(Part::Lease, Some(service))),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    let transitions = o
        .spec
        .as_ref()
        .and_then(|s| s.lease_transitions)
        .unwrap_or(0)
        .saturating_add(1);
    let now = now_micro();
    let spec = o.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = Some(holder.encode());
    spec.lease_duration_seconds = Some(duration_seconds(ttl));
    spec.acquire_time = Some(now.clone());
    spec.renew_time = Some(now);
    spec.lease_transitions = Some(transitions);
    let a = o.metadata.annotations.get_or_insert_with(BTreeMap::new);
    a.extend(annotations(Some(service)));
    a.insert(COUNTER.to_owned(), fence.to_string());
    a.insert(HOLDER_FENCE.to_owned(), fence.to_string());
    a.insert(TTL_MS.to_owned(), ttl_ms(ttl)?.to_string());
    Ok(o)
}

/// `leaseDurationSeconds`: the TTL in whole seconds, rounded up, at least 1.
fn duration_seconds(ttl: Duration) -> i32 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i32::try_from(secs.max(1)).unwrap_or(i32::MAX)
}

/// The Lease after a renewal: the same grant, a new `renewTime`.
pub(super) fn renewed(mut o: K8sLease, ttl: Duration) -> Result<K8sLease, BackendError> {
    let spec = o.spec.get_or_insert_with(LeaseSpec::default);
    spec.renew_time = Some(now_micro());
    spec.lease_duration_seconds = Some(duration_seconds(ttl));
    o.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(TTL_MS.to_owned(), ttl_ms(ttl)?.to_string());
    Ok(o)
}

/// The Lease freed: no holder, no grant's fence; the counter stays.
pub(super) fn freed(mut o: K8sLease) -> K8sLease {
    let spec = o.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = None;
    spec.renew_time = Some(now_micro());
    spec.lease_duration_seconds = Some(1);
    if let Some(a) = o.metadata.annotations.as_mut() {
        a.remove(HOLDER_FENCE);
        a.remove(TTL_MS);
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_durations_round_up_to_whole_seconds() {
        assert_eq!(duration_seconds(Duration::from_millis(300)), 1);
        assert_eq!(duration_seconds(Duration::from_secs(15)), 15);
        assert_eq!(duration_seconds(Duration::from_millis(15_001)), 16);
    }

    #[test]
    fn a_lease_reads_back_as_written_and_freed_keeps_its_counter() {
        let names = Names {
            prefix: "upsilon".into(),
        };
        let holder = upsilon::testing::holder(3);
        let o = granted(&names, "svc", None, &holder, 7, Duration::from_millis(1500)).unwrap();
        let v = View::read(Some(o.clone()), "x").unwrap();
        assert_eq!(v.held, Some((holder, 7)));
        assert_eq!((v.counter, v.ttl), (7, Duration::from_millis(1500)));
        let f = View::read(Some(freed(o)), "x").unwrap();
        assert_eq!((f.held, f.counter), (None, 7));
    }
}
