//! Version literals as Upsilon accepts them. The rules live in
//! `upsilon-rules`, which `#[upsilon::task]` applies too.

pub use upsilon_rules::{parse_version, VersionError};
