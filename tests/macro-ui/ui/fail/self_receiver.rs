use upsilon::TaskContext;

struct Accounts;

impl Accounts {
    #[upsilon::task(version = "1.0", order = 1)]
    async fn backfill(&mut self, ctx: &mut TaskContext) -> Result<(), std::io::Error> {
        let _ = ctx;
        Ok(())
    }
}

fn main() {}
