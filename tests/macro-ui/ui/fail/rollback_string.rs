use upsilon::TaskContext;

async fn undo(_: &mut TaskContext) -> Result<(), std::io::Error> {
    Ok(())
}

#[upsilon::task(version = "1.0", order = 1, rollback = "undo")]
async fn task(ctx: &mut TaskContext) -> Result<(), std::io::Error> {
    let _ = ctx;
    Ok(())
}

fn main() {}
