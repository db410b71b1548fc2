//! The `#[upsilon::task]` attribute. An implementation detail of `upsilon`: use that crate.

use proc_macro::TokenStream;

mod task;

/// Registers an async fn as an upgrade task. See `upsilon::task`.
#[proc_macro_attribute]
pub fn task(args: TokenStream, item: TokenStream) -> TokenStream {
    task::expand(args.into(), item.into()).into()
}
