//! How engines talk to peers: the [`Transport`] trait (one per query), the
//! [`Mailbox`] where a party's incoming batches wait, and an in-memory
//! network for tests. The gateway implements `Transport` over gRPC + mTLS.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// Which message of an engine's protocol a batch is: the engine numbers its
/// steps (the additive engine: [`crate::additive::SEEDS`] and
/// [`crate::additive::RESULT_SHARES`]), and the transport only carries the
/// number. A party sends a peer at most one batch per step of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Step(pub u16);

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "step {}", self.0)
    }
}

/// Why a query ended before its reveal, as one party tells the others: the
/// kind decides what every party and the analyst do and see; the detail is
/// for people, and never holds a value from a party's rows. Parties send it
/// in `abort` and in the answer to a `start` for a query that already
/// ended; nothing is decided by reading its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortReason {
    pub kind: AbortKind,
    /// The party that ended the query.
    pub party: String,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbortKind {
    /// The party's own part failed on its data (its log has the details).
    /// The analyst is told that a party aborted and why in general terms,
    /// not which party.
    Data,
    /// A party could not reach a peer, or a peer did not answer in time.
    Unavailable,
    /// A peer sent something the protocol does not allow.
    Protocol,
    /// The analyst disconnected or cancelled.
    Cancelled,
    /// Anything else: a disagreement on the plan or its privacy, a spent
    /// budget, an internal error.
    Other,
}

/// The longest party name and detail a reason keeps (from a peer, longer
/// ones are cut on receipt, before they are stored or forwarded).
pub const MAX_REASON_CHARS: usize = 300;

impl AbortReason {
    pub fn new(kind: AbortKind, party: &str, detail: impl Into<String>) -> Self {
        AbortReason {
            kind,
            party: party.to_string(),
            detail: detail.into(),
        }
        .bounded()
    }

    /// The reason with its texts cut to [`MAX_REASON_CHARS`]: a peer's
    /// reason is stored, forwarded and shown, so its size must not be the
    /// peer's choice.
    pub fn bounded(mut self) -> Self {
        let cut = |t: &mut String| {
            if let Some((i, _)) = t.char_indices().nth(MAX_REASON_CHARS) {
                t.truncate(i);
                t.push('…');
            }
        };
        cut(&mut self.party);
        cut(&mut self.detail);
        self
    }
}

impl std::fmt::Display for AbortReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Cut again, for a reason built without `new` or `bounded`.
        let AbortReason { party, detail, .. } = self.clone().bounded();
        match self.kind {
            // Which party's data failed is not the analyst's to know.
            AbortKind::Data => write!(f, "a party aborted: {detail}"),
            AbortKind::Cancelled => write!(f, "{party} cancelled: {detail}"),
            AbortKind::Other => write!(f, "{party} aborted: {detail}"),
            // These details name the peers already.
            AbortKind::Unavailable | AbortKind::Protocol => f.write_str(&detail),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum TransportError {
    #[error("peer {peer} is unreachable: {reason}")]
    Unreachable { peer: String, reason: String },
    #[error("peer {peer} did not send its {step} message within {secs:.1} s; it may be down or overloaded")]
    Timeout { peer: String, step: Step, secs: f64 },
    #[error("query aborted: {0}")]
    Aborted(AbortReason),
    #[error("peer {peer} broke the protocol: {reason}")]
    Protocol { peer: String, reason: String },
}

/// One query's messages between the parties.
#[async_trait::async_trait]
pub trait Transport: Send + Sync {
    async fn send(&self, to: &str, step: Step, batch: RecordBatch) -> Result<(), TransportError>;
    async fn recv(&self, from: &str, step: Step) -> Result<RecordBatch, TransportError>;
}

#[derive(Default)]
struct MailboxState {
    arrived: HashMap<(String, Step), RecordBatch>,
    taken: std::collections::HashSet<(String, Step)>,
    aborted: Option<AbortReason>,
}

/// Incoming batches of one query at one party, waiting to be taken.
pub struct Mailbox {
    state: Mutex<MailboxState>,
    notify: Notify,
    timeout: Duration,
}

impl Mailbox {
    pub fn new(timeout: Duration) -> Self {
        Mailbox {
            state: Mutex::new(MailboxState::default()),
            notify: Notify::new(),
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MailboxState> {
        // A poisoned lock only means another task panicked mid-update of a
        // map of batches; the map itself is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a batch from `from`. A second batch for the same step is a
    /// protocol violation, not an overwrite.
    pub fn deliver(
        &self,
        from: &str,
        step: Step,
        batch: RecordBatch,
    ) -> Result<(), TransportError> {
        let mut st = self.lock();
        if let Some(r) = &st.aborted {
            return Err(TransportError::Aborted(r.clone()));
        }
        let key = (from.to_string(), step);
        if st.arrived.contains_key(&key) || st.taken.contains(&key) {
            return Err(TransportError::Protocol {
                peer: from.into(),
                reason: format!("sent its {step} message twice"),
            });
        }
        st.arrived.insert(key, batch);
        drop(st);
        self.notify.notify_waiters();
        Ok(())
    }

    /// Ends the query: every waiter and every later delivery fails. The
    /// first reason stays.
    pub fn abort(&self, reason: &AbortReason) {
        let mut st = self.lock();
        if st.aborted.is_none() {
            st.aborted = Some(reason.clone());
        }
        st.arrived.clear();
        drop(st);
        self.notify.notify_waiters();
    }

    pub fn aborted(&self) -> Option<AbortReason> {
        self.lock().aborted.clone()
    }

    /// Waits until the query is aborted, and returns why: a send races
    /// this, so that an aborted query does not wait on a peer that does
    /// not answer.
    pub async fn until_aborted(&self) -> AbortReason {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.aborted() {
                return r;
            }
            notified.await;
        }
    }

    /// Waits for the batch from `from` for `step`, up to the timeout.
    pub async fn take(&self, from: &str, step: Step) -> Result<RecordBatch, TransportError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let key = (from.to_string(), step);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if let Some(r) = &st.aborted {
                    return Err(TransportError::Aborted(r.clone()));
                }
                if let Some(b) = st.arrived.remove(&key) {
                    st.taken.insert(key);
                    return Ok(b);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(TransportError::Timeout {
                    peer: from.into(),
                    step,
                    secs: self.timeout.as_secs_f64(),
                });
            }
        }
    }
}

/// An in-memory network of parties, for tests of the engines.
pub struct InMemoryNetwork;

pub struct InMemoryTransport {
    me: String,
    boxes: Arc<HashMap<String, Arc<Mailbox>>>,
}

impl InMemoryNetwork {
    pub fn connect(parties: &[String], timeout: Duration) -> Vec<InMemoryTransport> {
        let boxes: Arc<HashMap<String, Arc<Mailbox>>> = Arc::new(
            parties
                .iter()
                .map(|p| (p.clone(), Arc::new(Mailbox::new(timeout))))
                .collect(),
        );
        parties
            .iter()
            .map(|p| InMemoryTransport {
                me: p.clone(),
                boxes: boxes.clone(),
            })
            .collect()
    }
}

impl InMemoryTransport {
    pub fn mailbox(&self) -> Arc<Mailbox> {
        self.boxes[&self.me].clone()
    }
}

#[async_trait::async_trait]
impl Transport for InMemoryTransport {
    async fn send(&self, to: &str, step: Step, batch: RecordBatch) -> Result<(), TransportError> {
        let mb = self
            .boxes
            .get(to)
            .ok_or_else(|| TransportError::Unreachable {
                peer: to.into(),
                reason: "no such party".into(),
            })?;
        mb.deliver(&self.me, step, batch)
    }
    async fn recv(&self, from: &str, step: Step) -> Result<RecordBatch, TransportError> {
        self.boxes[&self.me].take(from, step).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_abort_wakes_every_waiter_and_refuses_later_messages() {
        let mailbox = Arc::new(Mailbox::new(Duration::from_secs(30)));
        let reason = AbortReason::new(AbortKind::Cancelled, "a", "gone");
        let (waiter, taker) = (mailbox.clone(), mailbox.clone());
        let until = tokio::spawn(async move { waiter.until_aborted().await });
        let take = tokio::spawn(async move { taker.take("b", Step(0)).await });
        tokio::task::yield_now().await;
        mailbox.abort(&reason);
        assert_eq!(until.await.unwrap(), reason);
        assert_eq!(
            take.await.unwrap().unwrap_err(),
            TransportError::Aborted(reason.clone())
        );
        // Already aborted: at once, and the first reason stays.
        mailbox.abort(&AbortReason::new(AbortKind::Other, "c", "later"));
        assert_eq!(mailbox.until_aborted().await, reason);
        let batch = RecordBatch::new_empty(Arc::new(arrow::datatypes::Schema::empty()));
        assert_eq!(
            mailbox.deliver("b", Step(0), batch).unwrap_err(),
            TransportError::Aborted(reason)
        );
    }
}
