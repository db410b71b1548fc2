use upsilon::TaskContext;

#[upsilon::task]
async fn task(ctx: &mut TaskContext) -> Result<(), std::io::Error> {
    let _ = ctx;
    Ok(())
}

fn main() {}
