use anyhow::Context as _;
use upsilon::TaskContext;

#[upsilon::task(version = "1.0", order = 1)]
async fn parse_settings(ctx: &mut TaskContext) -> anyhow::Result<()> {
    let _ = ctx;
    let _: u32 = "7".parse().context("the setting is a number")?;
    Ok(())
}

#[upsilon::task(version = "1.0", order = 2)]
async fn explicit(_ctx: &mut TaskContext) -> Result<(), anyhow::Error> {
    anyhow::ensure!(1 + 1 == 2, "arithmetic");
    Ok(())
}

fn main() {
    assert_eq!(upsilon::Registry::collect().unwrap().tasks().len(), 2);
}
