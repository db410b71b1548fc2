// A crate that re-exports upsilon under its own path, as a framework would.
mod framework {
    pub mod tasks {
        pub use ::upsilon::{__private, TaskContext};
    }
}

use framework::tasks::TaskContext;

#[upsilon::task(version = "1.0", order = 1, crate = "crate::framework::tasks")]
async fn through_reexport(ctx: &mut TaskContext) -> Result<(), std::io::Error> {
    let _ = ctx;
    Ok(())
}

#[upsilon::task(version = "1.0", order = 2, crate = "self::framework::tasks", rollback = undo)]
async fn relative(_: &mut TaskContext) -> Result<(), std::io::Error> {
    Ok(())
}

async fn undo(_: &mut TaskContext) -> Result<(), std::io::Error> {
    Ok(())
}

fn main() {
    let registry = upsilon::Registry::collect().unwrap();
    let ids: Vec<&str> = registry.tasks().iter().map(|t| t.id()).collect();
    assert_eq!(ids, ["through_reexport", "relative"]);
}
