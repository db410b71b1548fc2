//! The fault test's audit log: one append-only file per node process, on
//! local disk, in which the node records what it did and when, on
//! [`clock::now_us`](crate::clock::now_us): every run of task code (a task or
//! a rollback) from its start to the moment it stopped, when it saw its
//! cancellation, every lease and store call with its outcome, and when the
//! backend signalled that the lease may be gone.
//!
//! The log is kept apart from the store on purpose: the fault test cuts,
//! terminates and restarts the store's connections and server, and a
//! record that depended on them could be lost or late, which would hide an
//! overlap. A line is written with one `write` call, so a SIGKILL loses at
//! most the line being formatted, never a written one.
//!
//! A line is tab-separated: its kind, then its fields (see [`Record`]).

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::clock::now_us;

/// How a call to the lock or the store ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded (for an acquire: granted, the record's fence is the grant's).
    Ok,
    /// An acquire found the lease held by someone else (the record's fence is theirs).
    Held,
    /// An acquire found the lease held by this very process (a lost grant reply).
    HeldBySelf,
    /// An acquire found the lease free but the store moved since the caller
    /// read it: nothing was granted.
    Moved,
    /// Refused: a stale fence.
    Stale,
    /// Refused: the lease is not held by the caller.
    Lost,
    /// Refused by the store's rules.
    Rejected,
    /// Unreachable or timed out: it may or may not have taken effect.
    Unavailable,
    /// The caller stopped waiting for it (a timeout, a cancelled run): it
    /// may or may not have taken effect.
    Dropped,
    /// Any other error.
    Other,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Held => "held",
            Outcome::HeldBySelf => "held-by-self",
            Outcome::Moved => "moved",
            Outcome::Stale => "stale",
            Outcome::Lost => "lost",
            Outcome::Rejected => "rejected",
            Outcome::Unavailable => "unavailable",
            Outcome::Dropped => "dropped",
            Outcome::Other => "other",
        }
    }

    fn parse(s: &str) -> Option<Outcome> {
        Some(match s {
            "ok" => Outcome::Ok,
            "held" => Outcome::Held,
            "held-by-self" => Outcome::HeldBySelf,
            "moved" => Outcome::Moved,
            "stale" => Outcome::Stale,
            "lost" => Outcome::Lost,
            "rejected" => Outcome::Rejected,
            "unavailable" => Outcome::Unavailable,
            "dropped" => Outcome::Dropped,
            "other" => Outcome::Other,
            _ => return None,
        })
    }
}

/// How a run of task code ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The body returned `Ok`.
    Returned,
    /// The body returned an error.
    Failed,
    /// The runner dropped the body before it returned (cancellation).
    Dropped,
}

impl Ended {
    fn as_str(self) -> &'static str {
        match self {
            Ended::Returned => "returned",
            Ended::Failed => "failed",
            Ended::Dropped => "dropped",
        }
    }

    fn parse(s: &str) -> Option<Ended> {
        Some(match s {
            "returned" => Ended::Returned,
            "failed" => Ended::Failed,
            "dropped" => Ended::Dropped,
            _ => return None,
        })
    }
}

/// One line of a node's audit log. Times are microseconds on
/// [`now_us`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// The first line: which node, which process.
    Process { node: String, pid: u32, at: i64 },
    /// Task code started: a run of `task` or, if `rollback`, of its rollback.
    Run {
        seq: u64,
        task: String,
        version: String,
        rollback: bool,
        fence: u64,
        attempt: u32,
        at: i64,
    },
    /// Run `seq` stopped at `at`; `cancelled_at` is when the node saw the
    /// task's cancellation token fire, if it did.
    End {
        seq: u64,
        at: i64,
        cancelled_at: Option<i64>,
        how: Ended,
    },
    /// A lease call: `op` is `acquire`, `renew` or `release`; `fence` the
    /// lease's (for an acquire, the granted or the holder's fence, 0 if none).
    Lock {
        op: String,
        fence: u64,
        sent: i64,
        done: i64,
        outcome: Outcome,
    },
    /// A store write: `op` is `claim` or `apply`, with `fence`; `what` names
    /// the changes.
    Store {
        op: String,
        fence: u64,
        sent: i64,
        done: i64,
        outcome: Outcome,
        what: String,
    },
    /// The backend signalled that the lease with `fence` may be gone.
    Lost { fence: u64, at: i64, detail: String },
    /// The process is about to exit with `code`.
    Exit { at: i64, code: i32 },
}

/// Tabs and line breaks would split a field.
fn clean(s: &str) -> String {
    s.replace(['\t', '\n', '\r'], " ")
}

impl Record {
    /// The record as one line, with its line break.
    pub fn to_line(&self) -> String {
        let mut l = String::new();
        let _ = match self {
            Record::Process { node, pid, at } => write!(l, "process\t{}\t{pid}\t{at}", clean(node)),
            Record::Run {
                seq,
                task,
                version,
                rollback,
                fence,
                attempt,
                at,
            } => write!(
                l,
                "run\t{seq}\t{}\t{}\t{}\t{fence}\t{attempt}\t{at}",
                clean(task),
                clean(version),
                if *rollback { "rollback" } else { "task" }
            ),
            Record::End {
                seq,
                at,
                cancelled_at,
                how,
            } => write!(
                l,
                "end\t{seq}\t{at}\t{}\t{}",
                cancelled_at.map_or("-".to_owned(), |c| c.to_string()),
                how.as_str()
            ),
            Record::Lock {
                op,
                fence,
                sent,
                done,
                outcome,
            } => write!(
                l,
                "lock\t{}\t{fence}\t{sent}\t{done}\t{}",
                clean(op),
                outcome.as_str()
            ),
            Record::Store {
                op,
                fence,
                sent,
                done,
                outcome,
                what,
            } => write!(
                l,
                "store\t{}\t{fence}\t{sent}\t{done}\t{}\t{}",
                clean(op),
                outcome.as_str(),
                clean(what)
            ),
            Record::Lost { fence, at, detail } => {
                write!(l, "lost\t{fence}\t{at}\t{}", clean(detail))
            }
            Record::Exit { at, code } => write!(l, "exit\t{at}\t{code}"),
        };
        l.push('\n');
        l
    }

    /// Reads [`Record::to_line`]'s output (without the line break).
    pub fn parse(line: &str) -> Option<Record> {
        let f: Vec<&str> = line.split('\t').collect();
        let int = |i: usize| f.get(i)?.parse::<i64>().ok();
        let uint = |i: usize| f.get(i)?.parse::<u64>().ok();
        let text = |i: usize| f.get(i).map(|s| (*s).to_owned());
        Some(match *f.first()? {
            "process" => Record::Process {
                node: text(1)?,
                pid: f.get(2)?.parse().ok()?,
                at: int(3)?,
            },
            "run" => Record::Run {
                seq: uint(1)?,
                task: text(2)?,
                version: text(3)?,
                rollback: *f.get(4)? == "rollback",
                fence: uint(5)?,
                attempt: f.get(6)?.parse().ok()?,
                at: int(7)?,
            },
            "end" => Record::End {
                seq: uint(1)?,
                at: int(2)?,
                cancelled_at: match *f.get(3)? {
                    "-" => None,
                    c => Some(c.parse().ok()?),
                },
                how: Ended::parse(f.get(4)?)?,
            },
            "lock" => Record::Lock {
                op: text(1)?,
                fence: uint(2)?,
                sent: int(3)?,
                done: int(4)?,
                outcome: Outcome::parse(f.get(5)?)?,
            },
            "store" => Record::Store {
                op: text(1)?,
                fence: uint(2)?,
                sent: int(3)?,
                done: int(4)?,
                outcome: Outcome::parse(f.get(5)?)?,
                what: text(6).unwrap_or_default(),
            },
            "lost" => Record::Lost {
                fence: uint(1)?,
                at: int(2)?,
                detail: text(3).unwrap_or_default(),
            },
            "exit" => Record::Exit {
                at: int(1)?,
                code: f.get(2)?.parse().ok()?,
            },
            _ => return None,
        })
    }
}

/// A node process's audit log, open for appending.
#[derive(Debug)]
pub struct AuditLog {
    file: Mutex<File>,
    seq: AtomicU64,
}

impl AuditLog {
    /// Creates `DIR/NODE-PID.audit` for this process and writes its first line.
    pub fn create(dir: &Path, node: &str) -> io::Result<AuditLog> {
        let pid = std::process::id();
        let path = dir.join(format!("{node}-{pid}.audit"));
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let log = AuditLog {
            file: Mutex::new(file),
            seq: AtomicU64::new(0),
        };
        log.write(&Record::Process {
            node: node.to_owned(),
            pid,
            at: now_us(),
        });
        Ok(log)
    }

    /// A number for the next run, distinct within this process.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Appends `record` (one `write` call). A failing write is reported on
    /// stderr and otherwise ignored: the checker then misses a record and
    /// says so, rather than the node changing its behaviour.
    pub fn write(&self, record: &Record) {
        let line = record.to_line();
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()) {
            eprintln!("audit log: cannot write {line:?}: {e}");
        }
    }
}

/// The records of one node process.
#[derive(Debug, Clone)]
pub struct ProcessLog {
    /// Its file.
    pub path: PathBuf,
    /// The node's name.
    pub node: String,
    /// Its process id.
    pub pid: u32,
    /// Its records, in the order written.
    pub records: Vec<Record>,
    /// Lines that did not parse (a line cut short by a SIGKILL at most).
    pub unreadable: usize,
}

/// Every audit log in `dir`.
pub fn read_dir(dir: &Path) -> io::Result<Vec<ProcessLog>> {
    let mut logs = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "audit"))
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        let mut records = Vec::new();
        let mut unreadable = 0;
        for line in text.lines().filter(|l| !l.is_empty()) {
            match Record::parse(line) {
                Some(r) => records.push(r),
                None => unreadable += 1,
            }
        }
        let Some(Record::Process { node, pid, .. }) = records.first().cloned() else {
            // Created, then killed before its first line.
            continue;
        };
        logs.push(ProcessLog {
            path,
            node,
            pid,
            records,
            unreadable,
        });
    }
    Ok(logs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_record_reads_back() {
        let records = [
            Record::Process {
                node: "n1".into(),
                pid: 42,
                at: 7,
            },
            Record::Run {
                seq: 1,
                task: "t1".into(),
                version: "1.0.0".into(),
                rollback: true,
                fence: 3,
                attempt: 2,
                at: 100,
            },
            Record::End {
                seq: 1,
                at: 200,
                cancelled_at: Some(190),
                how: Ended::Dropped,
            },
            Record::End {
                seq: 2,
                at: 300,
                cancelled_at: None,
                how: Ended::Returned,
            },
            Record::Lock {
                op: "acquire".into(),
                fence: 4,
                sent: 1,
                done: 2,
                outcome: Outcome::HeldBySelf,
            },
            Record::Store {
                op: "apply".into(),
                fence: 4,
                sent: 1,
                done: 2,
                outcome: Outcome::Stale,
                what: "start t1\tx".into(),
            },
            Record::Lost {
                fence: 4,
                at: 9,
                detail: "session\nended".into(),
            },
            Record::Exit { at: 10, code: 3 },
        ];
        for r in records {
            let line = r.to_line();
            let back = Record::parse(line.trim_end_matches('\n')).unwrap();
            match (&r, &back) {
                (Record::Store { what, .. }, Record::Store { what: w, .. }) => {
                    assert_eq!(w, &clean(what))
                }
                (Record::Lost { detail, .. }, Record::Lost { detail: d, .. }) => {
                    assert_eq!(d, &clean(detail))
                }
                _ => assert_eq!(r, back),
            }
        }
        assert_eq!(Record::parse("run\t1\tcut sho"), None);
    }
}
