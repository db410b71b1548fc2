//! The few requests the backend makes, each under the operation timeout,
//! with the API server's answers sorted into what the backend acts on.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use kube::api::{Api, ListParams, PostParams};
use kube::core::ErrorResponse;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::Serialize;
use upsilon::backend::BackendError;

/// The answer to a write made under a `resourceVersion` precondition (or a
/// create).
#[derive(Debug)]
pub(crate) enum Written<K> {
    /// The object as stored, with its new `resourceVersion`.
    Stored(K),
    /// 409: the object changed since it was read (`Conflict`), or it exists
    /// already (`AlreadyExists`), or it is gone (an update of a deleted
    /// object, 404): read it again and decide again.
    Raced,
}

/// The requests of one kind of object in one namespace.
#[derive(Clone)]
pub(crate) struct Objects<K> {
    pub(crate) api: Api<K>,
    pub(crate) what: &'static str,
    pub(crate) namespace: String,
    pub(crate) timeout: Duration,
}

impl<K> Objects<K>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    async fn timed<T>(
        &self,
        doing: &str,
        f: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, kube::Error> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(kube::Error::Service(
                format!("{doing} timed out after {:?}", self.timeout).into(),
            )),
        }
    }

    /// The object, or `None` (404).
    pub(crate) async fn get(&self, name: &str) -> Result<Option<K>, BackendError> {
        let doing = format!("reading {} {name}", self.what);
        match self.timed(&doing, self.api.get(name)).await {
            Ok(o) => Ok(Some(o)),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
            Err(e) => Err(self.error(&doing, e)),
        }
    }

    /// Every object the label selector matches.
    pub(crate) async fn list(&self, selector: &str) -> Result<Vec<K>, BackendError> {
        let doing = format!("listing {}s ({selector})", self.what);
        let lp = ListParams::default().labels(selector);
        match self.timed(&doing, self.api.list(&lp)).await {
            Ok(list) => Ok(list.items),
            Err(e) => Err(self.error(&doing, e)),
        }
    }

    /// Replaces the object, whose `metadata.resourceVersion` is the
    /// precondition.
    pub(crate) async fn replace(&self, name: &str, obj: &K) -> Result<Written<K>, BackendError> {
        let doing = format!("updating {} {name}", self.what);
        let pp = PostParams::default();
        self.written(
            &doing,
            self.timed(&doing, self.api.replace(name, &pp, obj)).await,
        )
    }

    /// Creates the object; [`Written::Raced`] if it exists.
    pub(crate) async fn create(&self, obj: &K) -> Result<Written<K>, BackendError> {
        let doing = format!(
            "creating {} {}",
            self.what,
            obj.meta().name.as_deref().unwrap_or_default()
        );
        let pp = PostParams::default();
        self.written(&doing, self.timed(&doing, self.api.create(&pp, obj)).await)
    }

    /// Creates the object if it has no `resourceVersion`, else replaces it.
    pub(crate) async fn put(&self, obj: &K) -> Result<Written<K>, BackendError> {
        match obj.meta().resource_version {
            Some(_) => {
                let name = obj.meta().name.clone().unwrap_or_default();
                self.replace(&name, obj).await
            }
            None => self.create(obj).await,
        }
    }

    fn written(&self, doing: &str, r: Result<K, kube::Error>) -> Result<Written<K>, BackendError> {
        match r {
            Ok(o) => Ok(Written::Stored(o)),
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(Written::Raced),
            Err(e) => Err(self.error(doing, e)),
        }
    }

    pub(crate) fn error(&self, doing: &str, e: kube::Error) -> BackendError {
        error(doing, &self.namespace, e)
    }
}

/// A client error as a backend error: the API server's transient answers
/// (429, 5xx) and transport failures are worth retrying; 401 and 403 say
/// what to check; 422 (the object is invalid, or too large) is a refusal.
pub(crate) fn error(doing: &str, namespace: &str, e: kube::Error) -> BackendError {
    match e {
        kube::Error::Api(ErrorResponse {
            code,
            message,
            reason,
            ..
        }) => {
            let says = format!("{doing}: the API server answered {code} {reason}: {message}");
            match code {
                429 | 500 | 502 | 503 | 504 => BackendError::unavailable(says),
                401 => BackendError::other(format!(
                    "{says} (the client's credentials were not accepted)"
                )),
                403 => BackendError::other(format!(
                    "{says} (the service account needs get, list, watch, create and update on \
                     leases.coordination.k8s.io and configmaps in namespace {namespace}: see the Role in docs/KUBERNETES.md)"
                )),
                422 => BackendError::Rejected(says),
                _ => BackendError::other(says),
            }
        }
        kube::Error::SerdeError(e) => {
            BackendError::corrupt(format!("{doing}: the answer does not parse: {e}"))
        }
        e @ (kube::Error::HyperError(_)
        | kube::Error::Service(_)
        | kube::Error::ReadEvents(_)
        | kube::Error::HttpError(_)) => {
            BackendError::unavailable(format!("{doing}: {}", chain(&e)))
        }
        e => BackendError::other(format!("{doing}: {}", chain(&e))),
    }
}

/// An error and its sources, on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        next = cause.source();
    }
    s
}
