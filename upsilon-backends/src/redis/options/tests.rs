use std::path::Path;
use std::time::Duration;

use super::*;

fn err(url: &str) -> String {
    RedisOptions::from_url(url).unwrap_err().to_string()
}

#[test]
fn urls_give_address_user_database_and_prefix() {
    let o = RedisOptions::from_url("redis://app:s3cret@cache.internal:6380/2?prefix=ops").unwrap();
    assert_eq!(
        o.info.addr(),
        &ConnectionAddr::Tcp("cache.internal".into(), 6380)
    );
    let r = o.info.redis_settings();
    assert_eq!(
        (r.username(), r.password(), r.db()),
        (Some("app"), Some("s3cret"), 2)
    );
    assert_eq!(o.key_prefix(), "ops");
    assert_eq!(o.target(), "cache.internal:6380 db 2 as user `app`");

    let d = RedisOptions::from_url("redis://localhost").unwrap();
    assert_eq!(
        d.info.addr(),
        &ConnectionAddr::Tcp("localhost".into(), 6379)
    );
    assert_eq!(
        (d.key_prefix(), d.info.redis_settings().db()),
        ("upsilon", 0)
    );
    assert_eq!(d.op_timeout, Duration::from_secs(5));

    let t = RedisOptions::from_url("redis://h/?timeout_ms=250&connect_timeout_ms=900").unwrap();
    assert_eq!(
        (t.op_timeout, t.connect_timeout),
        (Duration::from_millis(250), Duration::from_millis(900))
    );
    // A password only, percent-encoded.
    let p = RedisOptions::from_url("redis://:p%40ss@h").unwrap();
    assert_eq!(p.info.redis_settings().password(), Some("p@ss"));
}

#[test]
fn tls_urls_verify_and_take_a_ca_file() {
    let o = RedisOptions::from_url("rediss://cache:6390/0?ca_file=/etc/ssl/redis-ca.pem").unwrap();
    assert!(matches!(
        o.info.addr(),
        ConnectionAddr::TcpTls { host, port: 6390, insecure: false, .. } if host == "cache"
    ));
    assert_eq!(o.ca_file(), Some(Path::new("/etc/ssl/redis-ca.pem")));
    assert!(o.target().contains("(TLS)"), "{}", o.target());
    o.validate().unwrap();

    assert!(err("rediss://cache/#insecure").contains("ca_file"));
    assert!(err("redis://cache/?ca_file=/x.pem").contains("rediss://"));
    let parts = RedisOptions::new()
        .host("cache")
        .tls(Some("/ca.pem"))
        .port(7000);
    assert!(matches!(
        parts.info.addr(),
        ConnectionAddr::TcpTls { port: 7000, .. }
    ));
    parts.validate().unwrap();
}

#[test]
fn unix_sockets() {
    let o = RedisOptions::from_url("redis+unix:///run/redis/redis.sock?db=3&pass=s3cret").unwrap();
    assert_eq!(
        o.info.addr(),
        &ConnectionAddr::Unix("/run/redis/redis.sock".into())
    );
    assert_eq!(o.info.redis_settings().db(), 3);
    assert_eq!(o.info.redis_settings().password(), Some("s3cret"));
    assert!(!format!("{o:?}").contains("s3cret"));
}

#[test]
fn bad_urls_say_what_is_wrong_without_the_password() {
    for (url, says) in [
        ("mysql://u:s3cret@h/db", "redis://, rediss://"),
        ("redis://u:s3cret@h/?prefx=ops", "unknown parameter `prefx`"),
        ("redis://u:s3cret@h/x", "database"),
        ("redis://u:s3cret@h/?timeout_ms=soon", "timeout_ms"),
        ("redis://u:s3cret@h/?timeout_ms=0", "timeout_ms"),
        ("redis://u:s3cret@h/#frag", "#frag"),
        ("redis+unix://?pass=s3cret", "socket"),
        ("redis:u:s3cret", "host"),
    ] {
        let e = err(url);
        assert!(e.contains(says), "{url}: {e}");
        assert!(!e.contains("s3cret"), "{url}: {e}");
    }
}

#[test]
fn prefixes_are_checked() {
    for bad in [
        "",
        "a{b",
        "a}b",
        "a*",
        "a?b",
        "a[b]",
        "a b",
        &"x".repeat(65),
    ] {
        let e = RedisOptions::new().prefix(bad).validate().unwrap_err();
        assert!(e.to_string().contains("key prefix"), "{bad:?}: {e}");
    }
    for good in ["upsilon", "app:upsilon", "team-a.svc_1"] {
        RedisOptions::new().prefix(good).validate().unwrap();
    }
    let e = RedisOptions::new()
        .op_timeout(Duration::ZERO)
        .validate()
        .unwrap_err();
    assert!(e.to_string().contains("timeout"), "{e}");
    let e = RedisOptions::new()
        .tls(None::<&str>)
        .unix_socket("/s")
        .validate();
    assert!(e.is_ok(), "a socket without a CA file is fine");
    let mut o = RedisOptions::new();
    o.ca_file = Some("/ca.pem".into());
    assert!(o.validate().unwrap_err().to_string().contains("TLS"));
}

#[test]
fn passwords_never_reach_messages() {
    assert_eq!(
        redact("redis://app:s3cret@cache:6379/0"),
        "redis://app:***@cache:6379/0"
    );
    assert_eq!(
        redact("redis+unix:///run/r.sock?db=1&pass=s3cret&prefix=x"),
        "redis+unix:///run/r.sock?db=1&pass=***&prefix=x"
    );
    assert_eq!(
        redact("redis+unix:///run/r.sock?pass=s3cret"),
        "redis+unix:///run/r.sock?pass=***"
    );
    assert_eq!(redact("redis:app:s3cret@cache"), "redis:***");
    let o = RedisOptions::new().password("s3cret").username("app");
    assert!(!format!("{o:?}").contains("s3cret"));
    assert_eq!(o.target(), "127.0.0.1:6379 db 0 as user `app`");
}
