//! A single-member etcd of our own, on a temporary data directory and two
//! free loopback ports (client and peer).
//!
//! ```text
//! etcd --name t --data-dir DIR/data --listen-client-urls http://127.0.0.1:C ...
//!      --unsafe-no-fsync        # unless EtcdBuilder::fsync(true)
//! ```
//!
//! [`Etcd::crash`] kills it with SIGKILL and [`Etcd::start_again`] starts it
//! on the same data directory and ports. [`Etcd::enable_auth`] and
//! [`Etcd::add_user`] turn on user/password authentication with `etcdctl`.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::certs::make_certificates;
use crate::{free_port, random, watchdog};

/// The command that installs etcd and etcdctl on Debian.
pub const ETCD_INSTALL: &str = "apt-get install -y etcd-server etcd-client";

/// Finds `name` (`etcd`, `etcdctl`) in `$ETCD_BIN`, on `PATH`, or in
/// `/usr/bin` and `/usr/local/bin`; panics with the install command when it
/// is missing.
fn binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::var_os("ETCD_BIN")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::split_paths(&path))
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")]);
    binary_in(name, dirs)
}

fn binary_in(name: &str, dirs: impl IntoIterator<Item = PathBuf>) -> PathBuf {
    for dir in dirs {
        let path = dir.join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "`{name}` was not found on PATH or in $ETCD_BIN; the etcd tests need it: {ETCD_INSTALL}"
    );
}

/// An etcd server of our own. Stops (SIGKILL) when dropped; a watchdog
/// stops it when the test process exits without dropping it.
#[derive(Debug)]
pub struct Etcd {
    bin: PathBuf,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    fsync: bool,
    tls: bool,
    /// `user:password` for etcdctl once authentication is on.
    root: Option<String>,
    child: Option<Child>,
    watchdog: Option<Child>,
}

/// Settings for a server started by [`EtcdBuilder::start`]; from
/// [`Etcd::builder`].
#[derive(Debug, Clone, Default)]
pub struct EtcdBuilder {
    fsync: bool,
    tls: bool,
}

impl EtcdBuilder {
    /// Sync every commit to disk, as production etcd does. Default off
    /// (`--unsafe-no-fsync`), for speed; tests of durability turn it on.
    pub fn fsync(mut self, on: bool) -> Self {
        self.fsync = on;
        self
    }

    /// Serve clients over TLS only, with a certificate for `localhost` and
    /// 127.0.0.1 signed by a throwaway CA ([`Etcd::ca_file`]). Needs the
    /// `openssl` command.
    pub fn tls(mut self, on: bool) -> Self {
        self.tls = on;
        self
    }

    /// Starts the server; panics with the install command if `etcd` is
    /// missing, and with its log if it does not become healthy.
    pub fn start(self) -> Etcd {
        let bin = binary("etcd");
        let dir = tempfile::Builder::new()
            .prefix("upsilon-etcd-")
            .tempdir_in(std::env::temp_dir())
            .expect("creating a temporary directory");
        if self.tls {
            make_certificates(dir.path(), None);
        }
        let mut etcd = Etcd {
            bin,
            dir,
            client_port: 0,
            peer_port: 0,
            fsync: self.fsync,
            tls: self.tls,
            root: None,
            child: None,
            watchdog: None,
        };
        let mut last = String::new();
        for _ in 0..5 {
            etcd.client_port = free_port();
            etcd.peer_port = free_port();
            if etcd.client_port == etcd.peer_port {
                continue;
            }
            match etcd.try_launch() {
                Ok(()) => return etcd,
                Err(log) => {
                    last = log;
                    // A failed first start may leave a half-made member.
                    let _ = fs::remove_dir_all(etcd.data_dir());
                }
            }
        }
        panic!("etcd did not start; its log:\n{last}");
    }
}

impl Etcd {
    /// Starts a server with the defaults of [`Etcd::builder`].
    pub fn start() -> Etcd {
        Etcd::builder().start()
    }

    /// A server with settings of its own.
    pub fn builder() -> EtcdBuilder {
        EtcdBuilder::default()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// Starts etcd on its data directory and ports and waits until it is
    /// healthy. On failure, stops it and returns its log.
    fn try_launch(&mut self) -> Result<(), String> {
        let client = format!("{}://127.0.0.1:{}", self.scheme(), self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--name", "t", "--data-dir"])
            .arg(self.data_dir())
            .args(["--logger", "zap", "--log-outputs"])
            .arg(self.log_path())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if !self.fsync {
            cmd.arg("--unsafe-no-fsync");
        }
        if self.tls {
            let d = self.dir.path();
            cmd.arg("--cert-file")
                .arg(d.join("server.crt"))
                .arg("--key-file")
                .arg(d.join("server.key"));
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; install etcd: {ETCD_INSTALL}",
                self.bin.display()
            )
        });
        let pid = child.id();
        self.child = Some(child);
        self.watchdog = Some(watchdog(pid, self.dir.path()));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.healthy() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .is_some();
            if exited || Instant::now() > deadline {
                self.halt();
                return Err(self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server answers that it is healthy: `etcdctl endpoint
    /// health` over TLS, the `/health` endpoint of the client port without.
    fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        if self.tls {
            drop(s);
            return self
                .try_etcdctl(&[
                    "--dial-timeout=2s",
                    "--command-timeout=2s",
                    "endpoint",
                    "health",
                ])
                .is_ok();
        }
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let request = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        if s.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.contains("\"health\":\"true\"")
    }

    /// Stops the server with SIGKILL and waits for it to exit; stops the
    /// watchdog.
    fn halt(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }

    /// `127.0.0.1:PORT`, the client endpoint.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.client_port
    }

    /// `etcd://127.0.0.1:PORT` (`etcds://` for a TLS server).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "etcds" } else { "etcd" };
        format!("{scheme}://{}", self.endpoint())
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server with SIGKILL, as a crash: whatever etcd had not
    /// synced is lost (everything, with `--unsafe-no-fsync`).
    pub fn crash(&mut self) {
        self.halt();
    }

    /// Starts the stopped server again on the same data directory and ports.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is already running");
        if let Err(log) = self.try_launch() {
            panic!(
                "etcd did not start again on port {}; its log:\n{log}",
                self.client_port
            );
        }
    }

    /// Runs `etcdctl` against this server (as root once authentication is
    /// on) and returns what it printed; panics if it fails.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        match self.try_etcdctl(args) {
            Ok(out) => out,
            Err(e) => panic!("etcdctl {args:?} failed: {e}"),
        }
    }

    /// [`Etcd::etcdctl`]; the error is etcdctl's stderr.
    pub fn try_etcdctl(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(binary("etcdctl"));
        cmd.env("ETCDCTL_API", "3")
            .arg(format!(
                "--endpoints={}://{}",
                self.scheme(),
                self.endpoint()
            ))
            .args(["--dial-timeout=5s", "--command-timeout=10s"]);
        if self.tls {
            cmd.arg(format!("--cacert={}", self.ca_file().display()));
        }
        if let Some(root) = &self.root {
            cmd.arg(format!("--user={root}"));
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run etcdctl: {e}; {ETCD_INSTALL}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim_end().to_owned())
        }
    }

    /// Turns authentication on: creates user `root` with a random password
    /// (returned) and the `root` role, and enables auth. etcdctl calls of
    /// this value then run as root.
    pub fn enable_auth(&mut self) -> String {
        let password = format!("root-{:016x}", random());
        self.etcdctl(&[
            "user",
            "add",
            "root",
            &format!("--new-user-password={password}"),
            "--interactive=false",
        ]);
        self.etcdctl(&["user", "grant-role", "root", "root"]);
        self.etcdctl(&["auth", "enable"]);
        self.root = Some(format!("root:{password}"));
        password
    }

    /// Adds user `name` with `password` and a role of the same name that may
    /// read and write every key under `prefix` (a prefix range).
    pub fn add_user(&self, name: &str, password: &str, prefix: &str) {
        self.etcdctl(&["role", "add", name]);
        self.etcdctl(&[
            "role",
            "grant-permission",
            name,
            "--prefix=true",
            "readwrite",
            prefix,
        ]);
        self.etcdctl(&[
            "user",
            "add",
            name,
            &format!("--new-user-password={password}"),
            "--interactive=false",
        ]);
        self.etcdctl(&["user", "grant-role", name, name]);
    }

    /// The CA certificate (PEM) that signed the certificate of a TLS server.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The temporary directory (data directory, log, certificates).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "the etcd tests need it: apt-get install -y etcd-server etcd-client")]
    fn a_missing_binary_names_the_install_command() {
        let empty = tempfile::tempdir().unwrap();
        binary_in("etcd", [empty.path().to_owned()]);
    }
}
