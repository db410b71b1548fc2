use upsilon::TaskContext;

#[upsilon::task(version = "1.1", order = 1, rollback = undo::drop_column)]
async fn add_column(ctx: &mut TaskContext) -> Result<(), std::io::Error> {
    let _ = ctx;
    Ok(())
}

#[upsilon::task(version = "1.1", order = 2, rollback = self::undo_fill)]
async fn fill_column(ctx: &mut TaskContext) -> anyhow::Result<()> {
    let _ = ctx;
    Ok(())
}

// The rollback's error type may differ from the task's.
async fn undo_fill(ctx: &mut TaskContext) -> Result<(), String> {
    let _ = ctx;
    Ok(())
}

mod undo {
    pub async fn drop_column(ctx: &mut upsilon::TaskContext) -> anyhow::Result<()> {
        let _ = ctx;
        Ok(())
    }
}

#[upsilon::task(version = "1.1", order = 3)]
async fn no_rollback(_: &mut TaskContext) -> anyhow::Result<()> {
    Ok(())
}

fn main() {
    let registry = upsilon::Registry::collect().unwrap();
    let rollbacks: Vec<bool> = registry.tasks().iter().map(|t| t.has_rollback()).collect();
    assert_eq!(rollbacks, [true, true, false]);
}
