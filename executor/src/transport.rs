//! How engines talk to peers: the [`Transport`] trait (one per query), the
//! [`Mailbox`] where a party's incoming messages wait, and an in-memory
//! network for tests. The gateway implements `Transport` over gRPC + mTLS.
//!
//! A message is a stream of batches ([`Outbound`], [`Inbound`]), read as it
//! arrives: a share over a large public domain is never held twice, and
//! what waits at a receiver is bounded by a few batches per message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};

/// Which message of an engine's protocol a batch is: the engine numbers its
/// steps (the additive engine: [`crate::additive::SEEDS`] and
/// [`crate::additive::RESULT_SHARES`]), and the transport only carries the
/// number. A party sends a peer at most one message per step of a query.
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
    /// This party could not make or send its own message.
    #[error("this party could not send its message: {0}")]
    Local(String),
}

/// The most rows one batch of a message carries, and the most a receiver
/// accepts in one. A step's message may hold any number of groups; its
/// sender streams it as batches of at most this many rows, and its
/// receiver combines each batch as it arrives, so that neither holds a
/// second copy of a large share. With 16 limb columns (four Z_2^256
/// totals) a batch is 2 MiB, arrow-flight's split.
pub const BATCH_ROWS: usize = 1 << 14;

/// How many batches of one message may wait at the receiver, besides the
/// one being decoded, before its sender waits (HTTP/2 flow control carries
/// the wait back over gRPC): the memory a message holds at the receiver is
/// this many batches and a stream window, whatever the message's size.
const QUEUED_BATCHES: usize = 4;

/// One message of a step as its sender streams it: batches of one schema
/// whose rows add up to [`Outbound::rows`], made as they are sent.
pub struct Outbound {
    /// The rows of the whole message.
    pub rows: usize,
    batches: Box<dyn Iterator<Item = Result<RecordBatch, arrow::error::ArrowError>> + Send>,
}

impl Outbound {
    /// A message of one batch.
    pub fn one(batch: RecordBatch) -> Self {
        Outbound {
            rows: batch.num_rows(),
            batches: Box::new(std::iter::once(Ok(batch))),
        }
    }

    /// A message of `rows` rows in the batches `batches` makes.
    pub fn new(
        rows: usize,
        batches: impl Iterator<Item = Result<RecordBatch, arrow::error::ArrowError>> + Send + 'static,
    ) -> Self {
        Outbound {
            rows,
            batches: Box::new(batches),
        }
    }
}

impl Iterator for Outbound {
    type Item = Result<RecordBatch, arrow::error::ArrowError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.batches.next()
    }
}

/// One query's messages between the parties. A step's message is a stream
/// of batches; a party sends a peer at most one message per step.
#[async_trait::async_trait]
pub trait Transport: Send + Sync {
    async fn send(&self, to: &str, step: Step, message: Outbound) -> Result<(), TransportError>;
    /// The message from `from` for `step`, to read batch by batch.
    async fn recv(&self, from: &str, step: Step) -> Result<Inbound, TransportError>;
}

enum Part {
    Batch(RecordBatch),
    End,
}

#[derive(Default)]
struct MailboxState {
    arrived: HashMap<(String, Step), mpsc::Receiver<Part>>,
    taken: std::collections::HashSet<(String, Step)>,
    aborted: Option<AbortReason>,
}

/// Incoming messages of one query at one party, waiting to be read.
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
        // map of channels; the map itself is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the message from `from` for `step`, for its batches to be
    /// pushed as they arrive. A second message for the same step is a
    /// protocol violation, not an overwrite.
    pub fn open(self: &Arc<Self>, from: &str, step: Step) -> Result<Delivery, TransportError> {
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
        let (tx, rx) = mpsc::channel(QUEUED_BATCHES + 1);
        st.arrived.insert(key, rx);
        drop(st);
        self.notify.notify_waiters();
        Ok(Delivery {
            tx,
            mailbox: self.clone(),
            from: from.to_string(),
            step,
        })
    }

    /// Stores a message of one batch from `from`.
    pub fn deliver(
        self: &Arc<Self>,
        from: &str,
        step: Step,
        batch: RecordBatch,
    ) -> Result<(), TransportError> {
        let d = self.open(from, step)?;
        // A new channel has room for a batch and its end.
        let full = |_| TransportError::Protocol {
            peer: from.into(),
            reason: "a new message had no room".into(),
        };
        d.tx.try_send(Part::Batch(batch)).map_err(full)?;
        d.tx.try_send(Part::End).map_err(full)
    }

    /// Stores a whole message from `from`, batch by batch as the reader
    /// takes them.
    pub async fn deliver_all(
        self: &Arc<Self>,
        from: &str,
        step: Step,
        message: Outbound,
    ) -> Result<(), TransportError> {
        let d = self.open(from, step)?;
        for b in message {
            let b = b.map_err(|e| {
                TransportError::Local(format!("its {step} message could not be made: {e}"))
            })?;
            d.push(b).await?;
        }
        d.finish().await
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

    /// Waits for the message from `from` for `step` to open, up to the
    /// timeout; its batches are then read from the [`Inbound`].
    pub async fn take(self: &Arc<Self>, from: &str, step: Step) -> Result<Inbound, TransportError> {
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
                if let Some(rx) = st.arrived.remove(&key) {
                    st.taken.insert(key);
                    return Ok(Inbound {
                        rx,
                        mailbox: self.clone(),
                        from: from.to_string(),
                        step,
                        ended: false,
                    });
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

/// The sending end of one message in a [`Mailbox`].
pub struct Delivery {
    tx: mpsc::Sender<Part>,
    mailbox: Arc<Mailbox>,
    from: String,
    step: Step,
}

impl Delivery {
    /// Queues a batch, waiting while [`QUEUED_BATCHES`] wait already. Fails
    /// once the query ended or its reader stopped reading.
    pub async fn push(&self, batch: RecordBatch) -> Result<(), TransportError> {
        self.send(Part::Batch(batch)).await
    }

    /// Marks the message complete. A message dropped before this broke off:
    /// its reader is told so.
    pub async fn finish(self) -> Result<(), TransportError> {
        self.send(Part::End).await
    }

    async fn send(&self, part: Part) -> Result<(), TransportError> {
        let sent = tokio::select! {
            r = self.tx.send(part) => r,
            r = self.mailbox.until_aborted() => return Err(TransportError::Aborted(r)),
        };
        if sent.is_ok() {
            return Ok(());
        }
        // The reader stopped reading before the end: its query failed and
        // is ending, and the sender is told why once it has.
        match tokio::time::timeout(self.mailbox.timeout, self.mailbox.until_aborted()).await {
            Ok(r) => Err(TransportError::Aborted(r)),
            Err(_) => Err(TransportError::Aborted(AbortReason::new(
                AbortKind::Other,
                "the receiver",
                format!(
                    "it stopped reading the {} message from {} before its end",
                    self.step, self.from
                ),
            ))),
        }
    }
}

/// The receiving end of one message: its batches in order, then its end.
pub struct Inbound {
    rx: mpsc::Receiver<Part>,
    mailbox: Arc<Mailbox>,
    from: String,
    step: Step,
    ended: bool,
}

impl Inbound {
    /// The next batch, or `None` once the message is complete. Each batch
    /// is waited for up to the mailbox's timeout.
    pub async fn next(&mut self) -> Result<Option<RecordBatch>, TransportError> {
        if self.ended {
            return Ok(None);
        }
        let timeout = self.mailbox.timeout;
        let part = tokio::select! {
            biased;
            r = self.mailbox.until_aborted() => return Err(TransportError::Aborted(r)),
            p = tokio::time::timeout(timeout, self.rx.recv()) => p,
        };
        match part {
            Err(_) => Err(TransportError::Timeout {
                peer: self.from.clone(),
                step: self.step,
                secs: timeout.as_secs_f64(),
            }),
            Ok(Some(Part::Batch(b))) => Ok(Some(b)),
            Ok(Some(Part::End)) => {
                self.ended = true;
                Ok(None)
            }
            Ok(None) => Err(TransportError::Unreachable {
                peer: self.from.clone(),
                reason: format!("its {} message broke off", self.step),
            }),
        }
    }

    /// The message as its one batch (a message that must be one, such as
    /// a seed).
    pub async fn one(mut self) -> Result<RecordBatch, TransportError> {
        let from = self.from.clone();
        let protocol = |reason: String| TransportError::Protocol { peer: from, reason };
        let Some(b) = self.next().await? else {
            return Err(protocol(format!("sent an empty {} message", self.step)));
        };
        if self.next().await?.is_some() {
            return Err(protocol(format!(
                "sent its {} message in more than one batch",
                self.step
            )));
        }
        Ok(b)
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
    async fn send(&self, to: &str, step: Step, message: Outbound) -> Result<(), TransportError> {
        let mb = self
            .boxes
            .get(to)
            .ok_or_else(|| TransportError::Unreachable {
                peer: to.into(),
                reason: "no such party".into(),
            })?;
        mb.deliver_all(&self.me, step, message).await
    }
    async fn recv(&self, from: &str, step: Step) -> Result<Inbound, TransportError> {
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
        let take = tokio::spawn(async move { taker.take("b", Step(0)).await.map(|_| ()) });
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

    fn rows(n: usize) -> RecordBatch {
        let a = arrow::array::UInt64Array::from((0..n as u64).collect::<Vec<_>>());
        RecordBatch::try_from_iter([("v", Arc::new(a) as arrow::array::ArrayRef)]).unwrap()
    }

    #[tokio::test]
    async fn a_message_streams_in_order_and_its_sender_waits_for_the_reader() {
        let mailbox = Arc::new(Mailbox::new(Duration::from_secs(30)));
        let sizes = [3usize, 1, 4, 1, 5, 9, 2, 6];
        let total = sizes.iter().sum();
        let message = Outbound::new(total, sizes.into_iter().map(|n| Ok(rows(n))));
        let sender = mailbox.clone();
        let send = tokio::spawn(async move { sender.deliver_all("b", Step(1), message).await });
        let mut inbound = mailbox.take("b", Step(1)).await.unwrap();
        // The reader has not read: the sender waits with a few batches
        // queued, not the whole message.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!send.is_finished());
        let mut got = Vec::new();
        while let Some(b) = inbound.next().await.unwrap() {
            got.push(b.num_rows());
        }
        assert_eq!(got, sizes);
        send.await.unwrap().unwrap();
        // One message per step.
        let e = mailbox.open("b", Step(1)).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }

    #[tokio::test]
    async fn a_message_that_breaks_off_or_is_aborted_says_so() {
        let mailbox = Arc::new(Mailbox::new(Duration::from_secs(30)));
        let d = mailbox.open("b", Step(1)).unwrap();
        d.push(rows(2)).await.unwrap();
        drop(d);
        let mut inbound = mailbox.take("b", Step(1)).await.unwrap();
        assert_eq!(inbound.next().await.unwrap().unwrap().num_rows(), 2);
        let e = inbound.next().await.unwrap_err();
        assert!(e.to_string().contains("broke off"), "{e}");
        // A sender waiting for room is freed by an abort.
        let d = mailbox.open("b", Step(2)).unwrap();
        for _ in 0..=QUEUED_BATCHES {
            d.push(rows(1)).await.unwrap();
        }
        let waiting = tokio::spawn(async move { d.push(rows(1)).await });
        tokio::task::yield_now().await;
        let reason = AbortReason::new(AbortKind::Protocol, "a", "bad");
        mailbox.abort(&reason);
        assert_eq!(
            waiting.await.unwrap().unwrap_err(),
            TransportError::Aborted(reason.clone())
        );
        // A message that must be one batch.
        let two = Arc::new(Mailbox::new(Duration::from_secs(30)));
        two.deliver_all(
            "b",
            Step(0),
            Outbound::new(2, [Ok(rows(1)), Ok(rows(1))].into_iter()),
        )
        .await
        .unwrap();
        let e = two
            .take("b", Step(0))
            .await
            .unwrap()
            .one()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("more than one batch"), "{e}");
    }
}
