//! The rules for version literals and task ids, shared by `upsilon` (at run
//! time) and `upsilon-macros` (at compile time), so that both accept exactly
//! the same inputs. An implementation detail of `upsilon`: use that crate.

#![warn(missing_docs)]
#![deny(unreachable_pub)]

mod id;
mod version;

pub use id::{check_id, IdError, MAX_ID_LEN};
pub use version::{parse_version, VersionError};
