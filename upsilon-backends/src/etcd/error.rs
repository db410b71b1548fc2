//! Client errors as [`BackendError`]s: the server's own words, what to do
//! where that is clear, and whether retrying may help. No error names a
//! password: the client's errors never carry one, and the target is shown
//! by endpoints and user only.

use std::fmt;
use std::time::Duration;

use upsilon::backend::BackendError;

/// An etcd error, said in words.
#[derive(Debug)]
pub(super) struct EtcdError {
    message: String,
}

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for EtcdError {}

// gRPC status codes (the client does not name the type they come in).
const CANCELLED: i32 = 1;
const UNKNOWN: i32 = 2;
const DEADLINE_EXCEEDED: i32 = 4;
const NOT_FOUND: i32 = 5;
const RESOURCE_EXHAUSTED: i32 = 8;
const ABORTED: i32 = 10;
const INTERNAL: i32 = 13;
const UNAVAILABLE: i32 = 14;
const UNAUTHENTICATED: i32 = 16;

/// What went wrong with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    /// Worth retrying: the connection, a timeout, no leader, an overload.
    Transient,
    /// The lease named is gone.
    LeaseNotFound,
    /// Wrong credentials, missing permissions, bad requests.
    Permanent,
}

/// The client's words for `e`, with its causes.
fn describe(e: &etcd_client::Error) -> String {
    let mut s = match e {
        etcd_client::Error::GRpcStatus(status) => {
            let message = status.message();
            if message.is_empty() {
                format!("gRPC status {}", status.code())
            } else {
                message.to_owned()
            }
        }
        other => other.to_string(),
    };
    let mut source = std::error::Error::source(e);
    while let Some(c) = source {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = c.source();
    }
    s
}

pub(super) fn classify(e: &etcd_client::Error) -> Class {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            let message = status.message();
            match i32::from(status.code()) {
                NOT_FOUND if message.contains("lease not found") => Class::LeaseNotFound,
                CANCELLED | UNKNOWN | DEADLINE_EXCEEDED | RESOURCE_EXHAUSTED | ABORTED
                | INTERNAL | UNAVAILABLE => Class::Transient,
                // An expired token is refreshed by the client and retried.
                UNAUTHENTICATED if message.contains("invalid auth token") => Class::Transient,
                _ => Class::Permanent,
            }
        }
        etcd_client::Error::LeaseKeepAliveError(m) if m.contains("lease not found") => {
            Class::LeaseNotFound
        }
        etcd_client::Error::TransportError(_)
        | etcd_client::Error::IoError(_)
        | etcd_client::Error::WatchError(_)
        | etcd_client::Error::LeaseKeepAliveError(_) => Class::Transient,
        _ => Class::Permanent,
    }
}

/// Maps a client error met while `doing` something: transient ones are
/// [`BackendError::Unavailable`], the rest [`BackendError::Other`], with a
/// hint where the fix is clear.
pub(super) fn driver_in(e: etcd_client::Error, doing: &str) -> BackendError {
    let mut message = describe(&e);
    if !doing.is_empty() {
        message = format!("{doing}: {message}");
    }
    let mut class = classify(&e);
    let hint = if message.contains("authentication failed") {
        Some("check the user name and password")
    } else if message.contains("permission denied") {
        Some("Upsilon's etcd user needs a role that may read and write every key under its prefix")
    } else if message.contains("authentication is not enabled") {
        Some("the cluster has authentication off: give no user and password")
    } else if message.contains("user name is empty") {
        Some("the cluster has authentication on: give a user and password")
    } else if message.contains("invalid peer certificate") {
        // Retrying does not make the certificate trusted.
        class = Class::Permanent;
        Some(
            "the server's certificate is not trusted: give the CA that signed it \
             (`cacert=PATH` in the URL, `EtcdOptions::tls(Some(ca_file))`)",
        )
    } else {
        None
    };
    if let Some(hint) = hint {
        message.push_str("; ");
        message.push_str(hint);
    }
    let err = EtcdError { message };
    match class {
        Class::Transient => BackendError::unavailable(err),
        Class::LeaseNotFound | Class::Permanent => BackendError::other(err),
    }
}

/// An operation that ran out of time.
pub(super) fn timed_out(what: &str, after: Duration) -> BackendError {
    BackendError::unavailable(EtcdError {
        message: format!("{what} did not finish within {after:?}"),
    })
}

/// A transaction that kept losing its compare to other writers.
pub(super) fn contended(what: &str, tries: u32) -> BackendError {
    BackendError::unavailable(EtcdError {
        message: format!(
            "{what}: the keys changed under each of {tries} attempts (other writers); try again"
        ),
    })
}
