//! Tier health: a tier whose save failed with a transient error (server
//! down, timeouts, 5xx) is taken out of later saves and probed in the
//! background with bounded exponential backoff; it takes part again as
//! soon as a probe answers. So a dead tier costs the training loop nothing
//! (no staging memory held by requests that cannot succeed, no retries on
//! the save path) and a tier that comes back catches up with the next save
//! it takes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::tier::Tier;

/// Backoff of the health probe of a tier that is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeBackoff {
    /// Wait before the first probe.
    pub initial: Duration,
    /// Longest wait between two probes.
    pub max: Duration,
    /// Bound on one probe request.
    pub timeout: Duration,
}

impl Default for ProbeBackoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Whether a tier takes part in saves right now.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TierStatus {
    /// The tier's location.
    pub tier: String,
    /// `None` if available; else the failure that took it out, and since
    /// when.
    pub down: Option<(Error, Instant)>,
}

impl TierStatus {
    /// Whether the tier takes part in the next save.
    pub fn is_available(&self) -> bool {
        self.down.is_none()
    }
}

#[derive(Debug)]
struct Down {
    cause: Error,
    since: Instant,
    probe: Duration,
}

#[derive(Debug, Default)]
struct State {
    down: Option<Down>,
    prober: Option<tokio::task::JoinHandle<()>>,
}

/// The health of one tier, shared by its saves and its prober.
#[derive(Debug)]
pub(crate) struct Health {
    tier: Arc<dyn Tier>,
    /// An object path that never exists: probing it costs one `HEAD`.
    probe_path: String,
    backoff: ProbeBackoff,
    state: Mutex<State>,
}

impl Health {
    pub(crate) fn new(tier: Arc<dyn Tier>, run: &str, backoff: ProbeBackoff) -> Arc<Self> {
        Arc::new(Self {
            tier,
            probe_path: format!("{run}/.health-probe"),
            backoff,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Some(Error::Unavailable)` if the tier is down now.
    pub(crate) fn unavailable(&self) -> Option<Error> {
        let g = self.lock();
        g.down.as_ref().map(|d| Error::Unavailable {
            tier: self.tier.location(),
            probe: d.probe,
            cause: Box::new(d.cause.clone()),
        })
    }

    pub(crate) fn status(&self) -> TierStatus {
        let g = self.lock();
        TierStatus {
            tier: self.tier.location(),
            down: g.down.as_ref().map(|d| (d.cause.clone(), d.since)),
        }
    }

    /// Records the outcome of a save on this tier. A transient failure
    /// takes the tier out and starts the prober (on the current runtime).
    pub(crate) fn record(self: &Arc<Self>, outcome: Option<&Error>) {
        let Some(e) = outcome.filter(|e| e.is_retryable()) else {
            return;
        };
        let mut g = self.lock();
        if g.down.is_some() {
            return;
        }
        tracing::warn!(tier = %self.tier.location(), error = %e, "tier taken out of saves until it answers a probe");
        g.down = Some(Down {
            cause: e.clone(),
            since: Instant::now(),
            probe: self.backoff.initial,
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let me = self.clone();
            g.prober = Some(rt.spawn(async move { me.probe_until_up().await }));
        }
    }

    async fn probe(&self) -> Result<()> {
        match tokio::time::timeout(self.backoff.timeout, self.tier.size(&self.probe_path)).await {
            Ok(Ok(_)) | Ok(Err(Error::NotFound { .. })) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::backend(
                self.tier.location(),
                true,
                format!("health probe timed out after {:?}", self.backoff.timeout),
            )),
        }
    }

    async fn probe_until_up(self: Arc<Self>) {
        let mut wait = self.backoff.initial;
        loop {
            tokio::time::sleep(wait).await;
            match self.probe().await {
                Ok(()) => {
                    let mut g = self.lock();
                    if let Some(d) = g.down.take() {
                        tracing::info!(tier = %self.tier.location(), after = ?d.since.elapsed(), "tier answers again; back in saves");
                    }
                    g.prober = None;
                    return;
                }
                Err(e) => {
                    wait = (wait * 2).min(self.backoff.max);
                    let mut g = self.lock();
                    if let Some(d) = g.down.as_mut() {
                        d.probe = wait;
                        d.cause = e;
                    }
                }
            }
        }
    }

    /// Stops the prober (the checkpointer is closing).
    pub(crate) fn stop(&self) {
        if let Some(p) = self.lock().prober.take() {
            p.abort();
        }
    }
}
