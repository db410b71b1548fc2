use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::testing::{context, resume_from, resume_from_json};
use crate::Resources;

/// Keys 1..=n in batches: the keys after `after`, at most `size`.
fn take(n: i64, b: &Batch<i64>) -> BatchDone<i64> {
    let first = b.after.unwrap_or(0) + 1;
    let last = (first + b.size as i64 - 1).min(n);
    if first > n {
        return BatchDone::end();
    }
    BatchDone::next(last, (last - first + 1) as u64)
}

fn position(ctx: &TaskContext) -> BatchPosition<i64> {
    let saved = ctx.saved_checkpoint().expect("a checkpoint was saved");
    serde_json::from_str(&saved.position).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_rate_paces_the_batches_exactly_and_every_batch_is_checkpointed() {
    let (ctx, _cancel) = context("fill", "1.1", Resources::default());
    let t0 = Instant::now();
    let starts = Mutex::new(Vec::new());
    let saved = Mutex::new(Vec::new());
    let done = ctx
        .batches::<i64>()
        .size(50)
        .rate(100)
        .total(120)
        .run(async |b: Batch<i64>| {
            starts.lock().unwrap().push(t0.elapsed());
            if b.number > 1 {
                saved.lock().unwrap().push(position(&ctx));
            }
            Ok(take(120, &b))
        })
        .await
        .unwrap();
    // 50 rows at 100 a second: half a second each; 20 rows: a fifth.
    let ms = |m| Duration::from_millis(m);
    assert_eq!(
        *starts.lock().unwrap(),
        vec![ms(0), ms(500), ms(1000), ms(1200)]
    );
    assert_eq!((done.batches, done.rows, done.resumed_from), (3, 120, None));
    let after: Vec<_> = saved
        .lock()
        .unwrap()
        .iter()
        .map(|p| (p.last, p.rows, p.batches))
        .collect();
    assert_eq!(after, vec![(50, 50, 1), (100, 100, 2), (120, 120, 3)]);
    let c = ctx.saved_checkpoint().unwrap();
    assert_eq!((c.done, c.total), (Some(120), Some(120)));
}

#[tokio::test(start_paused = true)]
async fn a_pause_follows_every_batch_but_the_last() {
    let (ctx, _cancel) = context("fill", "1.1", Resources::default());
    let t0 = Instant::now();
    let starts = Mutex::new(Vec::new());
    ctx.batches::<i64>()
        .size(10)
        .pause(Duration::from_millis(250))
        .run(async |b: Batch<i64>| {
            starts.lock().unwrap().push(t0.elapsed().as_millis());
            Ok(take(25, &b))
        })
        .await
        .unwrap();
    assert_eq!(*starts.lock().unwrap(), vec![0, 250, 500, 750]);
    assert_eq!(t0.elapsed(), Duration::from_millis(750));
}

#[tokio::test(start_paused = true)]
async fn cancellation_stops_the_loop_between_batches_and_says_after_which() {
    let (ctx, cancel) = context("fill", "1.1", Resources::default());
    let ran = Mutex::new(Vec::new());
    let err = ctx
        .batches::<i64>()
        .size(10)
        .pause(Duration::from_secs(3600))
        .run(async |b: Batch<i64>| {
            ran.lock().unwrap().push(b.number);
            if b.number == 2 {
                cancel.cancel();
            }
            Ok(take(100, &b))
        })
        .await
        .unwrap_err();
    assert_eq!(
        *ran.lock().unwrap(),
        vec![1, 2],
        "no batch starts once cancelled"
    );
    assert!(
        matches!(
            err,
            BatchError::Cancelled {
                batch: 2,
                rows: 20,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "task fill@1.1.0: cancelled after batch 2 (20 rows done); the next attempt resumes from there"
    );
    // The second batch's checkpoint was saved before the loop stopped.
    assert_eq!(position(&ctx).last, 20);
}

#[tokio::test(start_paused = true)]
async fn a_failed_batch_is_named_and_its_checkpoint_stays_at_the_batch_before() {
    let (ctx, _cancel) = context("fill", "1.1", Resources::default());
    let err = ctx
        .batches::<i64>()
        .size(100)
        .run(async |b: Batch<i64>| {
            if b.number == 3 {
                return Err(std::io::Error::other("the table is locked").into());
            }
            Ok(take(1000, &b))
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "task fill@1.1.0: batch 3 (keys after 200) failed: the table is locked"
    );
    assert_eq!(
        position(&ctx),
        BatchPosition {
            last: 200,
            rows: 200,
            batches: 2
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_loop_resumes_after_the_saved_position() {
    let (ctx, _cancel) = context("fill", "1.1", Resources::default());
    let from = BatchPosition {
        last: 200i64,
        rows: 200,
        batches: 2,
    };
    resume_from(&ctx, &from);
    let firsts = Mutex::new(Vec::new());
    let done = ctx
        .batches::<i64>()
        .size(100)
        .run(async |b: Batch<i64>| {
            firsts
                .lock()
                .unwrap()
                .push((b.after, b.number, b.rows_before));
            Ok(take(450, &b))
        })
        .await
        .unwrap();
    assert_eq!(
        *firsts.lock().unwrap(),
        vec![
            (Some(200), 3, 200),
            (Some(300), 4, 300),
            (Some(400), 5, 400),
            (Some(450), 6, 450)
        ]
    );
    assert_eq!(done.resumed_from, Some(from));
    assert_eq!((done.batches, done.rows), (3, 450));
}

#[tokio::test(start_paused = true)]
async fn a_position_of_another_type_is_an_error_naming_the_task_not_a_restart() {
    let (ctx, _cancel) = context("fill", "1.1", Resources::default());
    resume_from_json(&ctx, r#"{"last":"user-17","rows":17,"batches":1}"#);
    let ran = std::sync::atomic::AtomicBool::new(false);
    let err = ctx
        .batches::<i64>()
        .run(async |b: Batch<i64>| {
            ran.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(take(10, &b))
        })
        .await
        .unwrap_err();
    assert!(
        !ran.into_inner(),
        "nothing runs from a position that does not read"
    );
    let text = err.to_string();
    for part in [
        "task fill@1.1.0",
        "attempt 1",
        "does not read as `upsilon::batch::BatchPosition<i64>`",
        "give the task a new id",
    ] {
        assert!(text.contains(part), "{part:?} missing from: {text}");
    }
    assert!(matches!(
        err,
        BatchError::Checkpoint(CheckpointError::Incompatible { .. })
    ));
}

#[tokio::test]
async fn a_context_reads_back_the_position_it_saved_and_nothing_before() {
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct At {
        table: String,
        id: u64,
    }
    let (ctx, _cancel) = context("fill", "1.1", Resources::default());
    assert_eq!(ctx.checkpoint::<At>().unwrap(), None);
    let at = At {
        table: "users".into(),
        id: 9,
    };
    ctx.save_checkpoint_with_progress(&at, 9, Some(90))
        .await
        .unwrap();
    assert_eq!(ctx.checkpoint::<At>().unwrap(), Some(at));
    let c = ctx.saved_checkpoint().unwrap();
    assert_eq!((c.done, c.total), (Some(9), Some(90)));
}
