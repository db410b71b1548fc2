// Generated code names nothing from the user's scope: every name below is
// shadowed, and the tasks still compile and register.
#![allow(
    dead_code,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_macros
)]

mod core {}
mod std {}
mod inventory {}
mod upsilon_private {}

struct Result;
struct Box;
struct Option;
struct Some;
struct None;
struct Vec;
struct String;
trait Future {}
trait Send {}
trait Sync {}
trait Into {}
trait Fn {}
type TaskFuture = ();
type TaskDef = ();
type BoxError = ();

macro_rules! file {
    () => {
        0
    };
}
macro_rules! line {
    () => {
        "line"
    };
}
macro_rules! module_path {
    () => {
        0
    };
}
macro_rules! submit {
    ($($t:tt)*) => {};
}

type Outcome = ::std::result::Result<(), ::std::io::Error>;

mod shadowed {
    pub type Result<T> = ::std::result::Result<T, ::std::io::Error>;
}

#[::upsilon::task(version = "1.0", order = 1, rollback = undo)]
async fn first(ctx: &mut ::upsilon::TaskContext) -> shadowed::Result<()> {
    let _ = ctx;
    ::std::result::Result::Ok(())
}

async fn undo(ctx: &mut ::upsilon::TaskContext) -> shadowed::Result<()> {
    let _ = ctx;
    ::std::result::Result::Ok(())
}

#[::upsilon::task(version = "1.0", order = 2)]
async fn second(ctx: &mut ::upsilon::TaskContext) -> ::std::result::Result<(), ::std::io::Error> {
    let _ = ctx;
    ::std::result::Result::Ok(())
}

mod without_prelude {
    #![no_implicit_prelude]

    #[::upsilon::task(version = "1.0", order = 3)]
    async fn third(_: &mut ::upsilon::TaskContext) -> ::std::io::Result<()> {
        ::std::result::Result::Ok(())
    }
}

fn main() {
    let registry = ::upsilon::Registry::collect().unwrap();
    ::std::assert_eq!(registry.tasks().len(), 3);
    ::std::assert!(registry.tasks()[0].has_rollback());
    let _: Outcome = ::std::result::Result::Ok(());
}
