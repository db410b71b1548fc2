//! A stand-in for the Kubernetes API server, in process,
//! on a loopback port: only the endpoints Upsilon's Kubernetes backend uses,
//! ConfigMaps (`/api/v1`) and Leases (`/apis/coordination.k8s.io/v1`) in
//! namespaces, with the semantics the backend relies on:
//!
//! - every write takes the next value of one cluster-wide counter as the
//!   object's `resourceVersion` (an etcd revision); an update whose
//!   `metadata.resourceVersion` is not the stored one is refused with 409
//!   `Conflict`, a create of an existing name with 409 `AlreadyExists`, an
//!   update or read of a missing object with 404 `NotFound`, each with the
//!   `Status` body the API server sends; an update without a
//!   `resourceVersion` is unconditional, and one that changes nothing is a
//!   no-op that keeps the `resourceVersion`;
//! - invalid objects are refused with 422 `Invalid`: names that are not DNS
//!   subdomains, ConfigMap keys outside `[-._a-zA-Z0-9]`, ConfigMap data over
//!   1 MiB, label keys and values the API refuses, annotations over 256 KiB,
//!   a Lease's `leaseDurationSeconds` below 1;
//! - lists carry the list's `resourceVersion` and honour equality label
//!   selectors (`a=b`, `a==b`, `a!=b`, `a`, `!a`);
//! - `?watch=true` streams `ADDED`, `MODIFIED` and `DELETED` events from a
//!   `resourceVersion` (replayed from the event log, or 410 `Expired` as an
//!   `ERROR` event once the log no longer reaches back that far; from
//!   nothing or `0`, the current objects first as `ADDED`),
//!   `BOOKMARK` events with `allowWatchBookmarks`, and ends at
//!   `timeoutSeconds`;
//! - a bearer token is required (401 without it), and [`KubeApi::allow`]
//!   turns on RBAC: only the listed verbs on the listed resources, 403
//!   `Forbidden` otherwise.
//!
//! [`Faults`] injects what a real control plane does now and then: slow
//! answers, 500s (before the request is served, or after a write committed,
//! so the reply is lost), watches dropped or refused, and a conflict storm
//! (another writer changes the object just before each update, so its
//! precondition fails for real). [`KubeApi::restart`] drops every
//! connection and serves again on the same port, keeping the objects.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// The bearer token the stand-in accepts.
pub const TOKEN: &str = "upsilon-stand-in-token";
/// The most events the log keeps for watches to resume from.
const LOG_EVENTS: usize = 20_000;
const CONFIGMAP_MAX: usize = 1 << 20;
const ANNOTATIONS_MAX: usize = 256 * 1024;

/// The two resources it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    /// `configmaps`, core `v1`.
    ConfigMaps,
    /// `leases`, `coordination.k8s.io/v1`.
    Leases,
}

impl Resource {
    fn plural(self) -> &'static str {
        match self {
            Resource::ConfigMaps => "configmaps",
            Resource::Leases => "leases",
        }
    }
    fn kind(self) -> &'static str {
        match self {
            Resource::ConfigMaps => "ConfigMap",
            Resource::Leases => "Lease",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Resource::ConfigMaps => "v1",
            Resource::Leases => "coordination.k8s.io/v1",
        }
    }
    fn group(self) -> &'static str {
        match self {
            Resource::ConfigMaps => "",
            Resource::Leases => "coordination.k8s.io",
        }
    }
    /// `configmaps` or `leases.coordination.k8s.io`, as messages name it.
    fn qualified(self) -> String {
        match self.group() {
            "" => self.plural().to_owned(),
            g => format!("{}.{g}", self.plural()),
        }
    }
}

/// Faults the stand-in injects; every switch may change while it serves.
#[derive(Debug, Default)]
pub struct Faults {
    /// Every request waits this long (ms) before it is served.
    pub delay_ms: AtomicU64,
    /// The next this many requests (watches aside) answer 500 without
    /// being served.
    pub fail_next: AtomicU32,
    /// Per mille of requests (watches aside) that answer 500 without being
    /// served.
    pub fail_per_mille: AtomicU32,
    /// Per mille of writes that are served, and committed, and then answer
    /// 500: the client does not learn that its write took effect.
    pub lose_reply_per_mille: AtomicU32,
    /// While set, watch requests answer 503 (a watch cache that is not
    /// ready, an overloaded server).
    pub refuse_watches: AtomicBool,
    /// Per mille of updates before which another writer changes the object
    /// (an annotation `stand-in/stray`), so that the update's precondition
    /// fails with a real 409.
    pub conflict_per_mille: AtomicU32,
    /// How often open watches that asked for them get a `BOOKMARK` (ms);
    /// 0: never.
    pub bookmark_every_ms: AtomicU64,
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    resource: Resource,
    namespace: String,
    kind: &'static str,
    object: Value,
    /// The object before a modification, to tell a label selector's
    /// watcher that it left or entered the selection.
    before: Option<Value>,
}

#[derive(Debug, Default)]
struct Objects {
    rv: u64,
    uid: u64,
    objects: BTreeMap<(Resource, String, String), Value>,
    log: VecDeque<Event>,
    /// Watches from a `resourceVersion` below this are too old (410).
    oldest: u64,
    /// When each object was last written (created, changed or deleted).
    written: BTreeMap<(Resource, String, String), std::time::Instant>,
}

#[derive(Debug)]
struct Shared {
    objects: Mutex<Objects>,
    events: broadcast::Sender<Event>,
    faults: Faults,
    /// Bumped to end every open watch.
    watch_generation: AtomicU64,
    closer: tokio::sync::Notify,
    requests: Mutex<BTreeMap<String, u64>>,
    rbac: Mutex<Option<BTreeSet<(String, String)>>>,
    random: AtomicU64,
}

/// The stand-in, serving until it is dropped.
#[derive(Debug)]
pub struct KubeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }
}

impl KubeApi {
    /// Starts it on a free loopback port, on the current tokio runtime.
    pub async fn start() -> KubeApi {
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            objects: Mutex::new(Objects {
                rv: 1000,
                ..Objects::default()
            }),
            events,
            faults: Faults {
                bookmark_every_ms: AtomicU64::new(1000),
                ..Faults::default()
            },
            watch_generation: AtomicU64::new(0),
            closer: tokio::sync::Notify::new(),
            requests: Mutex::new(BTreeMap::new()),
            rbac: Mutex::new(None),
            random: AtomicU64::new(crate::random() | 1),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port for the Kubernetes stand-in");
        let addr = listener.local_addr().expect("the stand-in's address");
        let mut api = KubeApi {
            shared,
            addr,
            server: None,
        };
        api.serve(listener);
        api
    }

    /// Serves every connection on a task of a set that the server's own
    /// task owns, so that aborting it drops every connection at once.
    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = router(self.shared.clone());
        self.server = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        }));
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A kubeconfig that points at it, with `namespace` as the context's.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\n\
             users:\n- name: stand-in\n  user:\n    token: {TOKEN}\n\
             contexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: stand-in\n    namespace: {namespace}\n\
             current-context: stand-in\n",
            self.url()
        )
    }

    /// Writes [`KubeApi::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: &std::path::Path, namespace: &str) {
        std::fs::write(path, self.kubeconfig(namespace)).expect("writing a kubeconfig");
    }

    /// The faults it injects.
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// Turns off every fault.
    pub fn heal(&self) {
        let f = &self.shared.faults;
        f.delay_ms.store(0, Ordering::SeqCst);
        f.fail_next.store(0, Ordering::SeqCst);
        f.fail_per_mille.store(0, Ordering::SeqCst);
        f.lose_reply_per_mille.store(0, Ordering::SeqCst);
        f.refuse_watches.store(false, Ordering::SeqCst);
        f.conflict_per_mille.store(0, Ordering::SeqCst);
    }

    /// Ends every open watch now (the client sees its stream end).
    pub fn drop_watches(&self) {
        self.shared.watch_generation.fetch_add(1, Ordering::SeqCst);
        self.shared.closer.notify_waiters();
    }

    /// Drops every connection and serves again on the same port, with the
    /// same objects (an API server restart behind a stable address).
    pub async fn restart(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
            let _ = s.await;
        }
        self.drop_watches();
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        self.serve(listener);
    }

    /// From now on only `verb`s on `resource`s in `rules` are allowed, as a
    /// Role grants them (`("configmaps", "get")`, ...); others get 403.
    pub fn allow(&self, rules: &[(&str, &str)]) {
        *self.shared.rbac.lock().unwrap() = Some(
            rules
                .iter()
                .map(|(r, v)| ((*r).to_owned(), (*v).to_owned()))
                .collect(),
        );
    }

    /// Requests served so far, by `VERB resource` (`get leases`,
    /// `update configmaps`, `watch configmaps`, ...).
    pub fn requests(&self) -> BTreeMap<String, u64> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The objects of `resource` in `namespace`, as stored.
    pub fn objects(&self, resource: Resource, namespace: &str) -> Vec<Value> {
        let o = self.shared.objects.lock().unwrap();
        o.objects
            .iter()
            .filter(|((r, ns, _), _)| *r == resource && ns == namespace)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// When the object was last written (created, changed or deleted), as
    /// the server committed it.
    pub fn written_at(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
    ) -> Option<std::time::Instant> {
        let o = self.shared.objects.lock().unwrap();
        o.written.get(&key(resource, namespace, name)).copied()
    }

    /// The cluster's newest `resourceVersion`.
    pub fn resource_version(&self) -> u64 {
        self.shared.objects.lock().unwrap().rv
    }

    /// Forgets the event log up to now, as etcd's compaction does: watches
    /// from an older `resourceVersion` get 410 Expired.
    pub fn compact(&self) {
        let mut o = self.shared.objects.lock().unwrap();
        o.log.clear();
        o.oldest = o.rv;
    }
}

fn router(shared: Arc<Shared>) -> Router {
    let core = "/api/v1/namespaces/{ns}/configmaps";
    let coord = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases";
    Router::new()
        .route(core, get(list_cm).post(create_cm))
        .route(
            &format!("{core}/{{name}}"),
            get(get_cm).put(replace_cm).delete(delete_cm),
        )
        .route(coord, get(list_lease).post(create_lease))
        .route(
            &format!("{coord}/{{name}}"),
            get(get_lease).put(replace_lease).delete(delete_lease),
        )
        .fallback(|| async {
            status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
                None,
            )
        })
        .layer(middleware::from_fn_with_state(shared.clone(), gate))
        .with_state(shared)
}

/// A `Status` response.
fn status(code: StatusCode, reason: &str, message: &str, details: Option<Value>) -> Response {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    if let Some(d) = details {
        body["details"] = d;
    }
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn details(resource: Resource, name: &str) -> Value {
    json!({"name": name, "group": resource.group(), "kind": resource.plural()})
}

fn object_response(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// What a request is, for counting, RBAC and faults.
fn verb_of(method: &Method, path: &str, query: &str) -> Option<(String, &'static str)> {
    let resource = if path.contains("/configmaps") {
        "configmaps"
    } else if path.contains("/leases") {
        "leases"
    } else {
        return None;
    };
    let named = !path.ends_with(resource);
    let verb = match (method.as_str(), named) {
        ("GET", true) => "get",
        ("GET", false)
            if query
                .split('&')
                .any(|q| q == "watch=true" || q == "watch=1") =>
        {
            "watch"
        }
        ("GET", false) => "list",
        ("POST", false) => "create",
        ("PUT", true) => "update",
        ("PATCH", true) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return None,
    };
    Some((resource.to_owned(), verb))
}

impl Shared {
    fn roll(&self, per_mille: u32) -> bool {
        if per_mille == 0 {
            return false;
        }
        // xorshift: cheap, and good enough to pick faults.
        let mut x = self.random.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.random.store(x, Ordering::Relaxed);
        (x % 1000) < u64::from(per_mille)
    }
}

/// Authentication, RBAC, counting and the request faults, before any
/// handler.
async fn gate(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let authorised = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h == format!("Bearer {TOKEN}"));
    if !authorised {
        return status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
            None,
        );
    }
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let verb = verb_of(request.method(), &path, &query);
    if let Some((resource, verb)) = &verb {
        *shared
            .requests
            .lock()
            .unwrap()
            .entry(format!("{verb} {resource}"))
            .or_default() += 1;
        let allowed = shared
            .rbac
            .lock()
            .unwrap()
            .as_ref()
            .is_none_or(|rules| rules.contains(&(resource.clone(), (*verb).to_owned())));
        if !allowed {
            let ns = path
                .split('/')
                .skip_while(|s| *s != "namespaces")
                .nth(1)
                .unwrap_or("");
            let group = if resource == "leases" {
                "coordination.k8s.io"
            } else {
                ""
            };
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!(
                    "{resource} is forbidden: User \"system:serviceaccount:{ns}:default\" cannot {verb} resource \"{resource}\" in API group \"{group}\" in the namespace \"{ns}\""
                ),
                Some(json!({"kind": resource, "group": group})),
            );
        }
    }
    let f = &shared.faults;
    let delay = f.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let watching = verb.as_ref().is_some_and(|(_, v)| *v == "watch");
    if watching && f.refuse_watches.load(Ordering::SeqCst) {
        return status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the watch cache is not ready",
            None,
        );
    }
    if !watching {
        let next_fails = f
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if next_fails || shared.roll(f.fail_per_mille.load(Ordering::SeqCst)) {
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "Internal error occurred: injected by the stand-in",
                None,
            );
        }
    }
    let writes = verb
        .as_ref()
        .is_some_and(|(_, v)| matches!(*v, "create" | "update" | "delete"));
    let response = next.run(request).await;
    if writes
        && response.status().is_success()
        && shared.roll(f.lose_reply_per_mille.load(Ordering::SeqCst))
    {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "Internal error occurred: the write committed and the stand-in lost its reply",
            None,
        );
    }
    response
}

// ---------------------------------------------------------------------------
// Validation, as the API server's.

fn is_subdomain(s: &str) -> bool {
    s.len() <= 253
        && !s.is_empty()
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
            !b.is_empty()
                && b.first().is_some_and(edge)
                && b.last().is_some_and(edge)
                && b.iter().all(|c| edge(c) || *c == b'-')
        })
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    let edge = |c: &u8| c.is_ascii_alphanumeric();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(edge)
        && b.last().is_some_and(edge)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_qualified_key(s: &str) -> bool {
    match s.rsplit_once('/') {
        Some((prefix, name)) => is_subdomain(prefix) && is_label_name(name),
        None => is_label_name(s),
    }
}

/// The API server's checks of an object; each cause is (field, message).
fn validate(resource: Resource, v: &Value) -> Vec<(String, String)> {
    let mut causes = Vec::new();
    let meta = &v["metadata"];
    let name = meta["name"].as_str().unwrap_or_default();
    if !is_subdomain(name) {
        causes.push((
            "metadata.name".to_owned(),
            format!("Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"),
        ));
    }
    if let Some(labels) = meta["labels"].as_object() {
        for (k, val) in labels {
            let val = val.as_str().unwrap_or_default();
            if !is_qualified_key(k) {
                causes.push(("metadata.labels".to_owned(), format!("Invalid value: {k:?}: name part must consist of alphanumeric characters, '-', '_' or '.'")));
            }
            if !(val.is_empty() || is_label_name(val)) {
                causes.push(("metadata.labels".to_owned(), format!("Invalid value: {val:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character")));
            }
        }
    }
    if let Some(annotations) = meta["annotations"].as_object() {
        let mut size = 0;
        for (k, val) in annotations {
            size += k.len() + val.as_str().map_or(0, str::len);
            if !is_qualified_key(k) {
                causes.push(("metadata.annotations".to_owned(), format!("Invalid value: {k:?}: name part must consist of alphanumeric characters, '-', '_' or '.'")));
            }
        }
        if size > ANNOTATIONS_MAX {
            causes.push((
                "metadata.annotations".to_owned(),
                format!("Too long: must have at most {ANNOTATIONS_MAX} bytes"),
            ));
        }
    }
    match resource {
        Resource::ConfigMaps => {
            let mut size = 0;
            for field in ["data", "binaryData"] {
                if let Some(data) = v[field].as_object() {
                    for (k, val) in data {
                        size += k.len() + val.as_str().map_or(0, str::len);
                        let ok = !k.is_empty()
                            && k.len() <= 253
                            && k.bytes().all(|c| {
                                c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')
                            });
                        if !ok {
                            causes.push((format!("{field}[{k}]"), format!("Invalid value: {k:?}: a valid config key must consist of alphanumeric characters, '-', '_' or '.'")));
                        }
                    }
                }
            }
            if size > CONFIGMAP_MAX {
                causes.push((
                    "[]".to_owned(),
                    format!("Too long: must have at most {CONFIGMAP_MAX} bytes"),
                ));
            }
        }
        Resource::Leases => {
            if let Some(d) = v["spec"]["leaseDurationSeconds"].as_i64() {
                if d <= 0 {
                    causes.push((
                        "spec.leaseDurationSeconds".to_owned(),
                        format!("Invalid value: {d}: must be greater than 0"),
                    ));
                }
            }
            if let Some(t) = v["spec"]["leaseTransitions"].as_i64() {
                if t < 0 {
                    causes.push((
                        "spec.leaseTransitions".to_owned(),
                        format!("Invalid value: {t}: must be greater than or equal to 0"),
                    ));
                }
            }
        }
    }
    causes
}

fn invalid(resource: Resource, name: &str, causes: Vec<(String, String)>) -> Response {
    let message = format!(
        "{} {name:?} is invalid: {}",
        resource.kind(),
        causes
            .iter()
            .map(|(f, m)| format!("{f}: {m}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    status(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        &message,
        Some(json!({
            "name": name,
            "group": resource.group(),
            "kind": resource.kind(),
            "causes": causes.iter().map(|(f, m)| json!({"reason": "FieldValueInvalid", "message": m, "field": f})).collect::<Vec<_>>(),
        })),
    )
}

/// The body as an object of `resource`, or the 400 the API server gives.
fn parse_body(resource: Resource, body: &[u8]) -> Result<Value, Box<Response>> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        Box::new(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("the body of the request was in an unknown format: {e}"),
            None,
        ))
    })?;
    if !v.is_object() {
        return Err(Box::new(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body of the request is not an object",
            None,
        )));
    }
    let kind = v["kind"].as_str().unwrap_or(resource.kind());
    let api_version = v["apiVersion"].as_str().unwrap_or(resource.api_version());
    if kind != resource.kind() || api_version != resource.api_version() {
        return Err(Box::new(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!(
                "the API version in the data ({api_version}) does not match the expected API version ({}), or the kind ({kind}) is not {}",
                resource.api_version(),
                resource.kind()
            ),
            None,
        )));
    }
    Ok(v)
}

fn now_rfc3339() -> String {
    // Seconds since the epoch as a UTC timestamp, without a date crate.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// The object with what the server owns set: namespace, uid, creation
/// time, `resourceVersion`, kind and apiVersion.
fn stamp(resource: Resource, mut v: Value, ns: &str, rv: u64, uid: &str, created: &str) -> Value {
    v["kind"] = json!(resource.kind());
    v["apiVersion"] = json!(resource.api_version());
    let meta = v["metadata"].as_object_mut().expect("metadata");
    meta.insert("namespace".into(), json!(ns));
    meta.insert("uid".into(), json!(uid));
    meta.insert("creationTimestamp".into(), json!(created));
    meta.insert("resourceVersion".into(), json!(rv.to_string()));
    meta.remove("generateName");
    v
}

/// The object without its `resourceVersion`, to tell whether an update
/// changes anything.
fn content(v: &Value) -> Value {
    let mut c = v.clone();
    if let Some(m) = c["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    c
}

impl Objects {
    fn record(&mut self, shared: &Shared, event: Event) {
        let name = event.object["metadata"]["name"]
            .as_str()
            .unwrap_or_default();
        self.written.insert(
            key(event.resource, &event.namespace, name),
            std::time::Instant::now(),
        );
        self.log.push_back(event.clone());
        while self.log.len() > LOG_EVENTS {
            if let Some(old) = self.log.pop_front() {
                self.oldest = old.rv;
            }
        }
        let _ = shared.events.send(event);
    }
}

// ---------------------------------------------------------------------------
// Handlers.

type Shared_ = State<Arc<Shared>>;

fn key(resource: Resource, ns: &str, name: &str) -> (Resource, String, String) {
    (resource, ns.to_owned(), name.to_owned())
}

fn get_one(shared: &Shared, resource: Resource, ns: &str, name: &str) -> Response {
    let o = shared.objects.lock().unwrap();
    match o.objects.get(&key(resource, ns, name)) {
        Some(v) => object_response(StatusCode::OK, v),
        None => not_found(resource, name),
    }
}

fn not_found(resource: Resource, name: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} {name:?} not found", resource.qualified()),
        Some(details(resource, name)),
    )
}

fn namespace_mismatch(v: &Value, ns: &str) -> Option<Response> {
    match v["metadata"]["namespace"].as_str() {
        Some(n) if !n.is_empty() && n != ns => Some(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request",
            None,
        )),
        _ => None,
    }
}

fn create(shared: &Shared, resource: Resource, ns: &str, body: &[u8]) -> Response {
    let v = match parse_body(resource, body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    if let Some(r) = namespace_mismatch(&v, ns) {
        return r;
    }
    let name = v["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if name.is_empty() {
        return invalid(
            resource,
            "",
            vec![(
                "metadata.name".into(),
                "Required value: name or generateName is required".into(),
            )],
        );
    }
    if v["metadata"]["resourceVersion"]
        .as_str()
        .is_some_and(|r| !r.is_empty())
    {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "Internal error occurred: resourceVersion should not be set on objects to be created",
            None,
        );
    }
    let causes = validate(resource, &v);
    if !causes.is_empty() {
        return invalid(resource, &name, causes);
    }
    let mut o = shared.objects.lock().unwrap();
    if o.objects.contains_key(&key(resource, ns, &name)) {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{} {name:?} already exists", resource.qualified()),
            Some(details(resource, &name)),
        );
    }
    o.rv += 1;
    o.uid += 1;
    let rv = o.rv;
    let uid = format!("00000000-0000-4000-8000-{:012x}", o.uid);
    let stored = stamp(resource, v, ns, rv, &uid, &now_rfc3339());
    o.objects.insert(key(resource, ns, &name), stored.clone());
    o.record(
        shared,
        Event {
            rv,
            resource,
            namespace: ns.to_owned(),
            kind: "ADDED",
            object: stored.clone(),
            before: None,
        },
    );
    object_response(StatusCode::CREATED, &stored)
}

fn replace(shared: &Shared, resource: Resource, ns: &str, name: &str, body: &[u8]) -> Response {
    let v = match parse_body(resource, body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    if let Some(r) = namespace_mismatch(&v, ns) {
        return r;
    }
    let body_name = v["metadata"]["name"].as_str().unwrap_or_default();
    if body_name != name {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            ),
            None,
        );
    }
    let causes = validate(resource, &v);
    if !causes.is_empty() {
        return invalid(resource, name, causes);
    }
    let mut o = shared.objects.lock().unwrap();
    let k = key(resource, ns, name);
    // The conflict storm: another writer gets there first.
    if o.objects.contains_key(&k)
        && shared.roll(shared.faults.conflict_per_mille.load(Ordering::SeqCst))
    {
        o.rv += 1;
        let rv = o.rv;
        let before = o.objects.get(&k).cloned();
        let Some(current) = o.objects.get_mut(&k) else {
            unreachable!("checked above")
        };
        let touched = current["metadata"]["annotations"]["stand-in/stray"]
            .as_str()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        if !current["metadata"]["annotations"].is_object() {
            current["metadata"]["annotations"] = json!({});
        }
        current["metadata"]["annotations"]["stand-in/stray"] = json!(touched.to_string());
        current["metadata"]["resourceVersion"] = json!(rv.to_string());
        let object = current.clone();
        o.record(
            shared,
            Event {
                rv,
                resource,
                namespace: ns.to_owned(),
                kind: "MODIFIED",
                object,
                before,
            },
        );
    }
    let Some(current) = o.objects.get(&k).cloned() else {
        return not_found(resource, name);
    };
    let current_rv = current["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if let Some(rv) = v["metadata"]["resourceVersion"]
        .as_str()
        .filter(|r| !r.is_empty())
    {
        if rv != current_rv {
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
                    resource.qualified()
                ),
                Some(details(resource, name)),
            );
        }
    }
    let uid = current["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let created = current["metadata"]["creationTimestamp"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let unchanged = stamp(resource, v.clone(), ns, 0, &uid, &created);
    if content(&unchanged) == content(&current) {
        // Nothing changed: no write, the resourceVersion stays.
        return object_response(StatusCode::OK, &current);
    }
    o.rv += 1;
    let rv = o.rv;
    let stored = stamp(resource, v, ns, rv, &uid, &created);
    o.objects.insert(k, stored.clone());
    o.record(
        shared,
        Event {
            rv,
            resource,
            namespace: ns.to_owned(),
            kind: "MODIFIED",
            object: stored.clone(),
            before: Some(current),
        },
    );
    object_response(StatusCode::OK, &stored)
}

fn delete(shared: &Shared, resource: Resource, ns: &str, name: &str, body: &[u8]) -> Response {
    let precondition = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        v["preconditions"]["resourceVersion"]
            .as_str()
            .map(str::to_owned)
    });
    let mut o = shared.objects.lock().unwrap();
    let k = key(resource, ns, name);
    let Some(current) = o.objects.get(&k).cloned() else {
        return not_found(resource, name);
    };
    if let Some(rv) = precondition {
        if Some(rv.as_str()) != current["metadata"]["resourceVersion"].as_str() {
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {} {name:?}: the ResourceVersion in the precondition ({rv}) does not match the ResourceVersion in record ({}). The object might have been modified",
                    resource.qualified(),
                    current["metadata"]["resourceVersion"].as_str().unwrap_or_default()
                ),
                Some(details(resource, name)),
            );
        }
    }
    o.objects.remove(&k);
    o.rv += 1;
    let rv = o.rv;
    let mut gone = current.clone();
    gone["metadata"]["resourceVersion"] = json!(rv.to_string());
    o.record(
        shared,
        Event {
            rv,
            resource,
            namespace: ns.to_owned(),
            kind: "DELETED",
            object: gone,
            before: None,
        },
    );
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "group": resource.group(), "kind": resource.plural(),
                    "uid": current["metadata"]["uid"]},
    });
    object_response(StatusCode::OK, &body)
}

/// An equality-based label selector.
#[derive(Debug, Clone, Default)]
struct Selector(Vec<(String, Option<String>, bool)>);

impl Selector {
    fn parse(s: &str) -> Result<Selector, String> {
        let mut terms = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if let Some((k, v)) = term.split_once("!=") {
                terms.push((k.trim().to_owned(), Some(v.trim().to_owned()), false));
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                terms.push((k.trim().to_owned(), Some(v.trim().to_owned()), true));
            } else if let Some(k) = term.strip_prefix('!') {
                terms.push((k.trim().to_owned(), None, false));
            } else if term.contains(' ') || term.contains('(') {
                return Err(format!("unable to parse requirement: {term:?} (this stand-in takes equality selectors only)"));
            } else {
                terms.push((term.to_owned(), None, true));
            }
        }
        Ok(Selector(terms))
    }

    fn matches(&self, v: &Value) -> bool {
        let labels = &v["metadata"]["labels"];
        self.0.iter().all(|(k, want, equal)| {
            let have = labels[k.as_str()].as_str();
            match (want, equal) {
                (Some(w), true) => have == Some(w.as_str()),
                (Some(w), false) => have != Some(w.as_str()),
                (None, true) => have.is_some(),
                (None, false) => have.is_none(),
            }
        })
    }
}

fn list_or_watch(
    shared: Arc<Shared>,
    resource: Resource,
    ns: String,
    q: BTreeMap<String, String>,
) -> Response {
    let selector = match Selector::parse(q.get("labelSelector").map_or("", String::as_str)) {
        Ok(s) => s,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e, None),
    };
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return watch(shared, resource, ns, selector, &q);
    }
    let o = shared.objects.lock().unwrap();
    let items: Vec<Value> = o
        .objects
        .iter()
        .filter(|((r, n, _), v)| *r == resource && *n == ns && selector.matches(v))
        .map(|(_, v)| {
            // Items of a list carry no kind and apiVersion of their own.
            let mut item = v.clone();
            if let Some(m) = item.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
            item
        })
        .collect();
    let body = json!({
        "kind": format!("{}List", resource.kind()),
        "apiVersion": resource.api_version(),
        "metadata": {"resourceVersion": o.rv.to_string()},
        "items": items,
    });
    object_response(StatusCode::OK, &body)
}

fn watch_line(kind: &str, object: &Value) -> Result<axum::body::Bytes, std::io::Error> {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Ok(axum::body::Bytes::from(line))
}

fn watch(
    shared: Arc<Shared>,
    resource: Resource,
    ns: String,
    selector: Selector,
    q: &BTreeMap<String, String>,
) -> Response {
    let from = q.get("resourceVersion").cloned().unwrap_or_default();
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(256);
    // Subscribed before the replay is read, so that no event falls between.
    let mut live = shared.events.subscribe();
    let (replay, mut last, expired) = {
        let o = shared.objects.lock().unwrap();
        match from.as_str() {
            "" | "0" => {
                let current: Vec<(&'static str, Value)> = o
                    .objects
                    .iter()
                    .filter(|((r, n, _), v)| *r == resource && *n == ns && selector.matches(v))
                    .map(|(_, v)| ("ADDED", v.clone()))
                    .collect();
                (current, o.rv, None)
            }
            rv => match rv.parse::<u64>() {
                Err(_) => {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("invalid resource version: {rv:?}"),
                        None,
                    )
                }
                Ok(rv) if rv < o.oldest => (
                    Vec::new(),
                    o.rv,
                    Some(format!("too old resource version: {rv} ({})", o.oldest)),
                ),
                Ok(rv) => {
                    let events = o
                        .log
                        .iter()
                        .filter(|e| e.rv > rv)
                        .filter_map(|e| filtered(e, resource, &ns, &selector))
                        .collect();
                    (events, o.rv.max(rv), None)
                }
            },
        }
    };
    let generation = shared.watch_generation.load(Ordering::SeqCst);
    let bookmark_kind = resource.kind();
    let api_version = resource.api_version();
    tokio::spawn(async move {
        if let Some(message) = expired {
            let _ = tx
                .send(watch_line(
                    "ERROR",
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": message, "reason": "Expired", "code": 410}),
                ))
                .await;
            return;
        }
        for (kind, object) in replay {
            if tx.send(watch_line(kind, &object)).await.is_err() {
                return;
            }
        }
        let ends = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let mut ends = std::pin::pin!(ends);
        let every = shared.faults.bookmark_every_ms.load(Ordering::SeqCst);
        let mut tick = tokio::time::interval(Duration::from_millis(every.max(10)));
        tick.tick().await;
        loop {
            let closed = shared.closer.notified();
            let mut closed = std::pin::pin!(closed);
            closed.as_mut().enable();
            if shared.watch_generation.load(Ordering::SeqCst) != generation {
                return;
            }
            tokio::select! {
                _ = &mut ends => return,
                _ = closed => return,
                _ = tick.tick(), if bookmarks && every > 0 => {
                    let mark = json!({"kind": bookmark_kind, "apiVersion": api_version,
                                      "metadata": {"resourceVersion": last.to_string()}});
                    if tx.send(watch_line("BOOKMARK", &mark)).await.is_err() {
                        return;
                    }
                }
                event = live.recv() => match event {
                    Ok(e) => {
                        if e.rv <= last {
                            continue;
                        }
                        last = e.rv;
                        if let Some((kind, object)) = filtered(&e, resource, &ns, &selector) {
                            if tx.send(watch_line(kind, &object)).await.is_err() {
                                return;
                            }
                        }
                    }
                    // Too slow a reader: the server ends its watch.
                    Err(_) => return,
                },
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::TRANSFER_ENCODING, "chunked")
        .body(Body::from_stream(stream))
        .expect("a watch response")
}

/// The event as a watcher with this selector sees it, if at all: an object
/// that leaves the selection is `DELETED` for it, one that enters is `ADDED`.
fn filtered(
    e: &Event,
    resource: Resource,
    ns: &str,
    selector: &Selector,
) -> Option<(&'static str, Value)> {
    if e.resource != resource || e.namespace != ns {
        return None;
    }
    let now = selector.matches(&e.object);
    let before = e.before.as_ref().map(|b| selector.matches(b));
    match (e.kind, before, now) {
        ("MODIFIED", Some(true), false) => Some(("DELETED", e.object.clone())),
        ("MODIFIED", Some(false), true) => Some(("ADDED", e.object.clone())),
        (_, _, true) => Some((e.kind, e.object.clone())),
        _ => None,
    }
}

macro_rules! handlers {
    ($resource:expr, $list:ident, $create:ident, $get:ident, $replace:ident, $delete:ident) => {
        async fn $list(
            State(shared): Shared_,
            Path(ns): Path<String>,
            Query(q): Query<BTreeMap<String, String>>,
        ) -> Response {
            list_or_watch(shared, $resource, ns, q)
        }
        async fn $create(
            State(shared): Shared_,
            Path(ns): Path<String>,
            body: axum::body::Bytes,
        ) -> Response {
            create(&shared, $resource, &ns, &body)
        }
        async fn $get(
            State(shared): Shared_,
            Path((ns, name)): Path<(String, String)>,
        ) -> Response {
            get_one(&shared, $resource, &ns, &name)
        }
        async fn $replace(
            State(shared): Shared_,
            Path((ns, name)): Path<(String, String)>,
            body: axum::body::Bytes,
        ) -> Response {
            replace(&shared, $resource, &ns, &name, &body)
        }
        async fn $delete(
            State(shared): Shared_,
            Path((ns, name)): Path<(String, String)>,
            body: axum::body::Bytes,
        ) -> Response {
            delete(&shared, $resource, &ns, &name, &body)
        }
    };
}

handlers!(
    Resource::ConfigMaps,
    list_cm,
    create_cm,
    get_cm,
    replace_cm,
    delete_cm
);
handlers!(
    Resource::Leases,
    list_lease,
    create_lease,
    get_lease,
    replace_lease,
    delete_lease
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keys_and_selectors_follow_the_api() {
        assert!(is_subdomain("upsilon-a-1f2e.x"));
        assert!(!is_subdomain("Upsilon"));
        assert!(!is_subdomain("-a"));
        assert!(is_qualified_key("app.kubernetes.io/managed-by"));
        assert!(!is_qualified_key("a b"));
        let s = Selector::parse("a=b,c!=d,e,!f").unwrap();
        assert!(s.matches(&json!({"metadata": {"labels": {"a": "b", "e": ""}}})));
        assert!(!s.matches(&json!({"metadata": {"labels": {"a": "b", "c": "d", "e": ""}}})));
        assert!(!s.matches(&json!({"metadata": {"labels": {"a": "b", "e": "", "f": "x"}}})));
        assert!(Selector::parse("a in (b)").is_err());
        assert_eq!(now_rfc3339().len(), 20);
    }
}
