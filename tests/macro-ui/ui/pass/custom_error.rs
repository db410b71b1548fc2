use std::fmt;

use upsilon::TaskContext;

#[derive(Debug)]
enum MigrationError {
    MissingColumn(&'static str),
}

impl fmt::Display for MigrationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationError::MissingColumn(c) => write!(f, "column {c} is missing"),
        }
    }
}

impl std::error::Error for MigrationError {}

#[upsilon::task(version = "1.2", order = 1)]
async fn add_column(ctx: &mut TaskContext) -> Result<(), MigrationError> {
    if ctx.is_cancelled() {
        return Err(MigrationError::MissingColumn("email"));
    }
    Ok(())
}

// Anything that converts into `Box<dyn Error + Send + Sync>` will do.
#[upsilon::task(version = "1.2", order = 2)]
async fn with_string_error(_: &mut TaskContext) -> Result<(), String> {
    Ok(())
}

#[upsilon::task(version = "1.2", order = 3)]
async fn with_box_error(_: &mut TaskContext) -> Result<(), upsilon::BoxError> {
    Ok(())
}

fn main() {
    assert_eq!(upsilon::Registry::collect().unwrap().tasks().len(), 3);
}
