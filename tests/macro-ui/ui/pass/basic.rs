use upsilon::TaskContext;

#[upsilon::task(version = "1.1", order = 1)]
async fn backfill_accounts(ctx: &mut TaskContext) -> Result<(), std::io::Error> {
    ctx.progress(0, 1, "copying");
    Ok(())
}

fn main() {
    let registry = upsilon::Registry::collect().unwrap();
    let task = &registry.tasks()[0];
    assert_eq!(task.id(), "backfill_accounts");
    assert_eq!(task.version().to_string(), "1.1.0");
    assert_eq!(task.order(), 1);
    assert_eq!(task.description(), "");
    assert!(!task.has_rollback());
}
