//! `#[upsilon::task]`: parse the arguments, check the fn, and register it with
//! `inventory` through `upsilon::__private`.
//!
//! Every problem is collected before anything is returned, so the user sees
//! all of them at once. On error the fn is still emitted unchanged, followed
//! by the errors, so that one mistake does not turn into "cannot find
//! function" wherever the fn is used.

use std::cell::RefCell;
use std::fmt::Display;

use proc_macro2::{Group, Literal, Span, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{
    Expr, ExprLit, ExprUnary, FnArg, GenericParam, Ident, ItemFn, Lit, LitStr, Path, ReturnType,
    Signature, Token, Type, UnOp,
};
use upsilon_rules::{check_id, parse_version, IdError};

/// The keys `#[upsilon::task(..)]` takes, as error messages list them.
const KEYS: &str = "`version`, `order`, `id`, `rollback`, `crate`";

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
    let func = match syn::parse2::<ItemFn>(item.clone()) {
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

mod kw {
    syn::custom_keyword!(version);
    syn::custom_keyword!(order);
    syn::custom_keyword!(id);
    syn::custom_keyword!(rollback);
}

/// The attribute's arguments as written: `key = value, ...`. Values are kept
/// as expressions so that a wrong kind of value (`version = 1.1`) gets a
/// message about that key rather than a bare syntax error.
struct Args {
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
struct Attrs {
    /// Normalized to a full semver version.
    version: Option<String>,
    order: Option<u32>,
    id: Option<String>,
    /// Whether `id` was given, valid or not: if not, the fn name is the id.
    id_given: bool,
    rollback: Option<Path>,
    krate: Option<Path>,
}

impl Attrs {
    fn from_args(cx: &Ctxt, args: Args) -> Attrs {
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

fn as_lit(expr: &Expr) -> Option<&Lit> {
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
fn default_id(cx: &Ctxt, name: &Ident) -> Option<String> {
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

fn check_signature(cx: &Ctxt, sig: &Signature) {
    if let Some(constness) = &sig.constness {
        cx.error_spanned_by(constness, "a task cannot be a `const fn`; remove `const`");
    }
    if sig.asyncness.is_none() {
        cx.error_spanned_by(
            sig.fn_token,
            format!(
                "a task must be an `async fn`; write `async fn {}`",
                sig.ident
            ),
        );
    }
    if let Some(unsafety) = &sig.unsafety {
        cx.error_spanned_by(
            unsafety,
            "a task cannot be an `unsafe fn`; remove `unsafe` and use `unsafe` blocks inside",
        );
    }
    if let Some(abi) = &sig.abi {
        cx.error_spanned_by(
            abi,
            format!(
                "a task cannot have an `extern` ABI; remove `{}`",
                abi.to_token_stream()
            ),
        );
    }
    check_generics(cx, sig);
    if let Some(variadic) = &sig.variadic {
        cx.error_spanned_by(
            variadic,
            format!("a task cannot be variadic; a task is `{SHAPE}`"),
        );
    }
    check_inputs(cx, sig);
    check_output(cx, sig);
}

/// Lifetime parameters are harmless (`async fn t<'a>(ctx: &'a mut
/// TaskContext)`); type and const parameters leave no one fn to register.
fn check_generics(cx: &Ctxt, sig: &Signature) {
    let generics = &sig.generics;
    let generic = generics.params.iter().any(|p| match p {
        GenericParam::Lifetime(l) => !l.bounds.is_empty(),
        GenericParam::Type(_) | GenericParam::Const(_) => true,
    });
    if generic {
        let (lt, params, gt) = (&generics.lt_token, &generics.params, &generics.gt_token);
        cx.error_spanned_by(
            quote!(#lt #params #gt),
            "a task cannot be generic: the registry needs one concrete fn; remove the generic parameters",
        );
    }
    if let Some(where_clause) = &generics.where_clause {
        cx.error_spanned_by(
            where_clause,
            "a task cannot have a `where` clause: the registry needs one concrete fn; remove it",
        );
    }
}

fn check_inputs(cx: &Ctxt, sig: &Signature) {
    let mut typed = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(receiver) => cx.error_spanned_by(
                receiver,
                format!("a task cannot take `self`; make it a free fn: `{SHAPE}`"),
            ),
            FnArg::Typed(arg) => typed.push(arg),
        }
    }
    match typed.split_first() {
        None if sig.inputs.is_empty() => cx.error_at(
            sig.paren_token.span.join(),
            format!("a task takes one argument, its context: `{SHAPE}`"),
        ),
        None => {}
        Some((first, extra)) => {
            check_context_type(cx, &first.ty);
            if !extra.is_empty() {
                cx.error_spanned_by(
                    quote!(#(#extra),*),
                    format!(
                        "a task takes exactly one argument, its context: `{SHAPE}`; remove the other{}",
                        if extra.len() == 1 { "" } else { "s" }
                    ),
                );
            }
        }
    }
}

/// The argument must be `&mut TaskContext`, through any path that ends in
/// `TaskContext` (`upsilon::TaskContext`, a re-export, a `use`).
fn check_context_type(cx: &Ctxt, ty: &Type) {
    let is_context = |ty: &Type| match ty {
        Type::Path(p) => {
            p.qself.is_none()
                && p.path
                    .segments
                    .last()
                    .is_some_and(|s| s.ident == "TaskContext" && s.arguments.is_none())
        }
        _ => false,
    };
    match ty {
        Type::Reference(r) if is_context(&r.elem) => {
            if r.mutability.is_none() {
                cx.error_spanned_by(
                    ty,
                    "a task takes its context as `&mut TaskContext`; add `mut`",
                );
            } else if r.lifetime.as_ref().is_some_and(|l| l.ident == "static") {
                cx.error_spanned_by(
                    ty,
                    "a task's context is borrowed only while the task runs; remove `'static`",
                );
            }
        }
        _ if is_context(ty) => cx.error_spanned_by(
            ty,
            "a task takes its context by mutable reference; write `&mut TaskContext`",
        ),
        Type::Paren(inner) => check_context_type(cx, &inner.elem),
        _ => cx.error_spanned_by(
            ty,
            format!("expected `&mut upsilon::TaskContext`, the argument of every task: `{SHAPE}`"),
        ),
    }
}

/// The return type must be a `Result` (any path ending in `Result`, so
/// `anyhow::Result<()>` and `io::Result<()>` qualify) whose `Ok` type is `()`.
fn check_output(cx: &Ctxt, sig: &Signature) {
    const WHAT: &str = "a task must return `Result<(), E>`, where `E` converts into `Box<dyn Error + Send + Sync>` (`anyhow::Error` and most error types do)";
    let ty = match &sig.output {
        ReturnType::Default => {
            cx.error_at(
                sig.paren_token.span.close(),
                format!("{WHAT}; add `-> Result<(), MyError>`"),
            );
            return;
        }
        ReturnType::Type(_, ty) => ty,
    };
    let last = match &**ty {
        Type::Path(p) if p.qself.is_none() => p.path.segments.last(),
        _ => None,
    };
    let Some(last) = last.filter(|s| s.ident == "Result") else {
        cx.error_spanned_by(ty, format!("{WHAT}; found `{}`", compact_type(ty)));
        return;
    };
    if let syn::PathArguments::AngleBracketed(args) = &last.arguments {
        if let Some(syn::GenericArgument::Type(ok)) = args.args.first() {
            let unit = matches!(ok, Type::Tuple(t) if t.elems.is_empty());
            if !unit {
                cx.error_spanned_by(
                    ok,
                    "a task's `Ok` type must be `()`: a task reports progress through its context, not a value; return `Result<(), E>`",
                );
            }
        }
    }
}

fn compact_type(ty: &Type) -> String {
    let mut out = String::new();
    let text = ty.to_token_stream().to_string();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        // Keep the spaces between words (`dyn Trait`), drop the others.
        if c == ' ' {
            let prev = out.chars().last().is_some_and(is_word);
            let next = chars.peek().copied().is_some_and(is_word);
            if !(prev && next) {
                continue;
            }
        }
        out.push(c);
    }
    out
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '\''
}

/// A checked task, ready to expand.
struct Task<'a> {
    func: &'a ItemFn,
    version: String,
    order: u32,
    id: String,
    rollback: Option<Path>,
    krate: Option<Path>,
}

impl Task<'_> {
    fn expand(&self) -> TokenStream {
        let krate = match &self.krate {
            Some(path) => path.to_token_stream(),
            None => quote!(::upsilon),
        };
        let p = quote!(#krate::__private);
        let name = &self.func.sig.ident;
        let ctx = Ident::new("ctx", Span::mixed_site());

        // Spanned on the user's fn (and on the rollback path), so that a
        // future that is not `Send`, or an error type that does not convert,
        // is reported there rather than on the attribute.
        let call = |target: &Path, span: Span| {
            let box_task = respan(quote!(#p::box_task), span);
            let ctx = Ident::new("ctx", Span::mixed_site().located_at(span));
            quote_spanned!(span=> #box_task(#target(#ctx)))
        };
        let run = call(&Path::from(name.clone()), name.span());
        let (rollback_fn, rollback) = match &self.rollback {
            Some(path) => {
                let body = call(path, span_of(path));
                (
                    quote! {
                        fn __upsilon_rollback<'a>(#ctx: &'a mut #p::TaskContext) -> #p::TaskFuture<'a> {
                            #body
                        }
                    },
                    quote!(#p::core::option::Option::Some(__upsilon_rollback)),
                )
            }
            None => (quote!(), quote!(#p::core::option::Option::None)),
        };

        let version = &self.version;
        let order = self.order;
        let id = &self.id;
        let description = description(&self.func.attrs);
        let line = match name.span().start().line {
            // Compilers before 1.88 do not tell a macro where its tokens are.
            0 => quote!(#p::core::line!()),
            line => Literal::u32_unsuffixed(line as u32).into_token_stream(),
        };
        let check = format_ident!("__upsilon_registry_check_{}", name.unraw());
        // A `#[cfg]` below the attribute removes the fn after this macro has
        // run: the registration must go with it.
        let cfgs: Vec<&syn::Attribute> = self
            .func
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("cfg"))
            .collect();

        quote! {
            #(#cfgs)*
            #[doc(hidden)]
            const _: () = {
                fn __upsilon_run<'a>(#ctx: &'a mut #p::TaskContext) -> #p::TaskFuture<'a> {
                    #run
                }
                #rollback_fn
                #p::inventory::submit! {
                    #p::TaskDef {
                        id: #id,
                        version: #version,
                        order: #order,
                        description: #description,
                        run: __upsilon_run,
                        rollback: #rollback,
                        file: #p::core::file!(),
                        line: #line,
                        module_path: #p::core::module_path!(),
                    }
                }
            };

            // Makes two tasks that clash fail the defining crate's own tests.
            #(#cfgs)*
            #[cfg(test)]
            #[#p::core::prelude::v1::test]
            #[doc(hidden)]
            #[allow(non_snake_case)]
            fn #check() {
                #p::check_registry_for(#version, #id);
            }
        }
    }
}

/// The doc comment's lines, each trimmed, joined with newlines; `""` if none.
fn description(attrs: &[syn::Attribute]) -> LitStr {
    let mut lines = Vec::new();
    for attr in attrs {
        if !attr.path().is_ident("doc") {
            continue;
        }
        if let syn::Meta::NameValue(nv) = &attr.meta {
            if let Some(Lit::Str(lit)) = as_lit(&nv.value) {
                lines.extend(lit.value().split('\n').map(|l| l.trim().to_owned()));
            }
        }
    }
    LitStr::new(lines.join("\n").trim(), Span::call_site())
}

fn span_of(path: &Path) -> Span {
    path.segments
        .last()
        .map_or_else(Span::call_site, |s| s.ident.span())
}

/// `tokens` with every span set to `span`.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|tree| match tree {
            TokenTree::Group(group) => {
                let mut new = Group::new(group.delimiter(), respan(group.stream(), span));
                new.set_span(span);
                TokenTree::Group(new)
            }
            mut other => {
                other.set_span(span);
                other
            }
        })
        .collect()
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
