//! What a command prints, and the one place that prints it: every string
//! passes through [`Secrets::clean`] on its way out.

use std::io::Write as _;
use std::process::ExitCode;

use serde::Serialize;

use crate::exit::{Code, Failure};
use crate::json::{ErrorBody, ErrorJson};

/// A command's answer: its `--json` text, its text, and its exit code
/// (not always [`Code::Ok`]: a refused baseline still says what it found).
#[derive(Debug, Clone)]
pub(crate) struct Output {
    /// Serialised from the command's typed shape, so fields keep their
    /// documented order.
    pub(crate) json: String,
    pub(crate) text: String,
    pub(crate) code: Code,
}

impl Output {
    pub(crate) fn new(json: impl Serialize, text: String) -> Output {
        Output {
            json: to_json(&json),
            text,
            code: Code::Ok,
        }
    }

    pub(crate) fn with_code(mut self, code: Code) -> Output {
        self.code = code;
        self
    }
}

/// The credentials in a backend URL, kept out of everything printed. The
/// backends already leave passwords out of their messages; this is the
/// second line.
#[derive(Debug, Clone, Default)]
pub(crate) struct Secrets(Vec<String>);

impl Secrets {
    /// The password of `url`, from its user info or a `password=` option,
    /// as written and percent-decoded.
    pub(crate) fn from_url(url: &str) -> Secrets {
        let mut found = Vec::new();
        if let Some((_, rest)) = url.split_once("://") {
            let authority = rest.split(['/', '?']).next().unwrap_or_default();
            if let Some((userinfo, _)) = authority.rsplit_once('@') {
                if let Some((_, pw)) = userinfo.split_once(':') {
                    found.push(pw.to_owned());
                }
            }
        }
        if let Some((_, query)) = url.split_once('?') {
            for pair in query.split('&') {
                if let Some(pw) = pair.strip_prefix("password=") {
                    found.push(pw.to_owned());
                }
            }
        }
        // libpq's `key=value` form.
        for word in url.split_whitespace() {
            if let Some(pw) = word.strip_prefix("password=") {
                found.push(pw.trim_matches('\'').to_owned());
            }
        }
        let mut all: Vec<String> = found.iter().filter_map(|p| decode(p)).collect();
        all.extend(found);
        // Very short secrets would garble every message they occur in by
        // chance; the backends' own redaction covers them.
        all.retain(|s| s.len() >= 4);
        all.sort_by_key(|s| std::cmp::Reverse(s.len()));
        all.dedup();
        Secrets(all)
    }

    pub(crate) fn clean(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in &self.0 {
            out = out.replace(secret.as_str(), "***");
        }
        out
    }

    /// [`Secrets::clean`] for JSON text, where a secret may appear escaped.
    pub(crate) fn clean_json(&self, json: &str) -> String {
        let mut out = self.clean(json);
        for secret in &self.0 {
            let escaped = to_json(secret);
            let escaped = escaped.trim_matches('"');
            if escaped != secret {
                out = out.replace(escaped, "***");
            }
        }
        out
    }
}

fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|d| d != s)
}

/// Prints a command's result (JSON on stdout with `json`; text on stdout,
/// failures on stderr without) and returns its exit code.
pub(crate) fn emit(result: Result<Output, Failure>, json: bool, secrets: &Secrets) -> ExitCode {
    let code = match &result {
        Ok(out) => out.code,
        Err(f) => f.code,
    };
    match result {
        Ok(out) if json => print_json(&out.json, secrets),
        Ok(out) => {
            let text = secrets.clean(&out.text);
            let mut stdout = std::io::stdout().lock();
            let _ = write!(stdout, "{text}");
            if !text.ends_with('\n') {
                let _ = writeln!(stdout);
            }
        }
        Err(f) if json => print_json(&error_json(f), secrets),
        Err(f) => eprintln!("error: {}", secrets.clean(&f.message)),
    }
    code.into()
}

/// Prints one line of JSON.
pub(crate) fn print_json(json: &str, secrets: &Secrets) {
    println!("{}", secrets.clean_json(json));
}

/// The `--json` shape of a failure.
pub(crate) fn error_json(f: Failure) -> String {
    to_json(&ErrorJson {
        error: ErrorBody {
            kind: f.code.name(),
            exit: f.code.number(),
            message: f.message,
        },
    })
}

fn to_json(value: &impl Serialize) -> String {
    // The shapes are plain structs of strings and numbers: they always
    // serialise.
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_found_in_every_form_a_url_carries_them() {
        let s = Secrets::from_url("postgres://app:s3cr%40t@db:5432/x?sslmode=require");
        assert_eq!(s.clean("auth s3cr@t and s3cr%40t"), "auth *** and ***");
        let s = Secrets::from_url("postgresql://app@db/x?password=hunter22&schema=a");
        assert_eq!(s.clean("hunter22!"), "***!");
        let s = Secrets::from_url("host=db user=app password='topsecret'");
        assert_eq!(s.clean("topsecret"), "***");
        assert!(Secrets::from_url("sqlite:///tmp/a.db").0.is_empty());
        let s = Secrets::from_url("postgres://u:qu%22ote@h/d");
        assert_eq!(s.clean_json(&to_json(&"a qu\"ote")), "\"a ***\"");
    }
}
