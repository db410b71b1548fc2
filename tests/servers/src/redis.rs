//! A Redis server of our own, from the machine's `redis-server`, on a
//! temporary directory and a loopback port.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::certs::make_certificates;
use crate::{free_port, random, watchdog};

/// The command that installs `redis-server` on Debian.
pub const REDIS_INSTALL: &str = "apt-get install -y redis-server";

/// `$REDIS_SERVER`, or `redis-server` on `PATH`, or `/usr/bin/redis-server`.
pub fn redis_server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("REDIS_SERVER") {
        return PathBuf::from(bin);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let bin = dir.join("redis-server");
            if bin.exists() {
                return bin;
            }
        }
    }
    let bin = PathBuf::from("/usr/bin/redis-server");
    assert!(
        bin.exists(),
        "redis-server was not found on PATH, in /usr/bin or in $REDIS_SERVER; the Redis tests need it: {REDIS_INSTALL}"
    );
    bin
}

/// How often Redis syncs its append-only file (`appendfsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// Before every write is acknowledged: nothing acknowledged is lost.
    Always,
    /// Once a second (Redis's default): up to a second of writes can be lost.
    EverySec,
    /// When the operating system flushes.
    No,
}

impl Fsync {
    fn as_str(self) -> &'static str {
        match self {
            Fsync::Always => "always",
            Fsync::EverySec => "everysec",
            Fsync::No => "no",
        }
    }
}

/// A Redis server on a temporary directory and a free loopback port, with a
/// random password unless [`RedisBuilder::password`] says otherwise. It
/// stops when dropped; a watchdog also stops it if the test process exits
/// first.
#[derive(Debug)]
pub struct Redis {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    options: RedisBuilder,
    password: Option<String>,
    child: Option<Child>,
    watchdog: Option<Child>,
}

/// Settings for a server started by [`RedisBuilder::start`]; from
/// [`Redis::builder`].
#[derive(Debug, Clone)]
pub struct RedisBuilder {
    appendonly: bool,
    fsync: Fsync,
    password: bool,
    tls: bool,
    settings: Vec<(String, String)>,
}

impl RedisBuilder {
    /// `appendonly yes` with `appendfsync` `fsync`: writes survive a crash
    /// of the server (all of them with [`Fsync::Always`]). Default: no
    /// persistence at all (`appendonly no`, `save ""`).
    pub fn appendonly(mut self, fsync: Fsync) -> Self {
        self.appendonly = true;
        self.fsync = fsync;
        self
    }

    /// Whether clients must log in with a password (`requirepass`). Default
    /// on, with a random password.
    pub fn password(mut self, on: bool) -> Self {
        self.password = on;
        self
    }

    /// TLS only: the server listens on a TLS port (and on no plain one),
    /// with a certificate for `localhost` and 127.0.0.1 signed by a
    /// throwaway CA ([`Redis::ca_file`]). Needs the `openssl` command and a
    /// `redis-server` built with TLS (Debian's is).
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Any other server setting, as `--name value`.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Starts the server; panics with the install command if `redis-server`
    /// is missing, and with its log if it does not start.
    pub fn start(self) -> Redis {
        Redis::start_with(self)
    }
}

impl Redis {
    /// A server without persistence, with a password.
    pub fn start() -> Redis {
        Redis::builder().start()
    }

    /// A server with settings of its own.
    pub fn builder() -> RedisBuilder {
        RedisBuilder {
            appendonly: false,
            fsync: Fsync::EverySec,
            password: true,
            tls: false,
            settings: Vec::new(),
        }
    }

    fn start_with(options: RedisBuilder) -> Redis {
        let bin = redis_server_bin();
        let dir = tempfile::Builder::new()
            .prefix("upsilon-redis-")
            .tempdir_in(std::env::temp_dir())
            .expect("creating a temporary directory");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
            .expect("chmod of the temporary directory");
        if options.tls {
            make_certificates(dir.path(), None);
        }
        let password = options.password.then(|| format!("pw-{:016x}", random()));
        let mut redis = Redis {
            bin,
            dir,
            port: 0,
            options,
            password,
            child: None,
            watchdog: None,
        };
        let mut last = String::new();
        for _ in 0..5 {
            redis.port = free_port();
            match redis.try_launch() {
                Ok(()) => return redis,
                Err(log) => last = log,
            }
        }
        panic!("redis-server did not start; its log:\n{last}");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn args(&self) -> Vec<String> {
        let d = self.dir.path().display().to_string();
        let o = &self.options;
        let mut args: Vec<String> = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            d.clone(),
            "--save".into(),
            "".into(),
            "--appendonly".into(),
            if o.appendonly { "yes" } else { "no" }.into(),
            "--appendfsync".into(),
            o.fsync.as_str().into(),
            "--daemonize".into(),
            "no".into(),
            "--logfile".into(),
            self.log_path().display().to_string(),
            "--protected-mode".into(),
            "no".into(),
        ];
        if o.tls {
            args.extend([
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                self.port.to_string(),
                "--tls-cert-file".into(),
                format!("{d}/server.crt"),
                "--tls-key-file".into(),
                format!("{d}/server.key"),
                "--tls-ca-cert-file".into(),
                format!("{d}/ca.crt"),
                "--tls-auth-clients".into(),
                "no".into(),
            ]);
        } else {
            args.extend(["--port".into(), self.port.to_string()]);
        }
        if let Some(pw) = &self.password {
            args.extend(["--requirepass".into(), pw.clone()]);
        }
        for (name, value) in &o.settings {
            args.extend([format!("--{name}"), value.clone()]);
        }
        args
    }

    /// Starts the server on its directory and port and waits until its log
    /// says it accepts connections. On failure returns the log.
    fn try_launch(&mut self) -> Result<(), String> {
        let from = fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0);
        let child = Command::new(&self.bin)
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e}; the Redis tests need it: {REDIS_INSTALL}",
                    self.bin.display()
                )
            });
        let pid = child.id();
        self.child = Some(child);
        self.watchdog = Some(watchdog(pid, self.dir.path()));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log_since(from);
            if log.contains("Ready to accept connections") {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .is_some();
            if exited || Instant::now() > deadline {
                let mut stderr = String::new();
                if let Some(mut c) = self.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                    if let Some(mut e) = c.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut stderr);
                    }
                }
                self.stop_watchdog();
                return Err(format!("{stderr}{}", self.log_since(from)));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log_since(&self, offset: u64) -> String {
        let text = fs::read(self.log_path()).unwrap_or_default();
        String::from_utf8_lossy(text.get(offset as usize..).unwrap_or_default()).into_owned()
    }

    fn halt(&mut self, signal: Signal) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
        self.stop_watchdog();
    }

    fn stop_watchdog(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }

    /// The port: the TLS port of a TLS server, else the plain one.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The password clients log in with, if one is required.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// `redis://:PASSWORD@127.0.0.1:PORT/0` (`rediss://` for a TLS server,
    /// whose certificate [`Redis::ca_file`] verifies).
    pub fn url(&self) -> String {
        let scheme = if self.options.tls { "rediss" } else { "redis" };
        match &self.password {
            Some(pw) => format!("{scheme}://:{pw}@127.0.0.1:{}/0", self.port),
            None => format!("{scheme}://127.0.0.1:{}/0", self.port),
        }
    }

    /// The CA certificate (PEM) that signed a TLS server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Shuts the server down (SIGTERM): it flushes its append-only file,
    /// if it keeps one, and exits.
    pub fn stop(&mut self) {
        self.halt(Signal::SIGTERM);
    }

    /// Kills the server (SIGKILL), as a crash: what it had not written to
    /// its append-only file is lost.
    pub fn crash(&mut self) {
        self.halt(Signal::SIGKILL);
    }

    /// Starts the stopped server again on the same directory and port; it
    /// loads its append-only file, if it keeps one.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is already running");
        if let Err(log) = self.try_launch() {
            panic!(
                "redis-server did not start again on port {}; its log:\n{log}",
                self.port
            );
        }
    }

    /// Stops (SIGTERM) and starts the server again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.log_since(0)
    }

    /// The temporary directory (append-only file, log, certificates).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.halt(Signal::SIGKILL);
    }
}
