use upsilon::TaskContext;

#[upsilon::task(version = "1.0.0+build", order = -3, id = "a b", retries = 3, id = "x")]
fn task(ctx: &TaskContext, extra: u8) -> u32 {
    let _ = (ctx, extra);
    0
}

fn main() {
    // The fn is still there: no "cannot find function" here.
    let _ = task;
}
