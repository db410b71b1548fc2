use upsilon::TaskContext;

/// Copies legacy rows into the new table.
///
/// Runs in batches of 1000.
#[upsilon::task(version = "1.1", order = 1)]
async fn backfill(_: &mut TaskContext) -> Result<(), std::io::Error> {
    Ok(())
}

#[doc = "  Attribute form, trimmed.  "]
#[upsilon::task(version = "1.1", order = 2)]
async fn attribute_form(_: &mut TaskContext) -> Result<(), std::io::Error> {
    Ok(())
}

/** Block form. */
#[upsilon::task(version = "1.1", order = 3)]
async fn block_form(_: &mut TaskContext) -> Result<(), std::io::Error> {
    Ok(())
}

fn main() {
    let registry = upsilon::Registry::collect().unwrap();
    let descriptions: Vec<&str> = registry.tasks().iter().map(|t| t.description()).collect();
    assert_eq!(
        descriptions,
        [
            "Copies legacy rows into the new table.\n\nRuns in batches of 1000.",
            "Attribute form, trimmed.",
            "Block form.",
        ]
    );
}
