//! How engines talk to peers: the [`Transport`] trait (one per query), the
//! [`Mailbox`] where a party's incoming batches wait, and an in-memory
//! network for tests. The gateway implements `Transport` over gRPC + mTLS.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// Which message of the protocol a batch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Round {
    /// A party's share of another party's input.
    Input,
    /// A party's share of the result, sent to the querying gateway only.
    Result,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum TransportError {
    #[error("peer {peer} is unreachable: {reason}")]
    Unreachable { peer: String, reason: String },
    #[error("peer {peer} did not send its {round:?} shares within {secs:.1} s; it may be down or overloaded")]
    Timeout {
        peer: String,
        round: Round,
        secs: f64,
    },
    #[error("query aborted: {0}")]
    Aborted(String),
    #[error("peer {peer} broke the protocol: {reason}")]
    Protocol { peer: String, reason: String },
}

/// One query's messages between the parties.
#[async_trait::async_trait]
pub trait Transport: Send + Sync {
    async fn send(&self, to: &str, round: Round, batch: RecordBatch) -> Result<(), TransportError>;
    async fn recv(&self, from: &str, round: Round) -> Result<RecordBatch, TransportError>;
}

#[derive(Default)]
struct MailboxState {
    arrived: HashMap<(String, Round), RecordBatch>,
    taken: std::collections::HashSet<(String, Round)>,
    aborted: Option<String>,
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

    /// Stores a batch from `from`. A second batch for the same round is a
    /// protocol violation, not an overwrite.
    pub fn deliver(
        &self,
        from: &str,
        round: Round,
        batch: RecordBatch,
    ) -> Result<(), TransportError> {
        let mut st = self.lock();
        if let Some(r) = &st.aborted {
            return Err(TransportError::Aborted(r.clone()));
        }
        let key = (from.to_string(), round);
        if st.arrived.contains_key(&key) || st.taken.contains(&key) {
            return Err(TransportError::Protocol {
                peer: from.into(),
                reason: format!("sent its {round:?} shares twice"),
            });
        }
        st.arrived.insert(key, batch);
        drop(st);
        self.notify.notify_waiters();
        Ok(())
    }

    /// Ends the query: every waiter and every later delivery fails.
    pub fn abort(&self, reason: &str) {
        let mut st = self.lock();
        if st.aborted.is_none() {
            st.aborted = Some(reason.to_string());
        }
        st.arrived.clear();
        drop(st);
        self.notify.notify_waiters();
    }

    pub fn aborted(&self) -> Option<String> {
        self.lock().aborted.clone()
    }

    /// Waits for the batch from `from` for `round`, up to the timeout.
    pub async fn take(&self, from: &str, round: Round) -> Result<RecordBatch, TransportError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let key = (from.to_string(), round);
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
                    round,
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
    async fn send(&self, to: &str, round: Round, batch: RecordBatch) -> Result<(), TransportError> {
        let mb = self
            .boxes
            .get(to)
            .ok_or_else(|| TransportError::Unreachable {
                peer: to.into(),
                reason: "no such party".into(),
            })?;
        mb.deliver(&self.me, round, batch)
    }
    async fn recv(&self, from: &str, round: Round) -> Result<RecordBatch, TransportError> {
        self.boxes[&self.me].take(from, round).await
    }
}
