//! Scenario 6: every backend, opened from its URL with
//! `upsilon_backends::connect`, through the same code: the start-up of an
//! up-to-date node (6a), convergence of waiting nodes (6b), failover after
//! a SIGKILL (6c) and the calls a waiting node makes (6d). Each backend is
//! measured beside its own bare client, or its own notification floor,
//! in the same run.
//!
//! PostgreSQL is in the list too: its rows here come from the same generic
//! code as the others', and are a check of that code against scenarios 1
//! to 4, which measure it against sqlx.

mod kind;
mod load;
mod scenarios;
mod subject;

#[cfg(feature = "redis")]
mod redis_bench;

#[cfg(feature = "etcd")]
mod etcd_bench;

#[cfg(feature = "kubernetes")]
mod kube_bench;

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::common::Env;
use crate::report::Report;
use crate::Options;

pub use kind::{kind, Kind};
use load::load;
use scenarios::{convergence, failover, startup};
use subject::Subject;

pub async fn run(env: &Env, o: &Options, report: &mut Report) -> anyhow::Result<()> {
    let mut subjects = Vec::with_capacity(o.backends.len());
    for &kind in &o.backends {
        subjects.push(Subject::start(kind, env).await?);
    }
    let mut details: BTreeMap<&str, serde_json::Map<String, Value>> = BTreeMap::new();
    for subject in &subjects {
        eprintln!("  6a: {}", subject.name());
        let d = startup(subject, o, report).await?;
        details
            .entry(subject.name())
            .or_default()
            .insert("a".into(), d);
    }
    let mut pg_here = BTreeMap::new();
    for subject in &subjects {
        let d = convergence(subject, o, report, &mut pg_here).await?;
        details
            .entry(subject.name())
            .or_default()
            .insert("b".into(), d);
    }
    for subject in &subjects {
        let d = failover(subject, o, report).await?;
        details
            .entry(subject.name())
            .or_default()
            .insert("c".into(), d);
    }
    let mut pg_calls = None;
    for subject in &subjects {
        let d = load(subject, o, report, &mut pg_calls).await?;
        details
            .entry(subject.name())
            .or_default()
            .insert("d".into(), d);
    }
    report.detail("6", json!(details));
    Ok(())
}
