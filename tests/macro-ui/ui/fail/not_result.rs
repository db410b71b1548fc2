use upsilon::TaskContext;

#[upsilon::task(version = "1.0", order = 1)]
async fn task(ctx: &mut TaskContext) -> Option<()> {
    let _ = ctx;
    None
}

fn main() {}
