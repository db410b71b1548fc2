//! Backends for Upsilon.
