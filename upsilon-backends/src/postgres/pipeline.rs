//! Statements sent together: one round trip for several statements.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use std::collections::HashMap;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row, Statement};

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

pub(super) fn int8_array(v: Vec<i64>) -> (Param, Type) {
    (Box::new(v), Type::INT8_ARRAY)
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

/// The statements prepared on one connection (named, so the server keeps
/// their parse and their plan), by the address of their text in [`Sql`](super::sql::Sql).
/// A statement is prepared on its second use on a connection: a connection
/// that runs a statement once (a node's start-up read) pays nothing for it.
#[derive(Default)]
pub(super) struct Prepared {
    by_text: HashMap<usize, Slot>,
}

enum Slot {
    /// Run once, unnamed.
    Seen,
    Ready(Statement),
}

impl Prepared {
    /// Forgets every statement: the session dropped them (`DISCARD ALL`).
    pub(super) fn clear(&mut self) {
        self.by_text.clear();
    }
}

type Prepare<'a> = Pin<Box<dyn Future<Output = (usize, Option<Statement>)> + Send + 'a>>;

type Pending<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 'a>>;

/// Sends every statement at once, in order, and collects every answer: one
/// round trip for the lot. The server runs them one after the other, so a
/// statement sees the effects (and the locks) of those before it.
pub(super) async fn pipeline<'a>(
    client: &'a Client,
    stmts: &'a [Stmt<'a>],
) -> Vec<Result<Vec<Row>, tokio_postgres::Error>> {
    pipeline_prepared(client, None, stmts).await
}

/// [`pipeline`], with the typed statements run as the named statements of
/// `prepared` where they are prepared, and prepared (in the same flight,
/// before the lot) on their second use.
pub(super) async fn pipeline_prepared<'a>(
    client: &'a Client,
    prepared: Option<&std::sync::Mutex<Prepared>>,
    stmts: &'a [Stmt<'a>],
) -> Vec<Result<Vec<Row>, tokio_postgres::Error>> {
    let mut prepares: Vec<Prepare<'a>> = Vec::new();
    let mut named: Vec<Option<Statement>> = stmts.iter().map(|_| None).collect();
    if let Some(cache) = prepared {
        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        for (s, named) in stmts.iter().zip(named.iter_mut()) {
            let Stmt::Typed(sql, params) = s else {
                continue;
            };
            let key = sql.as_ptr() as usize;
            match cache.by_text.get(&key) {
                Some(Slot::Ready(st)) => *named = Some(st.clone()),
                Some(Slot::Seen) => {
                    let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
                    prepares.push(Box::pin(async move {
                        (key, client.prepare_typed(sql, &types).await.ok())
                    }));
                }
                None => {
                    cache.by_text.insert(key, Slot::Seen);
                }
            }
        }
    }
    let mut pending: Vec<Option<Pending<'a>>> = stmts
        .iter()
        .zip(named)
        .map(|(s, named)| {
            let fut: Pending<'a> = match s {
                Stmt::Simple(sql) => {
                    Box::pin(async move { client.batch_execute(sql).await.map(|()| Vec::new()) })
                }
                Stmt::Typed(sql, params) => Box::pin(async move {
                    match named {
                        Some(st) => {
                            let refs: Vec<&(dyn ToSql + Sync)> = params
                                .iter()
                                .map(|(p, _)| &**p as &(dyn ToSql + Sync))
                                .collect();
                            client.query(&st, &refs).await
                        }
                        None => {
                            let refs: Vec<(&(dyn ToSql + Sync), Type)> = params
                                .iter()
                                .map(|(p, t)| (&**p as &(dyn ToSql + Sync), t.clone()))
                                .collect();
                            client.query_typed(sql, &refs).await
                        }
                    }
                }),
            };
            Some(fut)
        })
        .collect();
    let mut results: Vec<Option<Result<Vec<Row>, tokio_postgres::Error>>> =
        stmts.iter().map(|_| None).collect();
    let mut prepares: Vec<Option<Prepare<'a>>> = prepares.into_iter().map(Some).collect();
    let mut ready: Vec<(usize, Option<Statement>)> = Vec::with_capacity(prepares.len());
    // Each future sends its request on its first poll, so polling them in
    // order sends them in order: the prepares, then the statements.
    std::future::poll_fn(|cx| {
        let mut all = true;
        for slot in prepares.iter_mut() {
            if let Some(fut) = slot {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(r) => {
                        ready.push(r);
                        *slot = None;
                    }
                    Poll::Pending => all = false,
                }
            }
        }
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
    if let Some(cache) = prepared {
        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        for (key, st) in ready {
            // A prepare that failed (its statement failed too, or the
            // transaction was aborted) is tried again on the next use.
            if let Some(st) = st {
                cache.by_text.insert(key, Slot::Ready(st));
            }
        }
    }
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
