//! `unlock`: the operator forces a lease free, fenced and recorded.

use std::io::{BufRead, IsTerminal, Write};

use serde::Serialize;
use upsilon::backend::{LeaseInfo, Unlocked};
use upsilon::Holder;

use super::status::lease_line;
use super::Ctx;
use crate::args::UnlockArgs;
use crate::exit::{Code, Failure};
use crate::json::LeaseJson;
use crate::output::Output;
use crate::text;

#[derive(Debug, Serialize)]
struct UnlockJson {
    service: String,
    unlocked: bool,
    cleared: Option<LeaseJson>,
    fence: Option<u64>,
    recorded: bool,
    taken_by: Option<LeaseJson>,
    held_ms: u64,
    released: bool,
}

/// The operator as a holder: this host and process, with a run id that
/// says what it was for.
fn operator() -> Holder {
    let me = Holder::current();
    Holder {
        run_id: format!("unlock-{}", me.run_id),
        ..me
    }
}

pub(crate) async fn run(ctx: &Ctx, args: &UnlockArgs) -> Result<Output, Failure> {
    let service = ctx.one_service("unlock")?;
    let (_, lease) = ctx.known(service).await?;
    let Some(seen) = lease else {
        return Ok(nothing(
            service,
            format!("the lease of `{service}` is free: nothing to unlock\n"),
        ));
    };
    if !args.yes {
        confirm(service, &seen)?;
    }
    let wait = !args.no_wait;
    if wait && !seen.expires_in().is_zero() {
        eprintln!(
            "holding the lease for up to {} (until the freed one would have expired), so that a live holder stops at its next renewal before another node starts a task; --no-wait frees it at once",
            text::duration(seen.expires_in())
        );
    }
    let backend = &*ctx.backend;
    let done = upsilon::backend::unlock(backend, backend, service, &operator(), wait)
        .await
        .map_err(|e| Failure::runner(&e))?;
    let Some(done) = done else {
        return Ok(nothing(
            service,
            format!("the lease of `{service}` was freed (released or expired) before the unlock: nothing to unlock\n"),
        ));
    };
    Ok(Output::new(
        json(service, &done),
        summary(service, &seen, &done),
    ))
}

fn nothing(service: &str, text: String) -> Output {
    Output::new(
        UnlockJson {
            service: service.to_owned(),
            unlocked: false,
            cleared: None,
            fence: None,
            recorded: false,
            taken_by: None,
            held_ms: 0,
            released: true,
        },
        text,
    )
}

/// Asks on the terminal; refuses without one.
fn confirm(service: &str, seen: &LeaseInfo) -> Result<(), Failure> {
    if !std::io::stdin().is_terminal() {
        return Err(Failure::new(
            Code::Refused,
            format!(
                "not unlocked: the lease of `{service}` is {}; stdin is not a terminal to confirm on, so pass --yes to force it free",
                lease_line(Some(seen))
            ),
        ));
    }
    let mut stderr = std::io::stderr();
    let _ = write!(
        stderr,
        "The lease of `{service}` is {}.\nForce it free? The holder's writes to the store are refused from then on; a live holder stops at its next renewal. [y/N] ",
        lease_line(Some(seen))
    );
    let _ = stderr.flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        Ok(())
    } else {
        Err(Failure::new(
            Code::Refused,
            format!("not unlocked: the release of `{service}`'s lease was not confirmed"),
        ))
    }
}

fn json(service: &str, done: &Unlocked) -> UnlockJson {
    UnlockJson {
        service: service.to_owned(),
        unlocked: true,
        cleared: Some((&done.cleared).into()),
        fence: done.fence,
        recorded: done.recorded,
        taken_by: done.taken_by.as_ref().map(LeaseJson::from),
        held_ms: done.held.as_millis() as u64,
        released: done.released,
    }
}

fn summary(service: &str, seen: &LeaseInfo, done: &Unlocked) -> String {
    let c = &done.cleared;
    let held = c
        .held_for()
        .map(|d| format!(", held for {}", text::duration(d)))
        .unwrap_or_else(|| {
            ", held for an unknown time (this backend does not record when a lease was granted)"
                .into()
        });
    let mut out = format!(
        "unlocked `{service}`: freed the lease of {} with fence {}{held}\n",
        c.holder, c.fence
    );
    if (&seen.holder, seen.fence) != (&c.holder, c.fence) {
        out.push_str(&format!(
            "  note: the lease changed hands after it was shown (it was {}'s, fence {})\n",
            seen.holder, seen.fence
        ));
    }
    match (&done.taken_by, done.fence) {
        (Some(other), _) => out.push_str(&format!(
            "  another node, {}, was granted the lease first, with fence {}: its claim of the store refuses the old holder's writes; the unlock is not in the history\n",
            other.holder, other.fence
        )),
        (None, Some(fence)) => out.push_str(&format!(
            "  the store was claimed with fence {fence}: writes with fence {} or older are refused\n  recorded in the history as an unlock row; the lease is free{}\n",
            c.fence,
            if done.released { "" } else { " once the operator's lease expires (its release failed)" }
        )),
        (None, None) => {}
    }
    out
}
