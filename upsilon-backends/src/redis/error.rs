//! Driver errors as [`BackendError`]s: the server's own words, the target
//! without credentials, and whether retrying may help.

use std::fmt;
use std::time::Duration;

use redis::{ErrorKind, RedisError, RetryMethod};
use upsilon::backend::BackendError;

/// What went wrong, in the server's or the driver's words, with what was
/// being done and where.
#[derive(Debug)]
pub(super) struct RedisFailure {
    message: String,
}

impl fmt::Display for RedisFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RedisFailure {}

/// Maps a driver error met while doing `what` on `target`: lost
/// connections, timeouts, a server that is loading its data or read-only
/// (a failover under way) are worth retrying; wrong credentials, missing
/// permissions and everything else are not. A key of the wrong type is
/// corrupt data.
pub(super) fn driver(e: RedisError, what: &str, target: &str) -> BackendError {
    if e.code() == Some("WRONGTYPE") {
        return BackendError::corrupt(format!(
            "{what}: a key of Upsilon's holds the wrong type of value on {target} ({e})"
        ));
    }
    classify(e, format!("{what} on Redis at {target}"))
}

/// Maps an error met while connecting to `target`: as [`driver`], and a
/// certificate that does not verify (permanent) or a server that drops a
/// plain connection at once (it may accept only TLS) says what to do.
pub(super) fn connecting(e: RedisError, target: &str, tls: bool) -> BackendError {
    let context = format!("cannot connect to Redis at {target}");
    let text = e.to_string();
    if tls && text.contains("certificate") {
        return BackendError::other(RedisFailure {
            message: format!(
                "{context}: {text}; the server's certificate does not verify against the trusted CAs: \
                 give the CA that signed it with `ca_file=PATH` in the URL (RedisOptions::tls(Some(path))), \
                 and connect by a host name the certificate names"
            ),
        });
    }
    if !tls && e.is_connection_dropped() && !e.is_connection_refusal() {
        return BackendError::unavailable(RedisFailure {
            message: format!(
                "{context}: {text}; the server closed the connection at once: if it accepts only TLS, use rediss://"
            ),
        });
    }
    classify(e, context)
}

fn classify(e: RedisError, context: String) -> BackendError {
    let mut message = format!("{context}: {e}");
    let transient = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.retry_method(),
            RetryMethod::Reconnect
                | RetryMethod::ReconnectFromInitialConnections
                | RetryMethod::WaitAndRetry
        )
        || e.code() == Some("READONLY");
    if e.kind() == ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"))
    {
        message.push_str(
            "; check the user name and password (in the URL's user info, or RedisOptions::username and ::password)",
        );
        return BackendError::other(RedisFailure { message });
    }
    if e.code() == Some("NOPERM") {
        message.push_str(
            "; Upsilon's user needs, on the keys `PREFIX:*` and the channel `PREFIX:wake`, the commands \
             PING SCAN EVALSHA EVAL SCRIPT|LOAD SUBSCRIBE and, run by its scripts, TIME HGET HMGET HSET HINCRBY \
             DEL PEXPIREAT LINDEX LRANGE RPUSH PUBLISH (docs/REDIS.md gives the ACL)",
        );
        return BackendError::other(RedisFailure { message });
    }
    let failure = RedisFailure { message };
    if transient {
        BackendError::unavailable(failure)
    } else {
        BackendError::other(failure)
    }
}

/// An operation that ran out of time.
pub(super) fn timed_out(what: &str, target: &str, after: Duration) -> BackendError {
    BackendError::unavailable(RedisFailure {
        message: format!("{what} on Redis at {target} did not finish within {after:?}"),
    })
}

/// A reply of an unexpected shape: the server is not what Upsilon expects
/// (or a script was replaced behind its back).
pub(super) fn unexpected(what: &str, reply: &redis::Value) -> BackendError {
    BackendError::other(format!(
        "{what}: Redis answered {reply:?}, which Upsilon did not expect"
    ))
}
