//! Statements sent together: one round trip for several statements.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row};

/// One statement of a pipeline: simple-protocol text (no parameters), or a
/// statement with typed, bound parameters (the unnamed prepared statement,
/// so it works behind a transaction-mode pooler).
pub(super) enum Stmt<'a> {
    Simple(&'static str),
    Typed(&'a str, Vec<(Param, Type)>),
}

/// A bound value.
pub(super) type Param = Box<dyn ToSql + Sync + Send>;

pub(super) fn text(s: impl Into<String>) -> (Param, Type) {
    (Box::new(s.into()), Type::TEXT)
}

pub(super) fn text_array(v: Vec<String>) -> (Param, Type) {
    (Box::new(v), Type::TEXT_ARRAY)
}

pub(super) fn opt_text(s: Option<String>) -> (Param, Type) {
    (Box::new(s), Type::TEXT)
}

pub(super) fn int8(v: i64) -> (Param, Type) {
    (Box::new(v), Type::INT8)
}

pub(super) fn opt_int8(v: Option<i64>) -> (Param, Type) {
    (Box::new(v), Type::INT8)
}

pub(super) fn opt_int4(v: Option<i32>) -> (Param, Type) {
    (Box::new(v), Type::INT4)
}

pub(super) fn int4(v: i32) -> (Param, Type) {
    (Box::new(v), Type::INT4)
}

type Pending<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 'a>>;

/// Sends every statement at once, in order, and collects every answer: one
/// round trip for the lot. The server runs them one after the other, so a
/// statement sees the effects (and the locks) of those before it.
pub(super) async fn pipeline<'a>(
    client: &'a Client,
    stmts: &'a [Stmt<'a>],
) -> Vec<Result<Vec<Row>, tokio_postgres::Error>> {
    let mut pending: Vec<Option<Pending<'a>>> = stmts
        .iter()
        .map(|s| {
            let fut: Pending<'a> = match s {
                Stmt::Simple(sql) => {
                    Box::pin(async move { client.batch_execute(sql).await.map(|()| Vec::new()) })
                }
                Stmt::Typed(sql, params) => Box::pin(async move {
                    let refs: Vec<(&(dyn ToSql + Sync), Type)> = params
                        .iter()
                        .map(|(p, t)| (&**p as &(dyn ToSql + Sync), t.clone()))
                        .collect();
                    client.query_typed(sql, &refs).await
                }),
            };
            Some(fut)
        })
        .collect();
    let mut results: Vec<Option<Result<Vec<Row>, tokio_postgres::Error>>> =
        stmts.iter().map(|_| None).collect();
    // Each future sends its request on its first poll, so polling them in
    // order sends them in order.
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (slot, result) in pending.iter_mut().zip(results.iter_mut()) {
            if let Some(fut) = slot {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(r) => {
                        *result = Some(r);
                        *slot = None;
                    }
                    Poll::Pending => all = false,
                }
            }
        }
        if all {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    results
        .into_iter()
        .map(|r| r.expect("every statement answered"))
        .collect()
}

/// The first error of a pipeline's answers (later ones only say that the
/// transaction was aborted), or every answer.
pub(super) fn first_error(
    results: Vec<Result<Vec<Row>, tokio_postgres::Error>>,
) -> Result<Vec<Vec<Row>>, tokio_postgres::Error> {
    results.into_iter().collect()
}
