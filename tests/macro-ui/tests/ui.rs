//! Compile-time behaviour of `#[upsilon::task]`: what compiles, and the
//! message and span of every error. `TRYBUILD=overwrite` regenerates the
//! `.stderr` files.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("ui/pass/*.rs");
    t.compile_fail("ui/fail/*.rs");
}
