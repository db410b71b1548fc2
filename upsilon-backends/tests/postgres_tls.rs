//! `sslmode` in every form a user may give it (a URL's `?sslmode=`, a
//! `key=value` string, `PostgresOptions::tls`), against a server that
//! accepts only TLS and against one without TLS: TLS is used when asked
//! for, `prefer` falls back to plaintext only where the server refuses TLS,
//! and nothing silently drops to plaintext.
#![cfg(feature = "postgres-rustls")]

use std::sync::OnceLock;

use upsilon::backend::Store;
use upsilon_backends::postgres::{PostgresBackend, PostgresOptions};
use upsilon_test_servers::Postgres;

fn tls_only() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(Postgres::start_tls_only)
}

fn plain() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(Postgres::start)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Url,
    KeyValue,
}

/// A connection string to `pg` in `form`, with `sslmode` and the CA file if
/// asked for, and `app` as the application name.
fn conninfo(pg: &Postgres, form: Form, mode: Option<&str>, ca: bool, app: &str) -> String {
    let ca_file = tls_only().ca_file().display().to_string();
    match form {
        Form::Url => {
            let mut url = format!(
                "postgres://postgres:{}@127.0.0.1:{}/postgres?application_name={app}",
                pg.password(),
                pg.port()
            );
            if let Some(m) = mode {
                url.push_str(&format!("&sslmode={m}"));
            }
            if ca {
                url.push_str(&format!("&sslrootcert={ca_file}"));
            }
            url
        }
        Form::KeyValue => {
            let mut kv = format!(
                "host=127.0.0.1 port={} user=postgres password='{}' dbname=postgres application_name='{app}'",
                pg.port(),
                pg.password()
            );
            if let Some(m) = mode {
                kv.push_str(&format!(" sslmode={m}"));
            }
            if ca {
                kv.push_str(&format!(" sslrootcert='{ca_file}'"));
            }
            kv
        }
    }
}

#[derive(Debug)]
enum Expect {
    /// Connects, every connection encrypted.
    Tls,
    /// Connects, no connection encrypted.
    Plain,
    /// Refused, with a message that contains each of these.
    Refused(&'static [&'static str]),
}

/// Whether the connections of application `app` use TLS: `Some(true)` if
/// all do, `Some(false)` if none does, `None` if there are none or mixed.
fn encrypted(pg: &Postgres, app: &str) -> Option<bool> {
    let out = pg.psql(&format!(
        "SELECT string_agg(s.ssl::text, ',') FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = '{app}'"
    ));
    let all: Vec<&str> = out.split(',').filter(|s| !s.is_empty()).collect();
    if all.is_empty() {
        None
    } else if all.iter().all(|s| *s == "true") {
        Some(true)
    } else if all.iter().all(|s| *s == "false") {
        Some(false)
    } else {
        None
    }
}

async fn check(pg: &Postgres, server: &str, cases: &[(Option<&str>, bool, Expect)]) {
    let mut failures = Vec::new();
    for form in [Form::Url, Form::KeyValue] {
        for (n, (mode, ca, expect)) in cases.iter().enumerate() {
            let app = format!("{server}_{form:?}_{n}").to_lowercase();
            let what = format!("{server}, {form:?}, sslmode={mode:?}, CA given: {ca}");
            let result = PostgresBackend::connect_url(&conninfo(pg, form, *mode, *ca, &app)).await;
            match (expect, result) {
                (Expect::Tls | Expect::Plain, Ok(b)) => {
                    b.load("svc").await.unwrap();
                    let want = matches!(expect, Expect::Tls);
                    let got = encrypted(pg, &app);
                    if got != Some(want) {
                        failures.push(format!("{what}: expected {expect:?}, encrypted: {got:?}"));
                    }
                }
                (Expect::Refused(words), Err(e)) => {
                    let text = e.to_string();
                    if let Some(w) = words.iter().find(|w| !text.contains(*w)) {
                        failures.push(format!("{what}: the error lacks {w:?}: {text}"));
                    }
                    if e.is_transient() {
                        failures.push(format!("{what}: a refusal is not worth retrying: {text}"));
                    }
                    if text.contains(pg.password()) {
                        failures.push(format!("{what}: the error shows the password"));
                    }
                }
                (expect, Ok(_)) => failures.push(format!("{what}: expected {expect:?}, connected")),
                (expect, Err(e)) => failures.push(format!("{what}: expected {expect:?}, got: {e}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn a_tls_only_server_is_reached_with_tls_whenever_it_is_asked_for() {
    use Expect::*;
    let pg = tokio::task::spawn_blocking(tls_only).await.unwrap();
    check(
        pg,
        "tls_only",
        &[
            (None, false, Refused(&["only", "TLS", "sslmode"])),
            (Some("disable"), false, Refused(&["only", "TLS", "sslmode"])),
            (Some("prefer"), true, Tls),
            (
                Some("prefer"),
                false,
                Refused(&["certificate", "sslrootcert"]),
            ),
            (Some("require"), true, Tls),
            (
                Some("require"),
                false,
                Refused(&["certificate", "sslrootcert"]),
            ),
            (Some("verify-ca"), true, Tls),
            (Some("verify-full"), true, Tls),
            (
                Some("verify-full"),
                false,
                Refused(&["certificate", "sslrootcert"]),
            ),
            // A CA file alone asks for TLS.
            (None, true, Tls),
            (
                Some("allow"),
                false,
                Refused(&["sslmode=allow", "prefer", "disable"]),
            ),
            (
                Some("disable"),
                true,
                Refused(&["sslmode=disable", "sslrootcert"]),
            ),
        ],
    )
    .await;
    // From parts.
    let b = PostgresBackend::connect(
        PostgresOptions::new()
            .host("127.0.0.1")
            .port(pg.port())
            .password(pg.password())
            .application_name("tls_only_parts")
            .tls(Some(pg.ca_file())),
    )
    .await
    .unwrap();
    b.load("svc").await.unwrap();
    assert_eq!(encrypted(pg, "tls_only_parts"), Some(true));
}

#[tokio::test]
async fn a_server_without_tls_is_reached_in_plaintext_only_where_that_is_allowed() {
    use Expect::*;
    let pg = tokio::task::spawn_blocking(plain).await.unwrap();
    // Start the TLS-only server too: its CA file is the one given.
    tokio::task::spawn_blocking(tls_only).await.unwrap();
    check(
        pg,
        "plain",
        &[
            (None, false, Plain),
            (Some("disable"), false, Plain),
            // The server refuses TLS: `prefer` falls back.
            (Some("prefer"), false, Plain),
            (Some("prefer"), true, Plain),
            (Some("require"), true, Refused(&["does not accept TLS"])),
            (Some("verify-ca"), true, Refused(&["does not accept TLS"])),
            (Some("verify-full"), true, Refused(&["does not accept TLS"])),
            (
                Some("verify-full"),
                false,
                Refused(&["does not accept TLS"]),
            ),
            (None, true, Refused(&["does not accept TLS"])),
        ],
    )
    .await;
}
