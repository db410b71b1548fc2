use upsilon::TaskContext;

#[upsilon::task(version = "1.0", order = 1)]
async fn task(ctx: &mut TaskContext) -> Result<u64, std::io::Error> {
    let _ = ctx;
    Ok(1)
}

fn main() {}
