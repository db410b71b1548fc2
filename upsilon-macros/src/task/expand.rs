//! The generated code: the fn's registration with `inventory`, and the test
//! that fails when it clashes with another task.

use proc_macro2::{Group, Literal, Span, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::ext::IdentExt;
use syn::{Ident, Lit, LitStr, Path};

use super::attr::as_lit;
use super::TaskFn;

/// A checked task, ready to expand.
pub(super) struct Task<'a> {
    pub(super) func: &'a TaskFn,
    pub(super) version: String,
    pub(super) order: u32,
    pub(super) id: String,
    pub(super) rollback: Option<Path>,
    pub(super) krate: Option<Path>,
}

impl Task<'_> {
    pub(super) fn expand(&self) -> TokenStream {
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
