use upsilon::TaskContext;

#[upsilon::task(version = "1.0.0+build", order = 1)]
async fn task(ctx: &mut TaskContext) -> Result<(), std::io::Error> {
    let _ = ctx;
    Ok(())
}

fn main() {}
