//! `status --watch`: re-read every interval and redraw, until interrupted.
//!
//! On a terminal, the status is redrawn in place, with a spinner and the
//! elapsed time of the running task (indicatif). Elsewhere, each status that
//! differs from the last is printed, with a blank line between; with
//! `--json`, one JSON object per read, one per line.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::status::{self, Read};
use super::Ctx;
use crate::exit::{Code, Failure};
use crate::output::{error_json, print_json, Secrets};

/// What one read shows.
enum Frame {
    Read(Vec<Read>),
    Failed(Failure),
}

async fn frame(ctx: &Ctx) -> Frame {
    match status::read_all(ctx).await {
        Ok(reads) => Frame::Read(reads),
        Err(f) => Frame::Failed(f),
    }
}

pub(crate) async fn run(ctx: &Ctx, interval: Duration, json: bool, secrets: &Secrets) -> ExitCode {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut screen = (!json && std::io::stdout().is_terminal()).then(Screen::new);
    let mut last = String::new();
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        let frame = frame(ctx).await;
        if json {
            print_json(&frame_json(ctx, frame), secrets);
            continue;
        }
        let text = secrets.clean(&frame_text(ctx, &frame));
        match &mut screen {
            Some(screen) => screen.draw(&text, &frame, secrets),
            None if text != last => {
                if !last.is_empty() {
                    println!();
                }
                print!("{text}");
                last = text;
            }
            None => {}
        }
    }
    if let Some(screen) = screen {
        screen.finish();
    }
    Code::Ok.into()
}

fn frame_json(ctx: &Ctx, frame: Frame) -> String {
    match frame {
        Frame::Read(reads) => status::render(ctx, &reads).json,
        Frame::Failed(f) => error_json(f),
    }
}

fn frame_text(ctx: &Ctx, frame: &Frame) -> String {
    match frame {
        Frame::Read(reads) => status::render(ctx, reads).text,
        Frame::Failed(f) => format!("error: {f} (still watching)\n"),
    }
}

/// The terminal's live view: the status text, and a spinner for each
/// running task with how long it has run.
struct Screen {
    multi: MultiProgress,
    text: ProgressBar,
    /// The running attempt a spinner follows: (service, task, attempt, fence).
    running: Vec<(String, ProgressBar)>,
}

impl Screen {
    fn new() -> Screen {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let text = multi.add(ProgressBar::new_spinner());
        text.set_style(ProgressStyle::with_template("{msg}").expect("a valid template"));
        Screen {
            multi,
            text,
            running: Vec::new(),
        }
    }

    fn draw(&mut self, text: &str, frame: &Frame, secrets: &Secrets) {
        self.text.set_message(text.trim_end().to_owned());
        let wanted: Vec<(String, String, Duration)> = match frame {
            Frame::Read(reads) => reads
                .iter()
                .filter_map(|r| {
                    let row = r.running().filter(|row| r.is_live(row))?;
                    let id = format!("{}/{}#{}/{}", r.service, row.key, row.attempt, row.fence);
                    let label = format!("{}: {} attempt {}", r.service, row.key, row.attempt);
                    Some((id, secrets.clean(&label), r.elapsed(row)))
                })
                .collect(),
            Frame::Failed(_) => Vec::new(),
        };
        self.running.retain(|(id, bar)| {
            let keep = wanted.iter().any(|(w, ..)| w == id);
            if !keep {
                bar.finish_and_clear();
            }
            keep
        });
        for (id, label, elapsed) in wanted {
            if self.running.iter().any(|(r, _)| *r == id) {
                continue;
            }
            let bar = self
                .multi
                .add(ProgressBar::new_spinner().with_elapsed(elapsed));
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg}, running for {elapsed}")
                    .expect("a valid template"),
            );
            bar.set_message(label);
            bar.enable_steady_tick(Duration::from_millis(120));
            self.running.push((id, bar));
        }
    }

    fn finish(self) {
        for (_, bar) in self.running {
            bar.finish_and_clear();
        }
        self.text.finish();
    }
}
