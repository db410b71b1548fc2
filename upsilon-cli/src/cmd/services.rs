//! `services`: the services a store holds.

use serde::Serialize;

use super::Ctx;
use crate::exit::Failure;
use crate::output::Output;

#[derive(Debug, Serialize)]
struct ServicesJson {
    services: Vec<String>,
}

pub(crate) async fn run(ctx: &Ctx) -> Result<Output, Failure> {
    let services = ctx.all_services().await?;
    let text = if services.is_empty() {
        "the store holds no service yet\n".to_owned()
    } else {
        services.iter().map(|s| format!("{s}\n")).collect()
    };
    Ok(Output::new(ServicesJson { services }, text))
}
