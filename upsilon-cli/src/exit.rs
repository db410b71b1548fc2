//! Exit codes, and the failures that lead to them.

use std::fmt;
use std::process::ExitCode;

use upsilon::backend::BackendError;

/// What a command's exit status means. Stable: scripts may rely on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Code {
    /// 0: done.
    Ok,
    /// 1: the command failed for another reason (a corrupt store, a runner
    /// setting that makes no sense), or `check` found problems.
    Failed,
    /// 2: bad usage: an unknown command or flag, a bad value, a missing URL.
    Usage,
    /// 3: no such service in the store.
    NotFound,
    /// 4: refused: `baseline` on a store that is not empty, an `unlock` that
    /// was not confirmed.
    Refused,
    /// 5: the backend could not be reached, or timed out (a transient
    /// error: trying again may work).
    Unreachable,
}

impl Code {
    /// The process exit status.
    pub fn number(self) -> u8 {
        match self {
            Code::Ok => 0,
            Code::Failed => 1,
            Code::Usage => 2,
            Code::NotFound => 3,
            Code::Refused => 4,
            Code::Unreachable => 5,
        }
    }

    /// The name `--json` errors carry (`"error": {"kind": ...}`).
    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "ok",
            Code::Failed => "failed",
            Code::Usage => "usage",
            Code::NotFound => "not_found",
            Code::Refused => "refused",
            Code::Unreachable => "unreachable",
        }
    }
}

impl From<Code> for ExitCode {
    fn from(code: Code) -> ExitCode {
        ExitCode::from(code.number())
    }
}

/// A command that did not do what was asked: why, and the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The exit code.
    pub code: Code,
    /// What happened, and what to do, in one or more lines.
    pub message: String,
}

impl Failure {
    /// A failure with `code`.
    pub fn new(code: Code, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// A backend error while `doing` something: transient errors are
    /// [`Code::Unreachable`], the rest [`Code::Failed`].
    pub fn backend(doing: &str, e: &BackendError) -> Failure {
        let code = if e.is_transient() {
            Code::Unreachable
        } else {
            Code::Failed
        };
        Failure::new(code, format!("{doing}: {}", chain(e)))
    }

    /// A runner error: a backend's transient error inside it is
    /// [`Code::Unreachable`], the rest [`Code::Failed`].
    pub fn runner(e: &upsilon::Error) -> Failure {
        let code = match e {
            upsilon::Error::Backend { source, .. } if source.is_transient() => Code::Unreachable,
            _ => Code::Failed,
        };
        Failure::new(code, chain(e))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// An error and its sources, each said once: `a: b: c`.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
