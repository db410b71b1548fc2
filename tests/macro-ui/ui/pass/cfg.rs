use upsilon::TaskContext;

// A `#[cfg]` below the attribute removes the registration with the fn.
#[upsilon::task(version = "1.0", order = 1)]
#[cfg(any())]
async fn never_compiled(_: &mut TaskContext) -> Result<(), std::io::Error> {
    Ok(())
}

#[upsilon::task(version = "1.0", order = 1)]
#[cfg(all())]
async fn compiled(_: &mut TaskContext) -> Result<(), std::io::Error> {
    Ok(())
}

fn main() {
    let registry = upsilon::Registry::collect().unwrap();
    let ids: Vec<&str> = registry.tasks().iter().map(|t| t.id()).collect();
    assert_eq!(ids, ["compiled"]);
}
