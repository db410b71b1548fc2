//! `#[upsilon::task]`: parse the arguments ([`attr`]), check the fn
//! ([`signature`]), and register it with `inventory` through
//! `upsilon::__private` ([`expand`](mod@expand)).
//!
//! Every problem is collected before anything is returned, so the user sees
//! all of them at once. On error the fn is still emitted unchanged, followed
//! by the errors, so that one mistake does not turn into "cannot find
//! function" wherever the fn is used.

use std::cell::RefCell;
use std::fmt::Display;

use proc_macro2::{Span, TokenStream};
use quote::{quote, ToTokens};
use syn::parse::{Parse, ParseStream};
use syn::{Attribute, Signature, Visibility};

use attr::{default_id, Args, Attrs};
use expand::Task;
use signature::check_signature;

mod attr;
mod expand;
mod signature;

/// What a task fn looks like, for messages about the fn's shape.
const SHAPE: &str = "async fn name(ctx: &mut upsilon::TaskContext) -> Result<(), E>";

pub(crate) fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let cx = Ctxt::new();
    let args = match syn::parse2::<Args>(args) {
        Ok(args) => Some(args),
        Err(err) => {
            cx.syn_error(err);
            None
        }
    };
    let func = match syn::parse2::<TaskFn>(item.clone()) {
        Ok(func) => func,
        Err(_) => {
            cx.error_spanned_by(
                &item,
                format!("`#[upsilon::task]` goes on an async fn: `{SHAPE}`"),
            );
            return with_errors(item, cx);
        }
    };
    let attrs = args.map(|args| Attrs::from_args(&cx, args));
    check_signature(&cx, &func.sig);
    let id = match &attrs {
        Some(Attrs {
            id, id_given: true, ..
        }) => id.clone(),
        _ => default_id(&cx, &func.sig.ident),
    };
    match (attrs, id) {
        (
            Some(Attrs {
                version: Some(version),
                order: Some(order),
                rollback,
                krate,
                ..
            }),
            Some(id),
        ) if cx.is_clean() => {
            cx.check().expect("no errors were recorded");
            let task = Task {
                func: &func,
                version,
                order,
                id,
                rollback,
                krate,
            };
            let expanded = task.expand();
            quote!(#item #expanded)
        }
        _ => with_errors(item, cx),
    }
}

/// The fn under the attribute, parsed as `syn::ItemFn` parses it except
/// for its statements: the macro reads the attributes and the signature
/// only, and emits the fn's tokens unchanged, so the compiler is the one
/// to parse (and report errors in) the body.
pub(super) struct TaskFn {
    /// The outer attributes, then the body's inner ones, as in `ItemFn`.
    pub(super) attrs: Vec<Attribute>,
    pub(super) sig: Signature,
}

impl Parse for TaskFn {
    fn parse(input: ParseStream<'_>) -> syn::Result<TaskFn> {
        let mut attrs = input.call(Attribute::parse_outer)?;
        input.parse::<Visibility>()?;
        let sig: Signature = input.parse()?;
        let body;
        syn::braced!(body in input);
        attrs.extend(body.call(Attribute::parse_inner)?);
        body.parse::<TokenStream>()?;
        Ok(TaskFn { attrs, sig })
    }
}

/// The user's item unchanged, then every error.
fn with_errors(item: TokenStream, cx: Ctxt) -> TokenStream {
    let errors = cx.check().expect_err("an error was recorded");
    let errors = errors.iter().map(syn::Error::to_compile_error);
    quote!(#item #(#errors)*)
}

/// Collects errors instead of returning at the first one (serde_derive's
/// `Ctxt`). Dropping it without calling [`Ctxt::check`] is a bug.
struct Ctxt {
    errors: RefCell<Option<Vec<syn::Error>>>,
}

impl Ctxt {
    fn new() -> Ctxt {
        Ctxt {
            errors: RefCell::new(Some(Vec::new())),
        }
    }

    /// An error spanned on every token of `tokens`.
    fn error_spanned_by<T: ToTokens, M: Display>(&self, tokens: T, message: M) {
        self.syn_error(syn::Error::new_spanned(tokens.into_token_stream(), message));
    }

    fn error_at<M: Display>(&self, span: Span, message: M) {
        self.syn_error(syn::Error::new(span, message));
    }

    fn syn_error(&self, error: syn::Error) {
        self.errors
            .borrow_mut()
            .as_mut()
            .expect("errors already checked")
            .push(error);
    }

    fn is_clean(&self) -> bool {
        self.errors.borrow().as_ref().is_some_and(Vec::is_empty)
    }

    fn check(self) -> Result<(), Vec<syn::Error>> {
        let errors = self
            .errors
            .borrow_mut()
            .take()
            .expect("errors checked twice");
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

impl Drop for Ctxt {
    fn drop(&mut self) {
        if !std::thread::panicking() && self.errors.borrow().is_some() {
            panic!("task macro: errors were collected but never checked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(args: TokenStream, item: TokenStream) -> Vec<String> {
        let out = expand(args, item).to_string();
        out.split("compile_error !")
            .skip(1)
            .map(|e| {
                let start = e.find('"').unwrap();
                let end = e.rfind('"').unwrap();
                e[start + 1..end].replace("\\\"", "\"")
            })
            .collect()
    }

    const OK_FN: &str = "async fn t(ctx: &mut TaskContext) -> Result<(), E> {}";

    #[test]
    fn every_error_is_reported() {
        let errs = errors(
            quote!(version = "v1", order = -1, id = "", nope = 3, order = 2),
            quote! { unsafe fn t(a: u8, b: u8) {} },
        );
        let expected = [
            "unknown argument `nope`",
            "`order` is given more than once",
            "`v1` is not a version",
            "it cannot be negative",
            "`id` must not be empty",
            "must be an `async fn`",
            "cannot be an `unsafe fn`",
            "expected `&mut upsilon::TaskContext`",
            "takes exactly one argument",
            "must return `Result<(), E>`",
        ];
        assert_eq!(errs.len(), expected.len(), "{errs:#?}");
        for (err, needle) in errs.iter().zip(expected) {
            assert!(err.contains(needle), "{err:?} should contain {needle:?}");
        }
    }

    #[test]
    fn missing_keys() {
        let errs = errors(quote!(), OK_FN.parse().unwrap());
        assert_eq!(errs.len(), 2, "{errs:#?}");
        assert!(errs[0].starts_with("missing `version`"));
        assert!(errs[1].starts_with("missing `order`"));
    }

    #[test]
    fn a_given_id_replaces_the_fn_name() {
        let item: TokenStream = "async fn café(ctx: &mut TaskContext) -> Result<(), E> {}"
            .parse()
            .unwrap();
        let errs = errors(quote!(version = "1", order = 1, id = ""), item.clone());
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(errs[0].starts_with("`id` must not be empty"));
        let errs = errors(quote!(version = "1", order = 1), item.clone());
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(errs[0].starts_with("the fn name `café` cannot be a task id"));
        assert!(errors(quote!(version = "1", order = 1, id = "cafe"), item).is_empty());
    }

    #[test]
    fn the_body_is_left_to_the_compiler_but_its_inner_attributes_count() {
        let out = expand(
            quote!(version = "1", order = 1),
            quote! {
                async fn t(ctx: &mut TaskContext) -> Result<(), E> {
                    #![doc = "Inner."]
                    not a statement at all
                }
            },
        )
        .to_string();
        assert!(!out.contains("compile_error"), "{out}");
        assert!(out.contains("description : \"Inner.\""), "{out}");
        assert!(out.contains("not a statement at all"), "{out}");
        let errs = errors(
            quote!(version = "1", order = 1),
            quote! { async fn t(ctx: &mut TaskContext) -> Result<(), E> {} extra },
        );
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(errs[0].contains("goes on an async fn"), "{errs:#?}");
    }

    #[test]
    fn the_fn_is_kept_on_error() {
        let out = expand(quote!(version = "x", order = 1), OK_FN.parse().unwrap()).to_string();
        assert!(out.starts_with("async fn t"), "{out}");
        assert!(!out.contains("submit"), "{out}");
    }

    #[test]
    fn expansion() {
        let out = expand(
            quote!(
                version = "1.1",
                order = 7,
                id = "x-1",
                rollback = undo,
                crate = "re::ups"
            ),
            quote! {
                /// First line.
                ///
                ///   Second line.
                async fn t(ctx: &mut TaskContext) -> Result<(), E> {}
            },
        )
        .to_string();
        assert!(!out.contains("compile_error"), "{out}");
        for needle in [
            "re :: ups :: __private :: box_task (t (ctx))",
            "re :: ups :: __private :: box_task (undo (ctx))",
            "id : \"x-1\"",
            "version : \"1.1.0\"",
            "order : 7u32",
            "description : \"First line.\\n\\nSecond line.\"",
            "Option :: Some (__upsilon_rollback)",
            "fn __upsilon_registry_check_t ()",
            "check_registry_for (\"1.1.0\" , \"x-1\")",
        ] {
            assert!(out.contains(needle), "{needle:?} not in {out}");
        }
    }
}
