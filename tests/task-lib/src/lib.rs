//! Tasks in a separate library crate.
