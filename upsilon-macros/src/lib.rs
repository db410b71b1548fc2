//! The `#[upsilon::task]` attribute. An implementation detail of `upsilon`: use that crate.

#![deny(unreachable_pub)]

use proc_macro::TokenStream;

mod task;

/// Registers an async fn as an upgrade task.
///
/// ```no_run
/// use upsilon::TaskContext;
///
/// /// Copies legacy rows into the new table.
/// #[upsilon::task(version = "1.1", order = 1)]
/// async fn backfill_accounts(ctx: &mut TaskContext) -> Result<(), std::io::Error> {
///     ctx.progress(0, 100, "copying");
///     Ok(())
/// }
///
/// #[upsilon::task(version = "1.1", order = 2, id = "check-accounts", rollback = undo_check)]
/// async fn check(ctx: &mut TaskContext) -> anyhow::Result<()> {
///     Ok(())
/// }
///
/// async fn undo_check(ctx: &mut TaskContext) -> anyhow::Result<()> {
///     Ok(())
/// }
/// ```
///
/// The fn must be `async fn name(ctx: &mut TaskContext) -> Result<(), E>`,
/// where `E` converts into `Box<dyn Error + Send + Sync>` (`anyhow::Error`
/// and most error types do), and its future must be `Send`. Its doc comment
/// becomes the task's description.
///
/// Arguments:
/// - `version` (required): the release the task belongs to, a string:
///   `"1.1"` means `1.1.0`, pre-releases like `"2.0.0-rc.1"` are allowed,
///   build metadata is not.
/// - `order` (required): the task's place among the tasks of its version, a
///   `u32`. Tasks run by version, then `order`, then id.
/// - `id`: what stores record the task as; the fn name unless given. 1 to 128
///   characters of `A-Z`, `a-z`, `0-9`, `_`, `.` and `-`.
/// - `rollback`: the path of an async fn of the same shape that undoes the task.
/// - `crate`: the path to `upsilon` as a string, for crates that re-export it
///   (`crate = "my_framework::upsilon"`).
///
/// Every mistake in the arguments or in the fn's shape is a compile error on
/// the offending token, all reported at once.
///
/// The attribute also adds a `#[test]` to the crate that defines the task.
/// It fails when another task linked into the same test binary has the same
/// version and `order`, or the same version and id, and names both.
#[proc_macro_attribute]
pub fn task(args: TokenStream, item: TokenStream) -> TokenStream {
    task::expand(args.into(), item.into()).into()
}
