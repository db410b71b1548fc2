use upsilon::TaskContext;

#[upsilon::task(version = "1.0", order = 4294967296)]
async fn task(ctx: &mut TaskContext) -> Result<(), std::io::Error> {
    let _ = ctx;
    Ok(())
}

fn main() {}
