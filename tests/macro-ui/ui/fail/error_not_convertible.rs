use upsilon::TaskContext;

struct NotAnError;

#[upsilon::task(version = "1.0", order = 1)]
async fn task(ctx: &mut TaskContext) -> Result<(), NotAnError> {
    let _ = ctx;
    Ok(())
}

fn main() {}
