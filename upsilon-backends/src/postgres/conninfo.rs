//! Connection strings as libpq takes them (`postgres://` URLs and
//! `key=value` strings): the keys Upsilon handles itself taken out (its own
//! `schema` and `pgbouncer`, and `sslmode`, `sslrootcert` and `password`,
//! which the driver would drop or mishandle), the rest given to the driver,
//! and every form shown without its password.

use std::str::FromStr;

use tokio_postgres::Config;

/// A parsed connection string.
#[derive(Debug)]
pub(super) struct ConnInfo {
    /// What the driver understood of it.
    pub(super) config: Config,
    pub(super) schema: Option<String>,
    pub(super) pgbouncer: Option<String>,
    pub(super) sslmode: Option<String>,
    pub(super) sslrootcert: Option<String>,
}

/// Parses `s`. The error says what is wrong without repeating any value,
/// so that it never shows a password.
pub(super) fn parse(s: &str) -> Result<ConnInfo, String> {
    if let Some((scheme, rest)) = url_parts(s) {
        parse_url(scheme, rest)
    } else {
        parse_key_values(s)
    }
}

/// The options the driver knows besides those Upsilon takes itself. An
/// option not in the list is refused without being named: in a `key=value`
/// string whose password was not quoted, it may be the password's tail.
const DRIVER_KEYS: &[&str] = &[
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "sslnegotiation",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];

fn known(key: &str) -> Result<(), String> {
    if DRIVER_KEYS.contains(&key) {
        Ok(())
    } else {
        Err(
            "an option is not one that libpq and Upsilon both know (not shown, as it may be part of a password)"
                .to_owned(),
        )
    }
}

/// `s` for messages: any password replaced by `***`. In a URL, a
/// `password=` parameter and everything after it is hidden, and so is
/// everything from the user name to the last `@`: a password whose `@`, `/`,
/// `?` or `&` was not percent-encoded is hidden too. A `key=value` string
/// that does not parse is not shown at all, nor is one with an option
/// Upsilon does not know.
pub(super) fn redact(s: &str) -> String {
    if let Some((scheme, rest)) = url_parts(s) {
        let cut = rest.match_indices(['?', '&']).map(|(i, _)| i).find(|&i| {
            let pair = &rest[i + 1..];
            let key = pair.split_once('=').map_or(pair, |(k, _)| k);
            percent_decode(key).as_deref() == Some("password")
        });
        let (rest, hidden) = match cut {
            Some(i) => (&rest[..i], format!("{}password=***", &rest[i..=i])),
            None => (rest, String::new()),
        };
        let (user, rest) = match rest.rfind('@') {
            Some(at) => {
                let head = &rest[..at];
                let user = head.split([':', '@', '/', '?']).next().unwrap_or_default();
                if user == head {
                    (format!("{head}@"), &rest[at + 1..])
                } else {
                    (format!("{user}:***@"), &rest[at + 1..])
                }
            }
            None => (String::new(), rest),
        };
        return format!("{scheme}{user}{rest}{hidden}");
    }
    match key_values(s) {
        Ok(pairs)
            if pairs.iter().all(|(k, _)| {
                known(k).is_ok()
                    || ["schema", "pgbouncer", "sslmode", "sslrootcert"].contains(&k.as_str())
            }) =>
        {
            pairs
                .iter()
                .map(|(k, v)| {
                    if k == "password" {
                        format!("{k}=***")
                    } else {
                        format!("{k}={}", quote(v))
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        }
        _ => "(a connection string that does not parse; not shown, as it may hold a password)"
            .to_owned(),
    }
}

fn url_parts(s: &str) -> Option<(&'static str, &str)> {
    ["postgres://", "postgresql://"]
        .into_iter()
        .find_map(|scheme| s.strip_prefix(scheme).map(|rest| (scheme, rest)))
}

fn parse_url(scheme: &str, rest: &str) -> Result<ConnInfo, String> {
    let (base, query) = match rest.split_once('?') {
        Some((b, q)) => (b, q),
        None => (rest, ""),
    };
    // The driver takes everything before the first `@` as the user and
    // password: a second one means an `@` in them that is not encoded.
    if base.matches('@').count() > 1 {
        return Err(
            "the user name or password holds an `@`: percent-encode it as `%40`".to_owned(),
        );
    }
    let mut info = ConnInfo {
        config: Config::new(),
        schema: None,
        pgbouncer: None,
        sslmode: None,
        sslrootcert: None,
    };
    let mut password = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key)
            .ok_or_else(|| "a parameter name is not valid percent-encoding".to_owned())?;
        let value = percent_decode(value)
            .ok_or_else(|| format!("the value of `{key}` is not valid percent-encoding"))?;
        if key == "password" {
            password = Some(value);
        } else if !info.take(&key, &value) {
            known(&key)?;
            // Encoded again, so that no `@`, `&` or `=` in a value misleads
            // the driver's parser.
            kept.push(format!(
                "{}={}",
                percent_encode(&key),
                percent_encode(&value)
            ));
        }
    }
    let mut rebuilt = format!("{scheme}{base}");
    if !kept.is_empty() {
        rebuilt.push('?');
        rebuilt.push_str(&kept.join("&"));
    }
    info.config = Config::from_str(&rebuilt).map_err(|e| e.to_string())?;
    if let Some(p) = password {
        info.config.password(p);
    }
    Ok(info)
}

fn parse_key_values(s: &str) -> Result<ConnInfo, String> {
    let mut info = ConnInfo {
        config: Config::new(),
        schema: None,
        pgbouncer: None,
        sslmode: None,
        sslrootcert: None,
    };
    let mut kept = Vec::new();
    for (key, value) in key_values(s)? {
        if !info.take(&key, &value) {
            known(&key)?;
            kept.push(format!("{key}={}", quote(&value)));
        }
    }
    info.config = Config::from_str(&kept.join(" ")).map_err(|e| e.to_string())?;
    Ok(info)
}

impl ConnInfo {
    /// Takes `key` if Upsilon handles it itself.
    fn take(&mut self, key: &str, value: &str) -> bool {
        let slot = match key {
            "schema" => &mut self.schema,
            "pgbouncer" => &mut self.pgbouncer,
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            _ => return false,
        };
        *slot = Some(value.to_owned());
        true
    }
}

/// The pairs of a libpq `key=value` string: spaces around `=` allowed,
/// values plain or in single quotes, `\` escaping the next character.
/// Errors name byte offsets only, never the text.
fn key_values(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut it = s.char_indices().peekable();
    let skip_ws = |it: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while it.peek().is_some_and(|(_, c)| c.is_whitespace()) {
            it.next();
        }
    };
    loop {
        skip_ws(&mut it);
        let Some(&(start, _)) = it.peek() else {
            return Ok(out);
        };
        let mut key = String::new();
        while let Some(&(_, c)) = it.peek() {
            if c.is_whitespace() || c == '=' {
                break;
            }
            key.push(c);
            it.next();
        }
        skip_ws(&mut it);
        match it.next() {
            Some((_, '=')) => {}
            _ => {
                return Err(format!(
                    "expected `key=value` pairs or a `postgres://` URL; the text at byte {start} is not followed by `=`"
                ))
            }
        }
        skip_ws(&mut it);
        let mut value = String::new();
        if it.peek().is_some_and(|(_, c)| *c == '\'') {
            it.next();
            loop {
                match it.next() {
                    Some((_, '\'')) => break,
                    Some((_, '\\')) => value.extend(it.next().map(|(_, c)| c)),
                    Some((_, c)) => value.push(c),
                    None => {
                        return Err(format!(
                            "the quoted value of the parameter at byte {start} is not closed"
                        ))
                    }
                }
            }
        } else {
            while let Some(&(_, c)) = it.peek() {
                if c.is_whitespace() {
                    break;
                }
                it.next();
                if c == '\\' {
                    value.extend(it.next().map(|(_, c)| c));
                } else {
                    value.push(c);
                }
            }
            if value.is_empty() {
                return Err(format!("the parameter at byte {start} has no value"));
            }
        }
        out.push((key, value));
    }
}

/// A value for a `key=value` string: quoted, `'` and `\` escaped.
fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

pub(super) fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsilons_keys_are_taken_out_of_both_forms() {
        for s in [
            "postgres://u:pw@h:6432/db?schema=ops&pgbouncer=true&sslmode=verify-full&sslrootcert=/ca%20dir/ca.pem&application_name=a%40b",
            "host=h port = 6432 user=u password='pw' dbname=db schema=ops pgbouncer=true sslmode=verify-full sslrootcert='/ca dir/ca.pem' application_name=a@b",
        ] {
            let info = parse(s).unwrap();
            assert_eq!(info.schema.as_deref(), Some("ops"), "{s}");
            assert_eq!(info.pgbouncer.as_deref(), Some("true"), "{s}");
            assert_eq!(info.sslmode.as_deref(), Some("verify-full"), "{s}");
            assert_eq!(info.sslrootcert.as_deref(), Some("/ca dir/ca.pem"), "{s}");
            assert_eq!(info.config.get_user(), Some("u"), "{s}");
            assert_eq!(info.config.get_password(), Some(&b"pw"[..]), "{s}");
            assert_eq!(info.config.get_dbname(), Some("db"), "{s}");
            assert_eq!(info.config.get_ports(), &[6432], "{s}");
            assert_eq!(info.config.get_application_name(), Some("a@b"), "{s}");
        }
    }

    #[test]
    fn a_password_in_the_query_is_taken_by_upsilon() {
        let info = parse("postgres://u@h/db?password=p%40ss&application_name=x").unwrap();
        assert_eq!(info.config.get_password(), Some(&b"p@ss"[..]));
        assert_eq!(info.config.get_user(), Some("u"));
        let info = parse("postgres://h/db?password=p@ss").unwrap();
        assert_eq!(info.config.get_password(), Some(&b"p@ss"[..]));
        assert_eq!(info.config.get_user(), None);
    }

    #[test]
    fn passwords_are_never_shown() {
        for (s, shown) in [
            ("postgres://u:s3cret@h/db", "postgres://u:***@h/db"),
            (
                "postgresql://u:s3%2Fcr%40et@h/db",
                "postgresql://u:***@h/db",
            ),
            ("postgres://u:s3/cret@h/db", "postgres://u:***@h/db"),
            (
                "postgres://u@h/db?password=s3cret&sslmode=require",
                "postgres://u@h/db?password=***",
            ),
            (
                "postgres://u@h/db?sslmode=require&password=s3cret",
                "postgres://u@h/db?sslmode=require&password=***",
            ),
            (
                "postgres://u@h/db?pass%77ord=s3cret",
                "postgres://u@h/db?password=***",
            ),
            (
                "host=h password = 's3 cret' dbname=d",
                "host='h' password=*** dbname='d'",
            ),
            ("host=h password=s3cret", "host='h' password=***"),
            ("postgres://u:s3?cr@et@h/db", "postgres://u:***@h/db"),
            (
                "postgres://u:s3?c=r&et@h/db?sslmode=require",
                "postgres://u:***@h/db?sslmode=require",
            ),
            (
                "postgres://u@h/db?password=s3@cret",
                "postgres://u@h/db?password=***",
            ),
        ] {
            assert_eq!(redact(s), shown, "{s}");
        }
        for s in ["host=h password='s3cret", "host=h password=s3 cr=et"] {
            let hidden = redact(s);
            assert!(!hidden.contains("s3") && !hidden.contains("cr"), "{hidden}");
        }
    }

    #[test]
    fn errors_repeat_no_value() {
        for s in [
            "host=h password='s3cret",
            "host=h password=s3 cret",
            "host=h password=s3 cr=et",
            "postgres://u@h/db?password=s3&cr=et",
            "postgres://u:s3@cret@h/db",
            "postgres://u@h/db?password=s3cret%zz",
            "s3cret",
        ] {
            let err = parse(s).unwrap_err();
            assert!(!err.contains("s3") && !err.contains("cret"), "{s}: {err}");
        }
    }
}
