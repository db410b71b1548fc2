//! The attribute's arguments: parsed leniently, then each checked, so that
//! every mistake gets a message about its key.

use proc_macro2::{Span, TokenTree};
use quote::ToTokens;
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Expr, ExprLit, ExprUnary, Ident, Lit, Path, Token, UnOp};
use upsilon_rules::{check_id, parse_version, IdError};

use super::{Ctxt, SHAPE};

/// The keys `#[upsilon::task(..)]` takes, as error messages list them.
const KEYS: &str = "`version`, `order`, `id`, `rollback`, `crate`";

mod kw {
    syn::custom_keyword!(version);
    syn::custom_keyword!(order);
    syn::custom_keyword!(id);
    syn::custom_keyword!(rollback);
}

/// The attribute's arguments as written: `key = value, ...`. Values are kept
/// as expressions so that a wrong kind of value (`version = 1.1`) gets a
/// message about that key rather than a bare syntax error.
pub(super) struct Args {
    args: Punctuated<Arg, Token![,]>,
}

enum Arg {
    Version(kw::version, Expr),
    Order(kw::order, Expr),
    Id(kw::id, Expr),
    Rollback(kw::rollback, Expr),
    Crate(Token![crate], Expr),
    Unknown(Ident),
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Args> {
        Ok(Args {
            args: Punctuated::parse_terminated(input)?,
        })
    }
}

impl Parse for Arg {
    fn parse(input: ParseStream<'_>) -> syn::Result<Arg> {
        fn value(input: ParseStream<'_>) -> syn::Result<Expr> {
            input.parse::<Token![=]>()?;
            input.parse()
        }
        if input.peek(kw::version) {
            Ok(Arg::Version(input.parse()?, value(input)?))
        } else if input.peek(kw::order) {
            Ok(Arg::Order(input.parse()?, value(input)?))
        } else if input.peek(kw::id) {
            Ok(Arg::Id(input.parse()?, value(input)?))
        } else if input.peek(kw::rollback) {
            Ok(Arg::Rollback(input.parse()?, value(input)?))
        } else if input.peek(Token![crate]) {
            Ok(Arg::Crate(input.parse()?, value(input)?))
        } else if input.peek(Ident::peek_any) {
            let name = input.call(Ident::parse_any)?;
            // Skip whatever follows, so that the other arguments still get checked.
            while !input.is_empty() && !input.peek(Token![,]) {
                input.parse::<TokenTree>()?;
            }
            Ok(Arg::Unknown(name))
        } else {
            Err(input.error(format!("expected one of: {KEYS}")))
        }
    }
}

/// The arguments, each given at most once, before their values are checked.
#[derive(Default)]
struct Slots {
    version: Option<Expr>,
    order: Option<Expr>,
    id: Option<Expr>,
    rollback: Option<Expr>,
    krate: Option<Expr>,
}

/// Stores `value` in `slot` unless the key was already given: every key goes
/// through here, so no key can be checked against the wrong slot.
fn assign(cx: &Ctxt, slot: &mut Option<Expr>, key: &str, key_span: Span, value: Expr) {
    if slot.is_some() {
        cx.error_at(
            key_span,
            format!("`{key}` is given more than once; keep only one"),
        );
    } else {
        *slot = Some(value);
    }
}

/// The arguments, checked.
pub(super) struct Attrs {
    /// Normalized to a full semver version.
    pub(super) version: Option<String>,
    pub(super) order: Option<u32>,
    pub(super) id: Option<String>,
    /// Whether `id` was given, valid or not: if not, the fn name is the id.
    pub(super) id_given: bool,
    pub(super) rollback: Option<Path>,
    pub(super) krate: Option<Path>,
}

impl Attrs {
    pub(super) fn from_args(cx: &Ctxt, args: Args) -> Attrs {
        let mut slots = Slots::default();
        for arg in args.args {
            match arg {
                Arg::Version(k, v) => assign(cx, &mut slots.version, "version", k.span, v),
                Arg::Order(k, v) => assign(cx, &mut slots.order, "order", k.span, v),
                Arg::Id(k, v) => assign(cx, &mut slots.id, "id", k.span, v),
                Arg::Rollback(k, v) => assign(cx, &mut slots.rollback, "rollback", k.span, v),
                Arg::Crate(k, v) => assign(cx, &mut slots.krate, "crate", k.span, v),
                Arg::Unknown(name) => unknown_key(cx, &name),
            }
        }
        if slots.version.is_none() {
            cx.error_at(
                Span::call_site(),
                "missing `version`; add the release this task belongs to, like `version = \"1.1\"`",
            );
        }
        if slots.order.is_none() {
            cx.error_at(
                Span::call_site(),
                "missing `order`; add the task's place among the tasks of its version, like `order = 1`",
            );
        }
        Attrs {
            id_given: slots.id.is_some(),
            version: slots.version.and_then(|v| version_value(cx, &v)),
            order: slots.order.and_then(|v| order_value(cx, &v)),
            id: slots.id.and_then(|v| id_value(cx, &v)),
            rollback: slots.rollback.and_then(|v| rollback_value(cx, &v)),
            krate: slots.krate.and_then(|v| crate_value(cx, &v)),
        }
    }
}

fn unknown_key(cx: &Ctxt, name: &Ident) {
    let hint = match name.unraw().to_string().as_str() {
        "description" | "desc" | "doc" => "; the description is the fn's doc comment (`/// ...`)",
        "name" => "; to set the task's id, use `id = \"...\"`",
        _ => "",
    };
    cx.error_spanned_by(
        name,
        format!("unknown argument `{name}`; expected one of: {KEYS}{hint}"),
    );
}

pub(super) fn as_lit(expr: &Expr) -> Option<&Lit> {
    match expr {
        Expr::Lit(ExprLit { lit, attrs }) if attrs.is_empty() => Some(lit),
        _ => None,
    }
}

/// The tokens of `expr` without spaces: `1.1 . 0` becomes `1.1.0`.
fn compact(expr: &Expr) -> String {
    expr.to_token_stream()
        .to_string()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

fn version_value(cx: &Ctxt, expr: &Expr) -> Option<String> {
    if let Some(Lit::Str(lit)) = as_lit(expr) {
        if lit.value().trim().is_empty() {
            cx.error_spanned_by(
                lit,
                "`version` must not be empty; give the release this task belongs to, like `version = \"1.1\"`",
            );
            return None;
        }
        return match parse_version(&lit.value()) {
            Ok(version) => Some(version.to_string()),
            Err(err) => {
                cx.error_spanned_by(lit, err);
                None
            }
        };
    }
    let text = compact(expr);
    if parse_version(&text).is_ok() {
        cx.error_spanned_by(
            expr,
            format!("`version` must be a string literal: write `version = \"{text}\"`"),
        );
    } else {
        cx.error_spanned_by(
            expr,
            "`version` must be a string literal, like `version = \"1.1\"`",
        );
    }
    None
}

fn order_value(cx: &Ctxt, expr: &Expr) -> Option<u32> {
    const RANGE: &str = "`order` must be an integer from 0 to 4294967295 (a `u32`)";
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Int(lit), ..
        }) => {
            if !matches!(lit.suffix(), "" | "u32") {
                cx.error_spanned_by(
                    lit,
                    format!("{RANGE}; remove the `{}` suffix", lit.suffix()),
                );
                return None;
            }
            match lit.base10_parse::<u32>() {
                Ok(order) => Some(order),
                Err(_) => {
                    cx.error_spanned_by(
                        lit,
                        format!("{RANGE}; `{}` is too large", lit.base10_digits()),
                    );
                    None
                }
            }
        }
        Expr::Unary(ExprUnary {
            op: UnOp::Neg(_), ..
        }) => {
            cx.error_spanned_by(expr, format!("{RANGE}; it cannot be negative"));
            None
        }
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) if lit.value().trim().parse::<u32>().is_ok() => {
            cx.error_spanned_by(
                lit,
                format!(
                    "`order` must be an integer literal, not a string: write `order = {}`",
                    lit.value().trim()
                ),
            );
            None
        }
        _ => {
            cx.error_spanned_by(expr, format!("{RANGE}, like `order = 1`"));
            None
        }
    }
}

fn id_value(cx: &Ctxt, expr: &Expr) -> Option<String> {
    match as_lit(expr) {
        Some(Lit::Str(lit)) => match id_problem(&lit.value()) {
            Ok(()) => Some(lit.value()),
            Err(why) => {
                cx.error_spanned_by(lit, format!("`id` {why}"));
                None
            }
        },
        _ => {
            let text = compact(expr);
            if id_problem(&text).is_ok() {
                cx.error_spanned_by(
                    expr,
                    format!("`id` must be a string literal: write `id = \"{text}\"`"),
                );
            } else {
                cx.error_spanned_by(
                    expr,
                    "`id` must be a string literal, like `id = \"check-accounts\"`",
                );
            }
            None
        }
    }
}

/// The id a task gets when `id` is not given: its fn name.
pub(super) fn default_id(cx: &Ctxt, name: &Ident) -> Option<String> {
    let id = name.unraw().to_string();
    match id_problem(&id) {
        Ok(()) => Some(id),
        Err(why) => {
            cx.error_spanned_by(
                name,
                format!("the fn name `{id}` cannot be a task id: an id {why}; give the task one with `id = \"...\"`"),
            );
            None
        }
    }
}

/// [`check_id`], with the reason worded for the attribute: it completes
/// "`id` ...".
fn id_problem(id: &str) -> Result<(), String> {
    check_id(id).map_err(|err| match err {
        IdError::Empty => format!("{err}; leave `id` out to use the fn name"),
        _ => err.to_string(),
    })
}

fn rollback_value(cx: &Ctxt, expr: &Expr) -> Option<Path> {
    match expr {
        Expr::Path(p) if p.qself.is_none() && p.attrs.is_empty() => Some(p.path.clone()),
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) if lit.parse::<Path>().is_ok() => {
            cx.error_spanned_by(
                lit,
                format!(
                    "`rollback` takes a path, not a string: write `rollback = {}`",
                    lit.value().trim()
                ),
            );
            None
        }
        _ => {
            cx.error_spanned_by(
                expr,
                format!("`rollback` must be the path of an async fn shaped like a task (`{SHAPE}`), like `rollback = undo_backfill`"),
            );
            None
        }
    }
}

fn crate_value(cx: &Ctxt, expr: &Expr) -> Option<Path> {
    const WHAT: &str =
        "`crate` must be a string holding the path to the upsilon crate, like `crate = \"my_crate::upsilon\"`";
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => match lit.parse::<Path>() {
            Ok(path) => Some(path),
            Err(_) => {
                cx.error_spanned_by(lit, WHAT);
                None
            }
        },
        Expr::Path(p) if p.qself.is_none() => {
            cx.error_spanned_by(
                expr,
                format!(
                    "`crate` takes a string: write `crate = \"{}\"`",
                    compact(expr)
                ),
            );
            None
        }
        _ => {
            cx.error_spanned_by(expr, WHAT);
            None
        }
    }
}
