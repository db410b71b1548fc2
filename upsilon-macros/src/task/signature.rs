//! The shape of the fn: `async fn name(ctx: &mut TaskContext) -> Result<(), E>`.

use quote::{quote, ToTokens};
use syn::{FnArg, GenericParam, ReturnType, Signature, Type};

use super::{Ctxt, SHAPE};

pub(super) fn check_signature(cx: &Ctxt, sig: &Signature) {
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
