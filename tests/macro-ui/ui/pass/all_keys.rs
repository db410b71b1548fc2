#[upsilon::task(
    version = "2.0.0-rc.1",
    order = 7u32,
    id = "check-accounts.v2",
    rollback = undo_check,
    crate = "::upsilon",
)]
async fn check(ctx: &mut upsilon::TaskContext) -> Result<(), std::io::Error> {
    let _ = ctx;
    Ok(())
}

async fn undo_check(ctx: &mut upsilon::TaskContext) -> Result<(), std::io::Error> {
    let _ = ctx;
    Ok(())
}

fn main() {
    let registry = upsilon::Registry::collect().unwrap();
    let task = &registry.tasks()[0];
    assert_eq!(task.id(), "check-accounts.v2");
    assert_eq!(task.version().to_string(), "2.0.0-rc.1");
    assert_eq!(task.order(), 7);
    assert!(task.has_rollback());
}
