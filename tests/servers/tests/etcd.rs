//! The etcd harness starts, crashes, restarts and stops a real server, turns
//! authentication on, and leaves no process behind.

use std::path::Path;

use upsilon_test_servers::Etcd;

fn running(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn starts_crashes_restarts_and_stops_a_server() {
    let mut etcd = Etcd::builder().fsync(true).start();
    etcd.etcdctl(&["put", "/t/k", "v1"]);
    assert_eq!(etcd.etcdctl(&["get", "/t/k", "--print-value-only"]), "v1");
    let pid = etcd.pid().unwrap();
    assert!(running(pid));
    etcd.crash();
    assert!(!etcd.is_running());
    assert!(!running(pid), "SIGKILL stopped it");
    assert!(etcd
        .try_etcdctl(&["--dial-timeout=1s", "--command-timeout=1s", "get", "/t/k"])
        .is_err());
    etcd.start_again();
    assert_eq!(
        etcd.etcdctl(&["get", "/t/k", "--print-value-only"]),
        "v1",
        "an fsynced write survives SIGKILL"
    );

    let root = etcd.enable_auth();
    etcd.add_user("app", "app-pw", "/t/");
    assert_eq!(etcd.etcdctl(&["get", "/t/k", "--print-value-only"]), "v1");
    let refused = std::process::Command::new("etcdctl")
        .arg(format!("--endpoints={}", etcd.endpoint()))
        .args(["--user=app:wrong", "get", "/t/k"])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "authentication is on");
    assert!(!root.is_empty());

    let pid = etcd.pid().unwrap();
    let dir = etcd.dir().to_owned();
    drop(etcd);
    assert!(!running(pid), "the server stopped on drop");
    assert!(!dir.exists(), "its directory is removed");
}

#[test]
fn serves_tls_with_its_own_ca() {
    let etcd = Etcd::builder().tls(true).start();
    assert!(etcd.url().starts_with("etcds://127.0.0.1:"));
    etcd.etcdctl(&["put", "/t/k", "v"]);
    let plain = std::process::Command::new("etcdctl")
        .arg(format!("--endpoints=http://{}", etcd.endpoint()))
        .args(["--dial-timeout=1s", "--command-timeout=1s", "get", "/t/k"])
        .output()
        .unwrap();
    assert!(!plain.status.success(), "plain TCP is refused");
}
