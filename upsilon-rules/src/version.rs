//! Version literals as Upsilon accepts them.

use std::fmt;

use semver::Version;

/// Parses a version the way `#[upsilon::task(version = ..)]` and
/// `upsilon::Builder::app_version` accept it.
///
/// `"1.1"` means `1.1.0`; `"1"` means `1.0.0`; pre-releases (`"2.0.0-rc.1"`) are
/// allowed and order by semver rules. Build metadata (`"1.0.0+abc"`) is
/// rejected: it takes no part in precedence, so two versions that differ only
/// by it would name the same data version. Surrounding whitespace is ignored.
pub fn parse_version(text: &str) -> Result<Version, VersionError> {
    match parse_plain(text) {
        Some(version) => Ok(version),
        None => parse_any(text),
    }
}

/// The common case without allocating: one to three decimal parts, no
/// leading zeros, no pre-release, no surrounding whitespace. `None` sends
/// everything else, errors included, to [`parse_any`], which gives the same
/// version for whatever this accepts.
fn parse_plain(text: &str) -> Option<Version> {
    let mut parts = [0u64; 3];
    for (i, part) in text.as_bytes().split(|&b| b == b'.').enumerate() {
        // A fourth part finds no slot.
        let slot = parts.get_mut(i)?;
        let leading_zero = part.len() > 1 && part[0] == b'0';
        if part.is_empty() || leading_zero {
            return None;
        }
        for &b in part {
            if !b.is_ascii_digit() {
                return None;
            }
            *slot = slot.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        }
    }
    Some(Version::new(parts[0], parts[1], parts[2]))
}

fn parse_any(text: &str) -> Result<Version, VersionError> {
    let bad = |why: &'static str| VersionError {
        text: text.to_owned(),
        why,
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(bad("it is empty"));
    }
    if trimmed.contains('+') {
        return Err(bad(
            "build metadata (`+...`) takes no part in version precedence; remove it",
        ));
    }
    let (core, pre) = match trimmed.split_once('-') {
        Some((core, pre)) => (core, Some(pre)),
        None => (trimmed, None),
    };
    let parts: Vec<&str> = core.split('.').collect();
    if parts.len() > 3 {
        return Err(bad("it has more than three numeric parts"));
    }
    if parts
        .iter()
        .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad(
            "expected `MAJOR[.MINOR[.PATCH]][-PRE]` with numeric parts, like \"1.1\" or \"2.0.0-rc.1\"",
        ));
    }
    if pre.is_some() && parts.len() != 3 {
        return Err(bad(
            "a pre-release needs all three numeric parts, like \"2.0.0-rc.1\"",
        ));
    }
    let mut full = parts.join(".");
    for _ in parts.len()..3 {
        full.push_str(".0");
    }
    if let Some(pre) = pre {
        full.push('-');
        full.push_str(pre);
    }
    Version::parse(&full).map_err(|_| bad("it is not a valid semantic version"))
}

/// A version literal that could not be parsed.
///
/// Displays as "`TEXT` is not a version: REASON".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionError {
    text: String,
    why: &'static str,
}

impl fmt::Display for VersionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` is not a version: {}", self.text, self.why)
    }
}

impl std::error::Error for VersionError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_forms_are_completed() {
        for (text, full) in [
            ("1", Version::new(1, 0, 0)),
            ("1.1", Version::new(1, 1, 0)),
            ("1.1.3", Version::new(1, 1, 3)),
            ("1.0.0", Version::new(1, 0, 0)),
            (" 1.2 ", Version::new(1, 2, 0)),
        ] {
            assert_eq!(parse_version(text), Ok(full), "{text:?}");
        }
        let rc = parse_version("2.0.0-rc.1").unwrap();
        assert_eq!(rc.to_string(), "2.0.0-rc.1");
        assert_eq!(rc.pre.as_str(), "rc.1");
    }

    #[test]
    fn the_plain_form_parses_as_the_general_parser_does() {
        let texts = [
            "0",
            "1",
            "10",
            "1.2",
            "1.2.3",
            "0.0.0",
            "18446744073709551615.1",
            "18446744073709551616",
            "01",
            "1.01",
            "1.0.00",
            "1.",
            ".1",
            "1..2",
            "1.2.3.4",
            "1.2.3.",
            " 1.2",
            "1.2 ",
            "+1",
            "-1",
            "1.2.3-rc.1",
            "1.2.3+b",
            "1.x",
            "",
            "٣",
            "1_000",
        ];
        for text in texts {
            if let Some(plain) = parse_plain(text) {
                assert_eq!(parse_any(text), Ok(plain), "{text:?}");
            }
            assert_eq!(parse_version(text), parse_any(text), "{text:?}");
        }
        for text in ["0", "1.2", "1.2.3", "18446744073709551615.1"] {
            assert!(parse_plain(text).is_some(), "{text:?}");
        }
        for text in [
            "01",
            "1.",
            "1.2.3.4",
            " 1",
            "1.2.3-rc.1",
            "18446744073709551616",
        ] {
            assert!(parse_plain(text).is_none(), "{text:?}");
        }
    }

    #[test]
    fn bad_literals_name_the_problem() {
        for (text, needle) in [
            ("v1", "numeric parts"),
            ("1.x", "numeric parts"),
            ("1..0", "numeric parts"),
            ("1.0.0+build.5", "build metadata"),
            ("1.0.0+build", "build metadata"),
            ("", "empty"),
            ("  ", "empty"),
            ("1.0.0.0", "more than three"),
            ("1.0-rc.1", "all three numeric parts"),
            ("01.0.0", "not a valid semantic version"),
            ("01.0", "not a valid semantic version"),
            ("1.0.0-rc.01", "not a valid semantic version"),
        ] {
            let err = parse_version(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(
                err.starts_with(&format!("`{text}` is not a version: ")),
                "{text:?}: {err}"
            );
        }
    }
}
