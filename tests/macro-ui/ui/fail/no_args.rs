#[upsilon::task(version = "1.0", order = 1)]
async fn task() -> Result<(), std::io::Error> {
    Ok(())
}

fn main() {}
