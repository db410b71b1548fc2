use upsilon::TaskContext;

fn undo() {}

#[upsilon::task(version = "1.0", order = 1, rollback = undo)]
async fn task(ctx: &mut TaskContext) -> Result<(), std::io::Error> {
    let _ = ctx;
    Ok(())
}

fn main() {}
