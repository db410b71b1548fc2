//! The lease: one row per service, changed only inside `BEGIN IMMEDIATE`.

use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};
use upsilon::backend::{
    decide_acquire, expiry, fence_from_column, fence_to_column, Acquire, BackendError, Lease,
    LeaseInfo, Lock,
};
use upsilon::Holder;

use super::rows::state;
use super::{driver, exec, query_row, Now, Result, SqliteBackend};

#[async_trait]
impl Lock for SqliteBackend {
    async fn try_acquire(&self, service: &str, holder: &Holder, ttl: Duration) -> Result<Acquire> {
        let (service, holder) = (service.to_owned(), holder.clone());
        self.tx(move |tx, now| {
            let row = state(tx, &service)?;
            let history_max: i64 = query_row(
                tx,
                "SELECT COALESCE(MAX(fence), 0) FROM upsilon_history WHERE service = ?1",
                [&service],
                |r| r.get(0),
            )
            .map_err(driver)?;
            let seen = [
                fence_from_column(row.granted, "the granted fence")?,
                fence_from_column(row.columns.store_fence, "the store's fence")?,
                fence_from_column(history_max, "the history's fence")?,
            ];
            let decision = decide_acquire(&service, row.lease(now), now.lease, seen, &holder, ttl)?;
            Ok(match decision {
                Acquire::Granted(lease) => {
                    let fence = fence_to_column(lease.fence)?;
                    exec(
                        tx,
                        "UPDATE upsilon_fence SET granted = ?2 WHERE service = ?1",
                        params![service, fence],
                    )?;
                    exec(
                        tx,
                        "UPDATE upsilon_state SET lease_holder = ?3, lease_fence = ?2,
                         lease_expires_ms = ?4, lease_boot = ?5 WHERE service = ?1",
                        params![
                            service,
                            fence,
                            holder.encode(),
                            lease.expires_at_ms,
                            now.boot,
                        ],
                    )?;
                    Acquire::Granted(Lease {
                        expires_at_ms: now.reported(lease.expires_at_ms),
                        ..lease
                    })
                }
                Acquire::Held(info) => Acquire::Held(reported(now, info)),
                other => other,
            })
        })
        .await
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease> {
        let lease = lease.clone();
        self.tx(move |tx, now| {
            let renewed: Option<i64> = query_row(
                tx,
                "UPDATE upsilon_state SET lease_expires_ms = ?5
                     WHERE service = ?1 AND lease_holder = ?2 AND lease_fence = ?3
                       AND lease_expires_ms > ?4 AND lease_boot = ?6
                     RETURNING lease_expires_ms",
                params![
                    lease.service,
                    lease.holder.encode(),
                    fence_to_column(lease.fence)?,
                    now.lease,
                    expiry(now.lease, lease.ttl)?,
                    now.boot,
                ],
                |r| r.get(0),
            )
            .optional()
            .map_err(driver)?;
            match renewed {
                Some(at) => Ok(Lease {
                    expires_at_ms: now.reported(at),
                    ..lease
                }),
                None => Err(BackendError::lease_lost("renew", &lease)),
            }
        })
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let lease = lease.clone();
        self.tx(move |tx, now| {
            let n = exec(
                tx,
                "UPDATE upsilon_state SET lease_holder = NULL, lease_fence = NULL,
                     lease_expires_ms = NULL, lease_boot = NULL
                     WHERE service = ?1 AND lease_holder = ?2 AND lease_fence = ?3
                       AND lease_expires_ms > ?4 AND lease_boot = ?5",
                params![
                    lease.service,
                    lease.holder.encode(),
                    fence_to_column(lease.fence)?,
                    now.lease,
                    now.boot,
                ],
            )?;
            if n == 1 {
                Ok(())
            } else {
                Err(BackendError::lease_lost("release", &lease))
            }
        })
        .await
    }

    async fn force_release(&self, service: &str) -> Result<Option<LeaseInfo>> {
        let service = service.to_owned();
        self.tx(move |tx, now| {
            let row = state(tx, &service)?;
            let live = row
                .lease(now)
                .and_then(|l| l.live(now.lease))
                .map(|info| reported(now, info));
            // The grant counter stays in `upsilon_fence`: the next grant's
            // fence is above the freed one.
            exec(
                tx,
                "UPDATE upsilon_state SET lease_holder = NULL, lease_fence = NULL,
                 lease_expires_ms = NULL, lease_boot = NULL WHERE service = ?1",
                [&service],
            )?;
            Ok(live)
        })
        .await
    }

    async fn raise_fence(&self, service: &str, floor: u64) -> Result<()> {
        let service = service.to_owned();
        self.tx(move |tx, _| {
            state(tx, &service)?;
            exec(
                tx,
                "UPDATE upsilon_fence SET granted = MAX(granted, ?2) WHERE service = ?1",
                params![service, fence_to_column(floor)?],
            )?;
            Ok(())
        })
        .await
    }

    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>> {
        let service = service.to_owned();
        self.tx(move |tx, now| {
            let row = state(tx, &service)?;
            Ok(row
                .lease(now)
                .and_then(|l| l.live(now.lease))
                .map(|info| reported(now, info)))
        })
        .await
    }
}

/// A live lease as other nodes see it: its expiry and the time it was read
/// at as wall-clock ms, their difference from the lease clock.
fn reported(now: &Now, info: LeaseInfo) -> LeaseInfo {
    LeaseInfo {
        expires_at_ms: now.reported(info.expires_at_ms),
        now_ms: now.wall,
        ..info
    }
}
