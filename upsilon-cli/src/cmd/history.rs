//! `history`: every attempt, oldest first.

use serde::Serialize;
use upsilon::backend::HistoryEntry;

use super::status::table;
use super::Ctx;
use crate::args::HistoryArgs;
use crate::exit::Failure;
use crate::json::RowJson;
use crate::output::Output;

#[derive(Debug, Serialize)]
struct HistoryJson {
    entries: Vec<RowJson>,
}

pub(crate) async fn run(ctx: &Ctx, args: &HistoryArgs) -> Result<Output, Failure> {
    let keep = |row: &HistoryEntry| {
        args.task_version
            .as_ref()
            .is_none_or(|v| &row.key.version == v)
            && args.state.is_none_or(|s| row.state == s.attempt_state())
    };
    let mut json = Vec::new();
    let mut text = String::new();
    for service in ctx.services().await? {
        let rows = ctx.history(&service).await?;
        let rows: Vec<&HistoryEntry> = rows.iter().filter(|r| keep(r)).collect();
        json.extend(rows.iter().map(|r| RowJson::new(&service, r)));
        text.push_str(&format!(
            "service {service}: {} attempt{}\n",
            rows.len(),
            if rows.len() == 1 { "" } else { "s" }
        ));
        text.push_str(&table(&rows, "  "));
        for row in rows.iter().filter(|r| r.key.is_unlock()) {
            text.push_str(&format!(
                "  unlock #{} by {}: {}\n",
                row.attempt, row.holder, row.description
            ));
        }
    }
    if text.is_empty() {
        text = "the store holds no service yet\n".into();
    }
    Ok(Output::new(HistoryJson { entries: json }, text))
}
