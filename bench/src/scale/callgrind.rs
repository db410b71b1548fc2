//! 5a as an instruction count: the benchmark runs itself under valgrind's
//! callgrind (`upsilon-bench scale-workload`), collecting only inside the
//! measured function, so the count is the workload's alone and does not
//! move with the machine's load.

use std::hint::black_box;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Instant;

use super::{collect_and_plan_once, completed_snapshot, version_of, Names};

/// What one callgrind child measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Measured {
    /// 5a against an empty store.
    Fresh,
    /// 5a against a store with every task completed.
    Completed,
    /// The reference work that gives the machine's instruction rate.
    Reference,
}

/// `upsilon-bench scale-workload`: one run of a measured function, for
/// callgrind (the benchmark starts it itself).
#[derive(Debug, clap::Args)]
pub struct Workload {
    /// Tasks collected, validated and planned.
    #[arg(long, value_name = "N", value_parser = crate::at_least_one)]
    tasks: usize,
    /// What to run.
    #[arg(long, value_enum)]
    what: Measured,
}

/// The function names callgrind collects inside.
const MEASURED_5A: &str = "*collect_and_plan_once*";
const MEASURED_REFERENCE: &str = "*reference_work*";

/// The size of the reference work: about 40 M instructions.
pub const REFERENCE_N: usize = 200_000;

pub fn workload_main(w: Workload) -> ExitCode {
    let result = (|| -> anyhow::Result<()> {
        if w.what == Measured::Reference {
            black_box(reference_work(black_box(REFERENCE_N)));
            return Ok(());
        }
        let names = Names::new(w.tasks);
        let app = upsilon::parse_version(&version_of(w.tasks - 1, 100))?;
        let snapshot = match w.what {
            Measured::Completed => completed_snapshot(&names, &app)?,
            _ => upsilon::backend::Snapshot::default(),
        };
        // Returned, so that dropping them is outside the count as it is
        // outside the timing.
        let (registry, plan) = collect_and_plan_once(&names, &snapshot, &app)?;
        black_box((&registry, &plan));
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("upsilon-bench scale-workload: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Work of a fixed instruction count whose time gives the machine's
/// instructions per second: allocation, sorting and a hash map, the kind of
/// work 5a does.
#[inline(never)]
pub fn reference_work(n: usize) -> u64 {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v: Vec<u64> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        })
        .collect();
    v.sort_unstable();
    let strings: Vec<String> = v.iter().step_by(8).map(|x| format!("{x:x}")).collect();
    let set: std::collections::HashSet<&str> = strings.iter().map(String::as_str).collect();
    v[n / 2] ^ set.len() as u64
}

/// The fastest of `runs` native runs of the reference work, in seconds.
pub fn reference_seconds(runs: usize) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            black_box(reference_work(black_box(REFERENCE_N)));
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Instructions (callgrind's `Ir`) of one `scale-workload` child, or why
/// there is no count (valgrind missing).
pub fn instructions(
    tasks: usize,
    what: Measured,
    dir: &Path,
) -> anyhow::Result<Result<u64, String>> {
    let exe = std::env::current_exe()?;
    let out_file = dir.join(format!("callgrind-5a-{what:?}.out"));
    let what_arg = match what {
        Measured::Fresh => "fresh",
        Measured::Completed => "completed",
        Measured::Reference => "reference",
    };
    let toggle = match what {
        Measured::Reference => MEASURED_REFERENCE,
        _ => MEASURED_5A,
    };
    let run = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg(format!("--toggle-collect={toggle}"))
        .arg(&exe)
        .args([
            "scale-workload",
            "--tasks",
            &tasks.to_string(),
            "--what",
            what_arg,
        ])
        .output();
    let out = match run {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Err("valgrind not found".to_owned()))
        }
        Err(e) => return Err(e.into()),
    };
    anyhow::ensure!(
        out.status.success(),
        "valgrind --tool=callgrind {} scale-workload failed:\n{}",
        exe.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&out_file)?;
    let _ = std::fs::remove_file(&out_file);
    let ir = total_ir(&text).ok_or_else(|| {
        anyhow::anyhow!("no `summary:` or `totals:` line in {}", out_file.display())
    })?;
    anyhow::ensure!(ir > 0, "callgrind counted nothing inside {toggle}");
    Ok(Ok(ir))
}

/// The first event count of callgrind's `totals:` (or `summary:`) line: `Ir`.
fn total_ir(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_is_read_from_either_line() {
        assert_eq!(
            total_ir("events: Ir\nfl=x\n0 3\ntotals: 1234\n"),
            Some(1234)
        );
        assert_eq!(total_ir("events: Ir Dr\nsummary: 77 5\n"), Some(77));
        assert_eq!(total_ir("events: Ir\n"), None);
    }
}
