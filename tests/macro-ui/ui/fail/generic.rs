use upsilon::TaskContext;

#[upsilon::task(version = "1.0", order = 1)]
async fn task<E: std::error::Error>(ctx: &mut TaskContext) -> Result<(), E> {
    let _ = ctx;
    Ok(())
}

fn main() {}
