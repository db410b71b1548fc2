use upsilon::TaskContext;

async fn pause() {}

#[upsilon::task(version = "1.0", order = 1)]
async fn task(ctx: &mut TaskContext) -> Result<(), std::io::Error> {
    let rows = std::rc::Rc::new(vec![1, 2, 3]);
    pause().await;
    ctx.progress(rows.len() as u64, 3, "copied");
    Ok(())
}

fn main() {}
