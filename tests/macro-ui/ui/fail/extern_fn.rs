use upsilon::TaskContext;

#[upsilon::task(version = "1.0", order = 1)]
async extern "C" fn task(ctx: &mut TaskContext) -> Result<(), std::io::Error> {
    let _ = ctx;
    Ok(())
}

fn main() {}
