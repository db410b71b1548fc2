//! No password appears in any error or log line, in any form a user may
//! give it: a URL's user info, a URL's `password=` parameter, a `key=value`
//! string, `PostgresOptions::password`. Every failing connect's error is
//! collected (`Display`, `Debug`, the whole source chain) and every log line
//! (a subscriber that writes to a buffer, with the driver's `log` records
//! forwarded), and searched for each piece of the passwords.
#![cfg(feature = "postgres")]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use upsilon::backend::BackendError;
use upsilon_backends::postgres::{PostgresBackend, PostgresOptions};
use upsilon_test_servers::{free_port, Postgres};

/// The right password of `secret_user`, and a wrong one. Each is made of
/// pieces no message has any other reason to contain, joined by characters
/// that URLs and `key=value` strings must encode or quote.
const RIGHT: [&str; 5] = ["Jm4qTz", "Rk8vWy", "Nf2hXe", "Qs6bUo", "Tg9cPi"];
const WRONG: [&str; 5] = ["Zq7xKa", "Vb3nMd", "Lp9wRf", "Hc5tYg", "Gd2sFh"];
const JOINERS: [&str; 4] = ["@", ":/", " '", "?&="];

fn password(pieces: &[&str; 5]) -> String {
    let mut out = pieces[0].to_owned();
    for (j, p) in JOINERS.iter().zip(&pieces[1..]) {
        out.push_str(j);
        out.push_str(p);
    }
    out
}

fn server() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(|| {
        let pg = Postgres::start();
        let sql_literal = password(&RIGHT).replace('\'', "''");
        pg.psql(&format!(
            "CREATE ROLE secret_user LOGIN PASSWORD '{sql_literal}'"
        ));
        pg
    })
}

/// Everything written to the log, from every thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() -> Captured {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    captured
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn kv_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The ways a user may give `pw`, to `host:port/db`.
fn forms(host: &str, port: &str, db: &str, pw: &str) -> Vec<(String, Option<String>)> {
    let enc = percent_encode(pw);
    vec![
        (
            "URL user info".into(),
            Some(format!("postgres://secret_user:{enc}@{host}:{port}/{db}")),
        ),
        (
            "URL parameter".into(),
            Some(format!(
                "postgresql://secret_user@{host}:{port}/{db}?password={enc}&connect_timeout=3"
            )),
        ),
        (
            "key=value".into(),
            Some(format!(
                "host={host} port={port} user=secret_user dbname={db} password={} connect_timeout=3",
                kv_quote(pw)
            )),
        ),
        ("parts".into(), None),
    ]
}

fn all_of(err: &BackendError) -> String {
    let mut out = format!("{err}\n{err:?}\n{err:#?}\n");
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        out.push_str(&format!("{s}\n{s:?}\n"));
        source = s.source();
    }
    out
}

/// `upsilon_backends::connect`'s error for a PostgreSQL URL. It picks the
/// backend by the URL's scheme, so a `key=value` string is not given to it.
async fn by_scheme(s: &str) -> Option<BackendError> {
    if !s.starts_with("postgres") {
        return None;
    }
    upsilon_backends::connect(s).await.err()
}

#[tokio::test]
async fn no_password_reaches_an_error_or_a_log_line() {
    let logs = capture_logs();
    let pg = tokio::task::spawn_blocking(server).await.unwrap();
    let port = pg.port().to_string();
    let nobody = free_port().to_string();
    let right = password(&RIGHT);
    let wrong = password(&WRONG);
    let cases = [
        (
            "a wrong password",
            "127.0.0.1",
            port.as_str(),
            "postgres",
            &wrong,
        ),
        (
            "nobody listening",
            "127.0.0.1",
            nobody.as_str(),
            "postgres",
            &right,
        ),
        (
            "an unknown host",
            "nowhere.invalid",
            port.as_str(),
            "postgres",
            &right,
        ),
        (
            "a database that does not exist",
            "127.0.0.1",
            port.as_str(),
            "no_such_db",
            &right,
        ),
        (
            "a port that is not a number",
            "127.0.0.1",
            "notaport",
            "postgres",
            &right,
        ),
    ];
    let mut seen = String::new();
    let mut failures = 0;
    for (case, host, port, db, pw) in cases {
        for (form, conninfo) in forms(host, port, db, pw) {
            let result = match &conninfo {
                Some(s) => PostgresBackend::connect_url(s).await,
                None => match port.parse() {
                    Ok(p) => {
                        let o = PostgresOptions::new()
                            .host(host)
                            .port(p)
                            .user("secret_user")
                            .dbname(db)
                            .password(pw.as_str());
                        seen.push_str(&format!("{o:?}\n"));
                        PostgresBackend::connect(o).await
                    }
                    Err(_) => continue,
                },
            };
            let err = result
                .err()
                .unwrap_or_else(|| panic!("{case}, {form}: connected"));
            seen.push_str(&format!("{case}, {form}:\n{}", all_of(&err)));
            failures += 1;
            if let Some(s) = &conninfo {
                if let Some(e) = by_scheme(s).await {
                    seen.push_str(&all_of(&e));
                }
                if let Ok(o) = PostgresOptions::from_url(s) {
                    seen.push_str(&format!("{o:?}\n"));
                }
            }
        }
    }
    // Strings that do not parse, with the password in them.
    for s in [
        format!(
            "host=127.0.0.1 user=secret_user password='{}",
            right.replace('\'', "")
        ),
        format!(
            "host=127.0.0.1 user=secret_user password={}",
            right.replace('\'', "")
        ),
        format!("postgres://secret_user:{right}@127.0.0.1/postgres"),
        format!("postgres://secret_user@127.0.0.1/postgres?password={right}%zz"),
    ] {
        match PostgresOptions::from_url(&s) {
            Err(e) => seen.push_str(&all_of(&e)),
            Ok(o) => seen.push_str(&format!("{o:?}\n")),
        }
        if let Some(e) = by_scheme(&s).await {
            seen.push_str(&all_of(&e));
        }
    }
    // The right password, connected: its backend's `Debug` too.
    let ok = PostgresBackend::connect(
        PostgresOptions::new()
            .host("127.0.0.1")
            .port(pg.port())
            .user("secret_user")
            .dbname("postgres")
            .schema("secrets")
            .password(right.as_str()),
    )
    .await
    .unwrap();
    seen.push_str(&format!("{ok:?}\n"));
    // Its first call finds no tables and may not create the schema.
    let refused = upsilon::backend::Store::load(&ok, "svc").await;
    assert!(
        refused.is_err(),
        "secret_user may not create a schema: {refused:?}"
    );
    seen.push_str(&all_of(&refused.unwrap_err()));

    let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(failures >= 15, "{failures} failing connects");
    assert!(!logged.is_empty(), "the logs were captured");
    for piece in RIGHT.iter().chain(&WRONG) {
        assert!(!seen.contains(piece), "{piece:?} is in an error:\n{seen}");
        assert!(
            !logged.contains(piece),
            "{piece:?} is in the log:\n{logged}"
        );
    }
    eprintln!(
        "searched {} bytes of errors and {} bytes of logs",
        seen.len(),
        logged.len()
    );
}
