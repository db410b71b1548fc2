#[upsilon::task(version = "1.0", order = 1)]
struct Task;

fn main() {}
