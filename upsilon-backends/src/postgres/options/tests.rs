//! Parsing and validating connection options.

use super::*;

#[test]
fn identifiers_are_allow_listed() {
    for good in ["upsilon_state", "_x", "a", &"a".repeat(63), "t1"] {
        check_identifier("table", good).unwrap();
    }
    for bad in [
        "",
        "1abc",
        "Upsilon",
        "a-b",
        "a b",
        "x\"; DROP TABLE y; --",
        "tä",
        &"a".repeat(64),
    ] {
        let err = check_identifier("table", bad).unwrap_err().to_string();
        assert!(err.contains("is not allowed"), "{bad:?}: {err}");
    }
}

#[test]
fn url_options_are_taken_out_and_passwords_never_shown() {
    let o = PostgresOptions::from_url(
        "postgresql://app:s3cret@db.example:6432/app?schema=ops&pgbouncer=true&application_name=web",
    )
    .unwrap();
    assert_eq!(o.schema, "ops");
    assert!(o.transaction_pooling);
    assert_eq!(o.config.get_application_name(), Some("web"));
    assert_eq!(o.target(), "db.example:6432/app as user `app`");
    let shown = format!("{o:?}");
    assert!(!shown.contains("s3cret"), "{shown}");

    let err = PostgresOptions::from_url("postgres://app:s3cret@db:notaport/app")
        .err()
        .unwrap()
        .to_string();
    assert!(!err.contains("s3cret"), "{err}");
    assert!(err.contains("postgres://app:***@db:notaport/app"), "{err}");

    let err = PostgresOptions::from_url("postgres://app:s3cret@db/app?sslmode=sometimes")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("sslmode=\"sometimes\""), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

#[test]
fn sslmode_is_honoured_in_every_form() {
    for (s, mode) in [
        ("postgres://h/db?sslmode=require", SslMode::Require),
        ("host=h dbname=db sslmode=require", SslMode::Require),
        ("host=h dbname=db sslmode = verify-full", SslMode::Require),
        ("postgres://h/db?sslmode=prefer", SslMode::Prefer),
        ("host=h sslmode=prefer", SslMode::Prefer),
        ("host=h sslrootcert=/ca.pem", SslMode::Require),
    ] {
        let o = PostgresOptions::from_url(s).unwrap();
        assert_eq!(o.config.get_ssl_mode(), mode, "{s}");
        #[cfg(feature = "postgres-rustls")]
        assert!(matches!(o.tls, TlsChoice::Rustls { .. }), "{s}");
        #[cfg(not(feature = "postgres-rustls"))]
        {
            let err = o.validate().unwrap_err().to_string();
            assert!(
                err.contains("postgres-rustls") && err.contains("sslmode=disable"),
                "{err}"
            );
        }
    }
    for s in [
        "postgres://h/db",
        "host=h",
        "host=h sslmode=disable",
        "postgres://h/db?sslmode=disable",
    ] {
        let o = PostgresOptions::from_url(s).unwrap();
        assert_eq!(o.config.get_ssl_mode(), SslMode::Disable, "{s}");
        assert_eq!(o.tls, TlsChoice::Off, "{s}");
    }
    for (s, says) in [
        ("host=h sslmode=allow", "use sslmode=prefer"),
        (
            "host=h sslmode=disable sslrootcert=/ca.pem",
            "drop one of them",
        ),
        ("host=h sslmode=sometimes", "is not one of"),
    ] {
        let err = PostgresOptions::from_url(s).err().unwrap().to_string();
        assert!(err.contains(says), "{s}: {err}");
    }
}

#[test]
fn a_url_without_a_user_names_no_made_up_one() {
    let o = PostgresOptions::from_url("postgres://db.example/app").unwrap();
    assert_eq!(
        o.target(),
        "db.example:5432/app as this process's operating-system user"
    );
}

#[test]
fn parts_have_defaults() {
    let o = PostgresOptions::new().host("h").user("u").dbname("d");
    assert_eq!(o.target(), "h:5432/d as user `u`");
    o.validate().unwrap();
    assert_eq!(
        (o.ping_every, o.ping_timeout, o.takeover_grace),
        (
            Duration::from_millis(100),
            Duration::from_millis(200),
            Duration::from_millis(600)
        )
    );
    let same = PostgresOptions::new().tables("t", "t", "h");
    assert!(same.validate().is_err());
    for (o, named) in [
        (
            PostgresOptions::new().takeover_grace(Duration::from_millis(300)),
            "takeover grace",
        ),
        (
            PostgresOptions::new().holder_ping_timeout(Duration::from_millis(500)),
            "takeover grace",
        ),
        (
            PostgresOptions::new().holder_ping_every(Duration::ZERO),
            "must not be zero",
        ),
    ] {
        let err = o.validate().unwrap_err().to_string();
        assert!(err.contains(named), "{err}");
    }
    PostgresOptions::new()
        .holder_ping_every(Duration::from_millis(50))
        .holder_ping_timeout(Duration::from_millis(100))
        .takeover_grace(Duration::from_millis(151))
        .validate()
        .unwrap();
    let reserved = PostgresOptions::new().schema("pg_catalog");
    assert!(reserved
        .validate()
        .unwrap_err()
        .to_string()
        .contains("reserved"));
}
