//! The PostgreSQL harness starts, restarts, crashes and stops a real server,
//! and leaves no process behind.

use std::path::Path;

use upsilon_test_servers::Postgres;

fn running(pid: &str) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn starts_restarts_and_stops_a_server() {
    let mut pg = Postgres::start();
    assert_eq!(pg.psql("SELECT 1"), "1");
    let pidfile = pg.dir().join("data/postmaster.pid");
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let pid = pid.lines().next().unwrap().to_owned();
    assert!(running(&pid));
    // As root the server runs as `postgres`, never as root.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(!uid.split_whitespace().nth(1).unwrap().eq("0"), "{uid}");

    pg.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (7)");
    pg.restart();
    assert_eq!(pg.psql("SELECT x FROM t"), "7");
    pg.crash();
    assert!(!pg.is_running());
    assert!(pg.try_psql_in("postgres", "SELECT 1").is_err());
    pg.start_again();
    assert_eq!(pg.psql("SELECT x FROM t"), "7");

    let wrong = std::process::Command::new("psql")
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port().to_string(),
            "-U",
            "postgres",
        ])
        .args(["-c", "SELECT 1"])
        .env("PGPASSWORD", "wrong")
        .output()
        .unwrap();
    assert!(!wrong.status.success(), "password authentication is on");

    let url = pg.create_database("other");
    assert!(url.ends_with("/other"), "{url}");
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let pid = pid.lines().next().unwrap().to_owned();
    let dir = pg.dir().to_owned();
    drop(pg);
    assert!(!running(&pid), "the server stopped on drop");
    assert!(!dir.exists(), "its directory is removed");
}

#[test]
fn a_tls_server_offers_tls_signed_by_its_ca() {
    let pg = Postgres::start_tls();
    assert!(pg.ca_file().exists());
    let out = pg.psql("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()");
    assert_eq!(out, "t", "psql negotiated TLS");
}

#[test]
fn a_tls_only_server_refuses_plain_connections() {
    let pg = Postgres::start_tls_only();
    let out = pg.psql("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()");
    assert_eq!(out, "t", "psql negotiated TLS");
    let plain = std::process::Command::new("psql")
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port().to_string(),
            "-U",
            "postgres",
        ])
        .args(["-c", "SELECT 1"])
        .env("PGPASSWORD", pg.password())
        .env("PGSSLMODE", "disable")
        .output()
        .unwrap();
    assert!(!plain.status.success(), "a plain connection was accepted");
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(stderr.contains("no encryption"), "{stderr}");
}

#[test]
fn a_builder_sets_connections_and_other_settings() {
    let pg = Postgres::builder()
        .max_connections(450)
        .setting("shared_preload_libraries", "pg_stat_statements")
        .start();
    assert_eq!(pg.psql("SHOW max_connections"), "450");
    pg.psql("CREATE EXTENSION pg_stat_statements");
    assert_eq!(
        pg.psql("SELECT count(*) >= 0 FROM pg_stat_statements"),
        "t",
        "the preloaded library answers"
    );
    assert_eq!(Postgres::start().psql("SHOW max_connections"), "300");
}

#[test]
fn a_server_never_dropped_is_stopped_and_removed_when_its_process_exits() {
    if let Ok(dir) = std::env::var("UPSILON_LEAK_SERVER") {
        // The child: starts a server, prints where, and exits without
        // dropping it.
        let pg = Postgres::start();
        let pid = std::fs::read_to_string(pg.dir().join("data/postmaster.pid")).unwrap();
        std::fs::write(
            dir,
            format!("{}\n{}", pg.dir().display(), pid.lines().next().unwrap()),
        )
        .unwrap();
        std::mem::forget(pg);
        return;
    }
    let out = tempfile::NamedTempFile::new().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_server_never_dropped_is_stopped_and_removed_when_its_process_exits",
            "--quiet",
        ])
        .env("UPSILON_LEAK_SERVER", out.path())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let written = std::fs::read_to_string(out.path()).unwrap();
    let (dir, pid) = written.split_once('\n').unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while (running(pid) || Path::new(dir).exists()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!running(pid), "the server was stopped");
    assert!(!Path::new(dir).exists(), "its directory {dir} was removed");
}
