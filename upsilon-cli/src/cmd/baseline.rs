//! `baseline VERSION`: an existing deployment adopts Upsilon.

use std::time::Duration;

use serde::Serialize;
use upsilon::{AboveAppPolicy, Outcome, Upsilon};

use super::Ctx;
use crate::args::BaselineArgs;
use crate::exit::{Code, Failure};
use crate::output::Output;
use crate::text;

#[derive(Debug, Serialize)]
struct BaselineJson {
    service: String,
    version: String,
    baselined: bool,
}

/// Baselines the empty store of the service under the lease, as
/// [`upsilon::baseline`] does, with the wait this command was given.
pub(crate) async fn run(ctx: &Ctx, args: &BaselineArgs) -> Result<Output, Failure> {
    let service = ctx.one_service("baseline")?;
    let version = args.version.to_string();
    let upsilon = Upsilon::builder()
        .service(service)
        .app_version(&version)
        .baseline(&version)
        .backend(ctx.backend.clone())
        .tasks([])
        .tasks_above_app(AboveAppPolicy::Ignore)
        .max_wait(Duration::from_secs(args.max_wait))
        .build()
        .map_err(|e| Failure::runner(&e))?;
    let outcome = upsilon.run().await.map_err(|e| Failure::runner(&e))?;
    if matches!(&outcome, Outcome::Upgraded { report } if report.baselined.is_some()) {
        return Ok(Output::new(
            BaselineJson {
                service: service.to_owned(),
                version: version.clone(),
                baselined: true,
            },
            format!("baselined `{service}` at {version}: its data version is {version}, and the tasks up to it are taken as done\n"),
        ));
    }
    let snap = ctx.load(service).await?;
    let tasks = snap.tasks.keys().filter(|k| !k.is_unlock()).count();
    Err(Failure::new(
        Code::Refused,
        format!(
            "not baselined: the store of `{service}` is not empty (data version {}, baseline {}, {tasks} task{} in its history); only an empty store can be baselined",
            text::version(snap.data_version.as_ref()),
            text::version(snap.baseline.as_ref()),
            if tasks == 1 { "" } else { "s" }
        ),
    ))
}
