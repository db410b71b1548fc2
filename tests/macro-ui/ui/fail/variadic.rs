// `...` is not stable Rust outside `extern` blocks, so rustc adds its own
// errors after the one from `#[upsilon::task]`.
use upsilon::TaskContext;

#[upsilon::task(version = "1.0", order = 1)]
async fn task(ctx: &mut TaskContext, _: ...) -> Result<(), std::io::Error> {
    let _ = ctx;
    Ok(())
}

fn main() {}
