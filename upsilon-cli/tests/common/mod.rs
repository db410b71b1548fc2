//! What the end-to-end tests share: a store of either kind (a SQLite file,
//! or a schema of one PostgreSQL server that these tests start), the real
//! `upsilon` binary, and stores filled by real runs.
#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::Value;
use upsilon::backend::{
    Acquire, AttemptKind, AttemptState, Backend, Change, Checkpoint, FinishAttempt, Lease,
    SaveCheckpoint, StartAttempt,
};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
use upsilon::{Holder, Task, TaskContext, TaskFuture, TaskKey, Upsilon};
use upsilon_test_servers::Postgres;

/// Which backend a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server of this test binary. Never dropped: its watchdog
/// stops it when the process exits.
pub fn server() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(Postgres::start)
}

/// One test's store: its URL, and a way to reach it from the test itself.
pub struct Fixture {
    pub kind: Kind,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    /// A fresh store: a new SQLite file, or a new schema named `name`.
    pub fn new(kind: Kind, name: &str) -> Fixture {
        match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("upsilon.db").display());
                Fixture {
                    kind,
                    url,
                    _dir: Some(dir),
                }
            }
            Kind::Postgres => Fixture {
                kind,
                url: format!("{}?schema=cli_{name}", server().url()),
                _dir: None,
            },
        }
    }

    /// The password in the URL, for checks that it is never printed.
    pub fn password(&self) -> Option<&'static str> {
        (self.kind == Kind::Postgres).then(|| server().password())
    }

    pub async fn backend(&self) -> Arc<dyn Backend> {
        upsilon_backends::connect(&self.url).await.unwrap()
    }

    /// `upsilon --url <this store>`, with no `UPSILON_*` from the
    /// environment.
    pub fn cli(&self) -> Command {
        let mut c = bare();
        c.arg("--url").arg(&self.url);
        c
    }
}

/// The binary, with no `UPSILON_*` from the environment.
pub fn bare() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_upsilon"));
    c.env_remove("UPSILON_URL")
        .env_remove("UPSILON_SERVICE")
        .stdin(Stdio::null());
    c
}

/// What a run printed, and its exit code.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Stdout as one JSON value.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {self:?}"))
    }

    /// Asserts the exit code, showing everything printed otherwise.
    #[track_caller]
    pub fn expect(self, code: i32) -> Out {
        assert_eq!(self.code, code, "{self:#?}");
        self
    }

    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

#[track_caller]
pub fn run(cmd: &mut Command) -> Out {
    let out = cmd.output().expect("running the binary");
    Out {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn ok(_: &mut TaskContext) -> TaskFuture<'_> {
    Box::pin(async { Ok(()) })
}

/// Gets a quarter of the way, saves its checkpoint there, and fails.
fn fails(ctx: &mut TaskContext) -> TaskFuture<'_> {
    Box::pin(async {
        ctx.save_checkpoint_with_progress(&serde_json::json!({"last_id": 300}), 300, Some(1200))
            .await?;
        Err("the disk is full".into())
    })
}

/// The tasks every test registers: two of 1.0, and 1.1's `backfill`,
/// which fails when `failing`.
pub fn tasks(failing: bool) -> Vec<Task> {
    vec![
        Task::new("1.0", 1, "create", ok)
            .unwrap()
            .with_description("creates the table"),
        Task::new("1.0", 2, "seed", ok).unwrap(),
        if failing {
            Task::new("1.1", 1, "backfill", fails).unwrap()
        } else {
            Task::new("1.1", 1, "backfill", ok).unwrap()
        },
    ]
}

/// Runs the upgrade of `service` to `version` as a node would.
pub async fn upgrade(backend: &Arc<dyn Backend>, service: &str, version: &str, failing: bool) {
    let upsilon = Upsilon::builder()
        .service(service)
        .app_version(version)
        .backend(backend.clone())
        .tasks(tasks(failing))
        .tasks_above_app(upsilon::AboveAppPolicy::Ignore)
        .build()
        .unwrap();
    let result = upsilon.run().await;
    assert_eq!(result.is_ok(), !failing, "{result:?}");
}

/// The node the tests see holding the lease.
pub fn node() -> Holder {
    Holder {
        host: "node-a".into(),
        pod: Some("accounts-7d9f".into()),
        pid: 4242,
        run_id: "run-a".into(),
    }
}

/// A holder that is alive: it holds the lease of `service`, claimed the
/// store and is running 1.1's `backfill`.
pub async fn live_holder(backend: &Arc<dyn Backend>, service: &str, ttl: Duration) -> Lease {
    let Acquire::Granted(lease) = backend.try_acquire(service, &node(), ttl).await.unwrap() else {
        panic!("the lease of {service} is held");
    };
    let snap = backend.claim(service, lease.fence).await.unwrap();
    let key = TaskKey {
        version: upsilon::Version::new(1, 1, 0),
        id: "backfill".into(),
    };
    let attempt = snap.tasks.get(&key).map_or(0, |t| t.rows) + 1;
    backend
        .apply(
            service,
            lease.fence,
            &[Change::Start(StartAttempt {
                key,
                attempt,
                kind: AttemptKind::Run,
                description: "backfills".into(),
                holder: node(),
                checkpoint: None,
            })],
        )
        .await
        .unwrap();
    backend
        .apply(
            service,
            lease.fence,
            &[Change::Checkpoint(SaveCheckpoint {
                key: TaskKey {
                    version: upsilon::Version::new(1, 1, 0),
                    id: "backfill".into(),
                },
                attempt,
                checkpoint: Checkpoint {
                    position: r#"{"last_id":1500}"#.into(),
                    saved_at_ms: now_ms(),
                    done: Some(1500),
                    total: Some(6000),
                },
            })],
        )
        .await
        .unwrap();
    lease
}

/// A running `upsilon` whose stdout lines arrive on a channel.
pub struct Spawned {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Spawned {
    pub fn new(cmd: &mut Command) -> Spawned {
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Spawned { child, lines }
    }

    /// The next line, within 20 s.
    pub fn line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(20))
            .expect("a line within 20 s")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The completion of the live holder's `backfill` attempt.
pub fn finish_backfill() -> Change {
    Change::Finish(FinishAttempt {
        key: TaskKey {
            version: upsilon::Version::new(1, 1, 0),
            id: "backfill".into(),
        },
        attempt: 1,
        state: AttemptState::Completed,
        error: None,
        duration: Duration::from_millis(5),
    })
}

/// The fields docs/CLI.md documents, by shape.
pub const STATUS: &[&str] = &[
    "service",
    "data_version",
    "baseline",
    "fence",
    "lease",
    "tasks",
    "running",
    "last_unlock",
];
pub const LEASE: &[&str] = &[
    "holder",
    "fence",
    "expires_at_ms",
    "expires_in_ms",
    "granted_at_ms",
    "held_for_ms",
    "read_at_ms",
];
pub const HOLDER: &[&str] = &["host", "pod", "pid", "run_id", "display"];
pub const ROW: &[&str] = &[
    "service",
    "version",
    "task",
    "attempt",
    "kind",
    "state",
    "fence",
    "holder",
    "description",
    "started_at_ms",
    "started_at",
    "finished_at_ms",
    "duration_ms",
    "error",
    "checkpoint",
];
pub const UNLOCK: &[&str] = &[
    "service", "unlocked", "cleared", "fence", "recorded", "taken_by", "held_ms", "released",
];

/// Asserts that `v` is an object with exactly `fields`.
#[track_caller]
pub fn shape(v: &Value, fields: &[&str]) {
    let mut keys: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    let mut want = fields.to_vec();
    want.sort_unstable();
    assert_eq!(keys, want, "{v}");
}

pub const CHECKPOINT: &[&str] = &["position", "saved_at_ms", "saved_at", "done", "total"];

#[track_caller]
pub fn row_shape(row: &Value) {
    shape(row, ROW);
    shape(&row["holder"], HOLDER);
    if !row["checkpoint"].is_null() {
        shape(&row["checkpoint"], CHECKPOINT);
    }
}

#[track_caller]
pub fn lease_shape(lease: &Value) {
    shape(lease, LEASE);
    shape(&lease["holder"], HOLDER);
}

#[track_caller]
pub fn error_shape(out: &Out, kind: &str) {
    let j = out.json();
    shape(&j, &["error"]);
    shape(&j["error"], &["kind", "exit", "message"]);
    assert_eq!(j["error"]["kind"], kind, "{j}");
    assert_eq!(j["error"]["exit"], out.code, "{j}");
}

impl Fixture {
    /// Runs `upsilon --url <store> args...` and checks that nothing it
    /// printed carries the password.
    #[track_caller]
    pub fn run(&self, args: &[&str]) -> Out {
        let out = run(self.cli().args(args));
        if let Some(pw) = self.password() {
            assert!(
                !out.all().contains(pw),
                "the password was printed: {out:#?}"
            );
        }
        out
    }
}

pub fn tasks_of(j: &Value, field: &str) -> Vec<String> {
    j.as_array()
        .unwrap()
        .iter()
        .map(|r| r[field].as_str().unwrap().to_owned())
        .collect()
}
