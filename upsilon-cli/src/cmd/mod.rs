//! One module per command; what they share: the backend, the service or
//! services a command covers, and whether a service exists.

pub(crate) mod baseline;
pub(crate) mod check;
pub(crate) mod history;
pub(crate) mod plan;
pub(crate) mod services;
pub(crate) mod status;
pub(crate) mod unlock;
pub(crate) mod watch;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use upsilon::backend::{Backend, LeaseInfo, Snapshot};

use crate::exit::{Code, Failure};

/// What every command that reads a store works with.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub(crate) backend: Arc<dyn Backend>,
    /// The service given (or the application's own).
    pub(crate) service: Option<String>,
}

impl Ctx {
    /// The services a command covers: the one given, which must exist, or
    /// every service the store holds.
    pub(crate) async fn services(&self) -> Result<Vec<String>, Failure> {
        match &self.service {
            Some(s) => {
                self.known(s).await?;
                Ok(vec![s.clone()])
            }
            None => self.all_services().await,
        }
    }

    pub(crate) async fn all_services(&self) -> Result<Vec<String>, Failure> {
        match self.backend.services().await {
            Ok(all) => Ok(all),
            Err(e) => Err(Failure::backend("listing the store's services", &e)),
        }
    }

    /// The one service given, or a usage error naming `command`.
    pub(crate) fn one_service(&self, command: &str) -> Result<&str, Failure> {
        self.service.as_deref().ok_or_else(|| {
            Failure::new(
                Code::Usage,
                format!("`{command}` needs a service: pass --service NAME or set UPSILON_SERVICE"),
            )
        })
    }

    /// The snapshot and lease of `service`, or [`Code::NotFound`] when the
    /// store holds nothing for it: no data version, no baseline, no fence, no
    /// history and no lease. Reading a service does not create it, so a
    /// misspelt name is reported rather than shown as an empty store.
    pub(crate) async fn known(
        &self,
        service: &str,
    ) -> Result<(Snapshot, Option<LeaseInfo>), Failure> {
        let snapshot = self.load(service).await?;
        let lease = self.lease(service).await?;
        if snapshot.is_empty()
            && snapshot.fence == 0
            && snapshot.tasks.is_empty()
            && lease.is_none()
        {
            return Err(Failure::new(
                Code::NotFound,
                format!(
                    "the store holds no service `{service}`{}",
                    self.hint().await
                ),
            ));
        }
        Ok((snapshot, lease))
    }

    /// The services it does hold, for a not-found message, when the backend
    /// can list them.
    async fn hint(&self) -> String {
        match self.backend.services().await {
            Ok(all) if all.is_empty() => "; it holds none yet".to_owned(),
            Ok(all) => format!("; it holds: {}", all.join(", ")),
            Err(_) => String::new(),
        }
    }

    pub(crate) async fn load(&self, service: &str) -> Result<Snapshot, Failure> {
        self.backend
            .load(service)
            .await
            .map_err(|e| Failure::backend(&format!("reading the store of `{service}`"), &e))
    }

    pub(crate) async fn lease(&self, service: &str) -> Result<Option<LeaseInfo>, Failure> {
        self.backend
            .current(service)
            .await
            .map_err(|e| Failure::backend(&format!("reading the lease of `{service}`"), &e))
    }

    pub(crate) async fn history(
        &self,
        service: &str,
    ) -> Result<Vec<upsilon::backend::HistoryEntry>, Failure> {
        self.backend
            .history(service)
            .await
            .map_err(|e| Failure::backend(&format!("reading the history of `{service}`"), &e))
    }
}
