// Forms of the one signature that are all accepted. The argument's type is
// checked by name: any path that ends in `TaskContext`.
use upsilon::TaskContext;

mod ctx {
    pub use upsilon::TaskContext;
}

#[upsilon::task(version = "1", order = 1)]
async fn explicit_lifetime<'a>(ctx: &'a mut upsilon::TaskContext) -> Result<(), std::io::Error> {
    let _ = ctx;
    Ok(())
}

#[upsilon::task(version = "1", order = 2)]
pub async fn public_mut_binding(mut ctx: &mut ctx::TaskContext) -> std::io::Result<()> {
    let _ = &mut ctx;
    Ok(())
}

#[upsilon::task(version = "1", order = 3)]
pub(crate) async fn boxed_error(
    _: &mut upsilon::TaskContext,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    Ok(())
}

#[upsilon::task(version = "1", order = 4)]
async fn r#match(ctx: &mut ctx::TaskContext) -> Result<(), std::io::Error> {
    let _: &mut TaskContext = ctx;
    Ok(())
}

#[upsilon::task(version = "1", order = 5)]
#[allow(clippy::unused_async)]
async fn other_attributes_kept(_: &mut TaskContext) -> Result<(), std::io::Error> {
    Ok(())
}

fn main() {
    let registry = upsilon::Registry::collect().unwrap();
    let ids: Vec<&str> = registry.tasks().iter().map(|t| t.id()).collect();
    assert_eq!(
        ids,
        [
            "explicit_lifetime",
            "public_mut_binding",
            "boxed_error",
            "match",
            "other_attributes_kept",
        ]
    );
}
