use upsilon::TaskContext;

const VERSION: &str = "1.1";

#[upsilon::task(version = VERSION, order = 1)]
async fn task(ctx: &mut TaskContext) -> Result<(), std::io::Error> {
    let _ = ctx;
    Ok(())
}

fn main() {}
