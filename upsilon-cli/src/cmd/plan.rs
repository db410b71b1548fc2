//! `plan`: what this binary would run against the store now, without the
//! lease.

use std::fmt::Write as _;

use serde::Serialize;
use upsilon::planner::Reason;
use upsilon::Task;

use super::status::lease_line;
use super::Ctx;
use crate::app::App;
use crate::exit::Failure;
use crate::json::LeaseJson;
use crate::output::Output;
use crate::text;

#[derive(Debug, Serialize)]
struct PlanJson {
    service: String,
    app_version: String,
    data_version: Option<String>,
    baseline: Option<String>,
    data_ahead: bool,
    steps: Vec<StepJson>,
    out_of_order: Vec<TaskJson>,
    above_app: Vec<TaskJson>,
    lease: Option<LeaseJson>,
}

#[derive(Debug, Serialize)]
struct StepJson {
    #[serde(flatten)]
    task: TaskJson,
    reason: &'static str,
    why: String,
}

/// A registered task, as `plan` and `check` show it.
#[derive(Debug, Serialize)]
pub(crate) struct TaskJson {
    version: String,
    order: u32,
    id: String,
    description: String,
    location: String,
    has_rollback: bool,
}

impl From<&Task> for TaskJson {
    fn from(t: &Task) -> TaskJson {
        TaskJson {
            version: t.version().to_string(),
            order: t.order(),
            id: t.id().to_owned(),
            description: t.description().to_owned(),
            location: t.location().to_string(),
            has_rollback: t.has_rollback(),
        }
    }
}

fn reason_name(r: Reason) -> &'static str {
    match r {
        Reason::FreshStore => "fresh_store",
        Reason::Pending => "pending",
        Reason::OutOfOrder => "out_of_order",
    }
}

pub(crate) async fn run(app: &App, ctx: &Ctx) -> Result<Output, Failure> {
    let service = ctx.one_service("plan")?;
    let upsilon = app
        .builder()
        .service(service)
        .backend(ctx.backend.clone())
        .build()
        .map_err(|e| {
            let mut f = Failure::runner(&e);
            f.message
                .push_str("\n(`check` lists every problem of the registered tasks)");
            f
        })?;
    let plan = upsilon.plan().await.map_err(|e| Failure::runner(&e))?;
    let snap = ctx.load(service).await?;
    let lease = ctx.lease(service).await?;
    // It parses: the runner was built with it.
    let app_version = upsilon::parse_version(app.version())
        .map_err(|e| Failure::new(crate::exit::Code::Failed, e.to_string()))?;
    let above: Vec<&Task> = upsilon.registry().above(&app_version).collect();

    let mut out = String::new();
    let _ = writeln!(
        out,
        "service {service}: data version {}, app version {app_version}{}",
        text::version(snap.data_version.as_ref()),
        snap.baseline
            .as_ref()
            .map(|b| format!(", baselined at {b}"))
            .unwrap_or_default()
    );
    if plan.data_ahead {
        let _ = writeln!(
            out,
            "the data version is ahead of this binary: it serves the data as it is (N-1), and runs nothing"
        );
    }
    if plan.steps.is_empty() {
        let _ = writeln!(
            out,
            "nothing to run: a node of this binary becomes ready at once"
        );
    } else {
        let n = plan.steps.len();
        let _ = writeln!(
            out,
            "{n} task{} to run, in order:",
            if n == 1 { "" } else { "s" }
        );
        for (i, step) in plan.steps.iter().enumerate() {
            let t = &step.task;
            let _ = writeln!(
                out,
                "  {}. {} (order {}): {}",
                i + 1,
                t.key(),
                t.order(),
                step.reason
            );
            if !t.description().is_empty() {
                let _ = writeln!(out, "     {}", t.description());
            }
        }
    }
    for t in &plan.out_of_order {
        let _ = writeln!(
            out,
            "left out: {} is at or below the data version but was never run (added out of order); the runner runs it only with `run_out_of_order(true)`",
            t.key()
        );
    }
    for t in &above {
        let _ = writeln!(
            out,
            "left out: {} is above the app version {app_version}",
            t.key()
        );
    }
    if lease.is_some() {
        let _ = writeln!(
            out,
            "the lease is {}: the plan may change when that node is done",
            lease_line(lease.as_ref())
        );
    }
    let json = PlanJson {
        service: service.to_owned(),
        app_version: app_version.to_string(),
        data_version: snap.data_version.as_ref().map(|v| v.to_string()),
        baseline: snap.baseline.as_ref().map(|v| v.to_string()),
        data_ahead: plan.data_ahead,
        steps: plan
            .steps
            .iter()
            .map(|s| StepJson {
                task: (&s.task).into(),
                reason: reason_name(s.reason),
                why: s.reason.to_string(),
            })
            .collect(),
        out_of_order: plan.out_of_order.iter().map(TaskJson::from).collect(),
        above_app: above.into_iter().map(TaskJson::from).collect(),
        lease: lease.as_ref().map(LeaseJson::from),
    };
    Ok(Output::new(json, out))
}
