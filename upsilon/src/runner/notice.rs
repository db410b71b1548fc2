//! The holder's notice (`crate::backend::Notice`): the digest of what a
//! plan depends on besides the store, and the notice a write carries when
//! it leaves the plan settled.

use super::Inner;
use crate::backend::{Change, Notice, PlanDigest, PlanHasher, Snapshot};

impl Inner {
    /// The digest of this runner's plan inputs: two runners with the same
    /// digest decide the same from the same store ([`crate::backend::Notice`]).
    pub(super) fn digest(&self) -> PlanDigest {
        *self.digest.get_or_init(|| {
            let c = &self.config;
            let mut h = PlanHasher::new();
            h.part(format_args!("upsilon {}", env!("CARGO_PKG_VERSION")));
            h.part(format_args!("{:?}", self.service));
            h.part(format_args!("{}", self.app));
            h.part(format_args!(
                "{:?} {:?} {:?} {:?}",
                c.plan, c.data_ahead, c.above_app, c.baseline
            ));
            for task in self.registry.tasks() {
                h.part(format_args!(
                    "{} {:?} {} {} {}",
                    task.version(),
                    task.id(),
                    task.order(),
                    task.location(),
                    task.has_rollback()
                ));
            }
            h.finish()
        })
    }

    /// Whether `snapshot` leaves this runner nothing to do and nothing to
    /// warn about: what a holder's [`crate::backend::Notice`] promises.
    fn settled(&self, snapshot: &Snapshot) -> bool {
        let plan = self.plan(snapshot);
        self.nothing_to_do(snapshot, &plan) && !plan.data_ahead && plan.out_of_order.is_empty()
    }

    /// The notice that rides with a write of `changes` under `fence` that
    /// records a data version and after which the plan is settled (nothing
    /// to do, nothing to warn about): the last write of a finished upgrade.
    /// `mirror` is the holder's mirror before the write, `after` the checked
    /// part of it the write changes.
    pub(super) fn notice(
        &self,
        fence: u64,
        mirror: &Snapshot,
        after: &Snapshot,
        changes: &[Change],
    ) -> Option<Notice> {
        if !changes
            .iter()
            .any(|c| matches!(c, Change::DataVersion(_) | Change::Baseline(_)))
        {
            return None;
        }
        let mut whole = mirror.clone();
        whole.absorb(after.clone());
        self.settled(&whole).then(|| Notice {
            fence,
            data_version: whole.data_version.clone(),
            plan: self.digest(),
        })
    }
}
