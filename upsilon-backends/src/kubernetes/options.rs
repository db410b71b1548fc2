//! Where the API server is, which namespace the objects go in, and how long
//! an operation may take.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use upsilon::backend::BackendError;

/// Options of a [`KubernetesBackend`](super::KubernetesBackend): the
/// namespace, the prefix of the objects' names, where the client's
/// configuration comes from, and the time limits.
///
/// ```
/// use upsilon_backends::kubernetes::KubernetesOptions;
/// let from_url = KubernetesOptions::from_url("kubernetes://billing?prefix=upsilon")?;
/// let from_parts = KubernetesOptions::new()
///     .namespace("billing")
///     .kubeconfig("/etc/upsilon/kubeconfig")
///     .context("staging");
/// # Ok::<(), upsilon::backend::BackendError>(())
/// ```
///
/// Without a kubeconfig path the client is configured as `kubectl` would
/// be: from `$KUBECONFIG` or `~/.kube/config` when one exists, else from the
/// pod's service account (in-cluster).
#[derive(Clone)]
pub struct KubernetesOptions {
    pub(crate) namespace: Option<String>,
    pub(crate) prefix: String,
    pub(crate) kubeconfig: Option<PathBuf>,
    pub(crate) context: Option<String>,
    pub(crate) config: Option<kube::Config>,
    pub(crate) op_timeout: Duration,
    pub(crate) watch: bool,
    pub(crate) conflict_retries: u32,
}

impl fmt::Debug for KubernetesOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The client configuration may hold credentials: only its URL shows.
        f.debug_struct("KubernetesOptions")
            .field("namespace", &self.namespace)
            .field("prefix", &self.prefix)
            .field("kubeconfig", &self.kubeconfig)
            .field("context", &self.context)
            .field(
                "config",
                &self.config.as_ref().map(|c| c.cluster_url.to_string()),
            )
            .field("op_timeout", &self.op_timeout)
            .field("watch", &self.watch)
            .field("conflict_retries", &self.conflict_retries)
            .finish()
    }
}

impl Default for KubernetesOptions {
    fn default() -> Self {
        KubernetesOptions::new()
    }
}

impl KubernetesOptions {
    /// The defaults: the configuration's own namespace (the kubeconfig
    /// context's, or the service account's in a pod), prefix `upsilon`,
    /// 10 s per operation, watches on.
    pub fn new() -> KubernetesOptions {
        KubernetesOptions {
            namespace: None,
            prefix: "upsilon".to_owned(),
            kubeconfig: None,
            context: None,
            config: None,
            op_timeout: Duration::from_secs(10),
            watch: true,
            conflict_retries: 16,
        }
    }

    /// Options from a `kubernetes://NAMESPACE` URL. `kubernetes://` (or
    /// `kubernetes:`) alone takes the configuration's namespace. The query
    /// may carry `prefix=NAME`, `kubeconfig=PATH` and `context=NAME`.
    pub fn from_url(url: &str) -> Result<KubernetesOptions, BackendError> {
        let bad =
            |why: String| BackendError::other(format!("invalid Kubernetes URL {url:?}: {why}"));
        let rest = url
            .strip_prefix("kubernetes://")
            .or_else(|| url.strip_prefix("kubernetes:"))
            .ok_or_else(|| bad("it does not start with `kubernetes://`".into()))?;
        let (namespace, query) = match rest.split_once('?') {
            Some((n, q)) => (n, Some(q)),
            None => (rest, None),
        };
        let namespace = namespace.trim_end_matches('/');
        let mut options = KubernetesOptions::new();
        if !namespace.is_empty() {
            options.namespace = Some(namespace.to_owned());
        }
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| bad(format!("`{pair}` is not KEY=VALUE")))?;
            let value = percent_decode(value)
                .ok_or_else(|| bad(format!("`{pair}` is not percent-encoded right")))?;
            match key {
                "prefix" => options.prefix = value,
                "kubeconfig" => options.kubeconfig = Some(PathBuf::from(value)),
                "context" => options.context = Some(value),
                other => {
                    return Err(bad(format!(
                        "unknown option `{other}`; known: prefix, kubeconfig, context"
                    )))
                }
            }
        }
        options.validate()?;
        Ok(options)
    }

    /// The namespace of Upsilon's objects. Default: the configuration's.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// The prefix of every object's name (`PREFIX-meta`, and
    /// `PREFIX-SERVICEKEY...` per service), and the value of their
    /// `upsilon.dev/prefix` label. Default `upsilon`. 1 to 30 characters of
    /// `a-z`, `0-9` and `-`, starting and ending with a letter or digit.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Read the client's configuration from this kubeconfig file.
    pub fn kubeconfig(mut self, path: impl Into<PathBuf>) -> Self {
        self.kubeconfig = Some(path.into());
        self
    }

    /// The kubeconfig context to use. Default: its `current-context`.
    pub fn context(mut self, context: impl Into<String>) -> Self {
        self.context = Some(context.into());
        self
    }

    /// A client configuration made by the caller (`kube::Config`), used as
    /// it is: the kubeconfig path and context are then not read. Its
    /// `default_namespace` is the namespace when none is set here.
    pub fn config(mut self, config: kube::Config) -> Self {
        self.config = Some(config);
        self
    }

    /// The longest one request may take before it is abandoned as
    /// unavailable (the runner then retries). Default 10 s.
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// Whether to watch the Leases and state ConfigMaps, so that waiting
    /// nodes wake on a release or a data version change. Default on; off,
    /// waiting nodes poll.
    pub fn watch(mut self, on: bool) -> Self {
        self.watch = on;
        self
    }

    /// How often one operation re-reads and tries again when its write
    /// meets a newer `resourceVersion` (409 Conflict) before it gives up as
    /// unavailable. Default 16.
    pub fn conflict_retries(mut self, retries: u32) -> Self {
        self.conflict_retries = retries;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), BackendError> {
        let p = &self.prefix;
        if !(1..=30).contains(&p.len()) || !is_dns_label(p) {
            return Err(BackendError::other(format!(
                "the object prefix {p:?} is not allowed: use 1 to 30 characters of a-z, 0-9 and `-`, starting and ending with a letter or digit"
            )));
        }
        if let Some(ns) = &self.namespace {
            if ns.len() > 63 || !is_dns_label(ns) {
                return Err(BackendError::other(format!(
                    "the namespace {ns:?} is not a Kubernetes namespace name (1 to 63 characters of a-z, 0-9 and `-`, starting and ending with a letter or digit)"
                )));
            }
        }
        if self.op_timeout.is_zero() {
            return Err(BackendError::other(
                "the operation timeout must not be zero",
            ));
        }
        if self.conflict_retries == 0 {
            return Err(BackendError::other(
                "the conflict retries must be at least 1",
            ));
        }
        Ok(())
    }
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`
pub(crate) fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.first().is_some_and(edge)
        && b.last().is_some_and(edge)
        && b.iter().all(|c| edge(c) || *c == b'-')
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_the_namespace_and_options() {
        let o = KubernetesOptions::from_url("kubernetes://billing").unwrap();
        assert_eq!(o.namespace.as_deref(), Some("billing"));
        assert_eq!(o.prefix, "upsilon");
        let o = KubernetesOptions::from_url(
            "kubernetes://ops?prefix=up2&kubeconfig=%2Ftmp%2Fk%20c&context=kind-x",
        )
        .unwrap();
        assert_eq!(o.prefix, "up2");
        assert_eq!(o.kubeconfig, Some(PathBuf::from("/tmp/k c")));
        assert_eq!(o.context.as_deref(), Some("kind-x"));
        for bare in ["kubernetes://", "kubernetes:", "kubernetes:///"] {
            assert_eq!(KubernetesOptions::from_url(bare).unwrap().namespace, None);
        }
    }

    #[test]
    fn bad_names_and_options_are_refused() {
        for (url, says) in [
            ("kubernetes://Billing", "namespace"),
            ("kubernetes://a_b", "namespace"),
            ("kubernetes://ns?prefix=-x", "prefix"),
            ("kubernetes://ns?prefix=UP", "prefix"),
            ("kubernetes://ns?colour=blue", "unknown option `colour`"),
            ("kubernetes://ns?prefix", "KEY=VALUE"),
            ("postgres://x", "does not start"),
        ] {
            let err = KubernetesOptions::from_url(url).unwrap_err().to_string();
            assert!(err.contains(says), "{url}: {err}");
        }
    }
}
