//! URL parsing: endpoints, prefix, credentials, TLS, timeouts, and errors
//! that name what is wrong without showing a password.

use std::path::PathBuf;
use std::time::Duration;

use super::EtcdOptions;

fn parse(url: &str) -> EtcdOptions {
    EtcdOptions::from_url(url).unwrap_or_else(|e| panic!("{url}: {e}"))
}

fn refused(url: &str) -> String {
    match EtcdOptions::from_url(url) {
        Ok(o) => panic!("{url} was accepted: {o:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn one_endpoint_gets_the_default_port_and_prefix() {
    let o = parse("etcd://etcd-0");
    assert_eq!(o.endpoints, ["etcd-0:2379"]);
    assert_eq!(o.prefix, "/upsilon");
    assert_eq!(o.endpoint_urls(), ["http://etcd-0:2379"]);
    assert!(!o.tls);
    assert_eq!((o.user, o.password), (None, None));
    assert_eq!(o.connect_timeout, Duration::from_secs(5));
    assert_eq!(o.op_timeout, Duration::from_secs(10));
    assert_eq!(parse("etcd://etcd-0/").prefix, "/upsilon");
}

#[test]
fn several_endpoints_a_prefix_and_credentials() {
    let o =
        parse("etcd://app:s%40cret@10.0.0.1:2379,etcd-1:12379,[::1]:2379,[fe80::1]/ops/upsilon/");
    assert_eq!(
        o.endpoints,
        [
            "10.0.0.1:2379",
            "etcd-1:12379",
            "[::1]:2379",
            "[fe80::1]:2379"
        ]
    );
    assert_eq!(o.prefix, "/ops/upsilon");
    assert_eq!(o.user.as_deref(), Some("app"));
    assert_eq!(o.password.as_deref(), Some("s@cret"));
    assert_eq!(
        o.target(),
        "etcd://10.0.0.1:2379,etcd-1:12379,[::1]:2379,[fe80::1]:2379/ops/upsilon as user `app`"
    );
    assert!(!format!("{o:?}").contains("s@cret"));

    let o = parse("etcd://h:1/p?user=app&password=pw&connect_timeout=2.5&timeout=500ms");
    assert_eq!(
        (o.user.as_deref(), o.password.as_deref()),
        (Some("app"), Some("pw"))
    );
    assert_eq!(o.connect_timeout, Duration::from_millis(2500));
    assert_eq!(o.op_timeout, Duration::from_millis(500));
    assert_eq!(
        parse("etcd://h?timeout=3s").op_timeout,
        Duration::from_secs(3)
    );
}

#[test]
fn tls_by_scheme_parameter_or_ca_file() {
    let o = parse("etcds://etcd-0:2379");
    assert!(o.tls);
    assert_eq!(o.ca_file, None);
    assert_eq!(o.endpoint_urls(), ["https://etcd-0:2379"]);
    assert!(o.target().starts_with("etcds://"));
    let o = parse("etcd://etcd-0?cacert=/etc/etcd/ca.pem");
    assert!(o.tls);
    assert_eq!(o.ca_file, Some(PathBuf::from("/etc/etcd/ca.pem")));
    assert!(parse("etcd://etcd-0?tls=true").tls);
    assert!(!parse("etcd://etcd-0?tls=false").tls);
    assert!(refused("etcds://h?tls=false").contains("drop one of them"));
    assert!(refused("etcd://h?tls=false&cacert=/x").contains("drop one of them"));
    assert!(refused("etcd://h?tls=maybe").contains("not true or false"));
}

#[test]
fn what_is_wrong_is_named_and_no_password_is_shown() {
    for (url, named) in [
        ("http://h:2379", "is not `etcd` or `etcds`"),
        ("h:2379", "expected `etcd://"),
        ("etcd://", "no endpoint"),
        ("etcd://a,,b", "empty endpoint"),
        ("etcd://h:0", "is not 1 to 65535"),
        ("etcd://h:99999", "is not 1 to 65535"),
        ("etcd://h:x", "is not 1 to 65535"),
        ("etcd://h o:1", "is not a host name"),
        ("etcd://h/bad prefix", "key prefix"),
        ("etcd://h/a//b", "key prefix"),
        ("etcd://h/a/../b", "key prefix"),
        ("etcd://h?schema=x", "unknown parameter `schema`"),
        (
            "etcd://h?timeout=0",
            "timeout=\"0\" is not a positive number",
        ),
        ("etcd://h?connect_timeout=soon", "connect_timeout=\"soon\""),
        ("etcd://h?timeout", "has no `=VALUE`"),
        ("etcd://h/%zz", "percent-encoding"),
        ("etcd://:pw@h", "a password without a user"),
        ("etcd://app@h", "a user without a password"),
    ] {
        let err = refused(url);
        assert!(err.contains(named), "{url}: {err}");
        assert!(err.starts_with("invalid etcd URL"), "{url}: {err}");
    }
    let err = refused("etcd://app:hunter2@h:0/x");
    assert!(err.contains("etcd://app:***@h:0/x"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    let err = refused("etcd://h:0?user=app&password=hunter2");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn options_from_parts_are_validated_the_same_way() {
    let ok = EtcdOptions::new()
        .endpoints(["a:1", "b:2"])
        .prefix("/x/y")
        .user("u")
        .password("p")
        .tls(Some("/ca.pem"));
    ok.validate().unwrap();
    assert_eq!(ok.endpoint_urls(), ["https://a:1", "https://b:2"]);
    for (o, named) in [
        (
            EtcdOptions::new().endpoints(Vec::<String>::new()),
            "no endpoint",
        ),
        (EtcdOptions::new().endpoint("nohost"), "is not `HOST:PORT`"),
        (EtcdOptions::new().prefix("upsilon"), "key prefix"),
        (EtcdOptions::new().prefix("/upsilon/"), "key prefix"),
        (EtcdOptions::new().prefix("/"), "key prefix"),
        (
            EtcdOptions::new().password("p"),
            "a password without a user",
        ),
        (
            EtcdOptions::new().op_timeout(Duration::ZERO),
            "must not be zero",
        ),
    ] {
        let err = o.validate().unwrap_err().to_string();
        assert!(err.contains(named), "{named}: {err}");
    }
}
