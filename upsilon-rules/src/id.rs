//! Task ids as stores record them.

use std::fmt;

/// The longest task id, in bytes, that a store has to keep.
pub const MAX_ID_LEN: usize = 128;

/// Checks a task id: 1 to [`MAX_ID_LEN`] bytes of ASCII letters, digits,
/// `_`, `.` and `-`. `#[upsilon::task]` and `Task::new` both apply it.
pub fn check_id(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { len: id.len() });
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(IdError::BadChar { found: c });
    }
    Ok(())
}

/// Why a string is not a task id.
///
/// Displays as a reason that completes "`id` ..." or "an id ...", like
/// "must not be empty".
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdError {
    /// The id is empty.
    Empty,
    /// The id is longer than [`MAX_ID_LEN`] bytes.
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The id holds a character outside `[A-Za-z0-9_.-]`.
    BadChar {
        /// The first such character.
        found: char,
    },
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdError::Empty => f.write_str("must not be empty"),
            IdError::TooLong { len } => write!(
                f,
                "must be at most {MAX_ID_LEN} bytes long; this one has {len}"
            ),
            IdError::BadChar { found } => write!(
                f,
                "may only contain ASCII letters, digits, `_`, `.` and `-`; found {found:?}"
            ),
        }
    }
}

impl std::error::Error for IdError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_ids() {
        assert_eq!(check_id("check-accounts.v2_1"), Ok(()));
        assert_eq!(check_id("a"), Ok(()));
        assert_eq!(check_id(&"a".repeat(MAX_ID_LEN)), Ok(()));
    }

    #[test]
    fn bad_ids_say_why() {
        assert_eq!(check_id(""), Err(IdError::Empty));
        assert_eq!(check_id("").unwrap_err().to_string(), "must not be empty");
        let long = check_id(&"a".repeat(129)).unwrap_err();
        assert_eq!(long, IdError::TooLong { len: 129 });
        assert_eq!(
            long.to_string(),
            "must be at most 128 bytes long; this one has 129"
        );
        assert_eq!(
            check_id("a b").unwrap_err().to_string(),
            "may only contain ASCII letters, digits, `_`, `.` and `-`; found ' '"
        );
        assert_eq!(check_id("café"), Err(IdError::BadChar { found: 'é' }));
        // The length is counted in bytes, and checked before the characters.
        assert_eq!(
            check_id(&"é".repeat(65)),
            Err(IdError::TooLong { len: 130 })
        );
    }
}
