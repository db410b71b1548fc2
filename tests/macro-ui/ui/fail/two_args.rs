use upsilon::TaskContext;

#[upsilon::task(version = "1.0", order = 1)]
async fn task(ctx: &mut TaskContext, retries: u32) -> Result<(), std::io::Error> {
    let _ = (ctx, retries);
    Ok(())
}

fn main() {}
