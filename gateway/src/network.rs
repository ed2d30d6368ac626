//! How a gateway reaches its peers: the [`PeerNetwork`] boundary.
//!
//! Two implementations:
//!
//! - [`crate::peer::PeerClients`]: gRPC (Arrow Flight) over mutual TLS, what
//!   `council serve` uses;
//! - `MemoryNetwork` (tests only): every gateway in one process, each message handed to
//!   the receiver's [`PeerService`] as the gRPC server would hand it: the
//!   same encoding (actions as [`PeerAction::encode`] writes them, shares as
//!   Arrow Flight messages), the same decoding, checks, bounds and refusals,
//!   and the same mapping of a refusal to a [`TransportError`]. Only the
//!   sockets, TLS and HTTP/2 are left out; the sender is the party the
//!   network was made for, as the certificate names it over TLS.
//!
//! The memory network exists so that both paths of a query's life cycle are
//! tested in seconds, and so that a test can play any party: record what
//! was sent, drop or delay a message, take a party off the network, or send
//! what no honest gateway would (a second `start`, a share before `start`,
//! a share after the end). It is compiled only into the tests: its sender
//! is whatever the test says, which only a verified certificate may say.

use std::time::Duration;

use executor::{Outbound, TransportError};

use crate::peer::{PeerAction, PutHeader};

#[cfg(test)]
pub(crate) use memory::{Fate, MemoryHub, Sent, What};

/// Sends the peer protocol's messages to other parties.
///
/// Every method answers within [`PeerNetwork::timeout`], with an
/// [`TransportError`] that says whether the peer could not be reached, broke
/// the protocol, or ended the query (its typed reason).
#[async_trait::async_trait]
pub trait PeerNetwork: Send + Sync + 'static {
    /// The longest any one call waits for its answer.
    fn timeout(&self) -> Duration;

    /// Sends an action of type `kind` (one of [`crate::peer::action`]; tests
    /// send others) and returns the body of its single reply.
    async fn action(
        &self,
        peer: &str,
        kind: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, TransportError>;

    /// Streams one message of one step of a query to `peer`, batch by
    /// batch as the peer takes them.
    async fn put(
        &self,
        peer: &str,
        header: &PutHeader,
        message: Outbound,
    ) -> Result<(), TransportError>;

    /// Sends a typed action.
    async fn send(&self, peer: &str, a: &PeerAction) -> Result<Vec<u8>, TransportError> {
        let (kind, body) = a.encode();
        self.action(peer, kind, body).await
    }
}

/// The in-memory network (tests only).
#[cfg(test)]
mod memory {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex, Weak};
    use std::time::Duration;

    use executor::{Outbound, Step, TransportError};
    use futures::StreamExt;

    use super::PeerNetwork;
    use crate::peer::{share_flight, status_error, unless_encoding_fails, PutHeader};
    use crate::service::PeerService;

    /// One message as the memory network saw it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Sent {
        pub from: String,
        pub to: String,
        pub what: What,
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum What {
        /// An action, by its type.
        Action(String),
        /// A message of a query's step.
        Share {
            leader: String,
            query_id: String,
            step: Step,
            rows: usize,
        },
    }

    impl Sent {
        /// The action's type, if this is an action.
        pub fn action(&self) -> Option<&str> {
            match &self.what {
                What::Action(k) => Some(k),
                What::Share { .. } => None,
            }
        }
    }

    /// What the network does with one message.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Fate {
        Deliver,
        /// Delivered after a delay (a slow link or a busy peer).
        Delay(Duration),
        /// Lost: the sender waits for its timeout, the receiver never sees it.
        Lose,
    }

    type Rule = Box<dyn Fn(&Sent) -> Fate + Send + Sync>;

    /// The parties of one in-process federation and what went between them.
    pub struct MemoryHub {
        services: Mutex<BTreeMap<String, Weak<PeerService>>>,
        log: Mutex<Vec<Sent>>,
        rule: Mutex<Option<Arc<Rule>>>,
        timeout: Duration,
    }

    impl MemoryHub {
        /// A network whose calls wait at most `timeout` for an answer.
        pub fn new(timeout: Duration) -> Arc<Self> {
            Arc::new(MemoryHub {
                services: Mutex::new(BTreeMap::new()),
                log: Mutex::new(Vec::new()),
                rule: Mutex::new(None),
                timeout,
            })
        }

        /// The network as `party` uses it: every message it sends is from
        /// `party`.
        pub fn network(self: &Arc<Self>, party: &str) -> Arc<MemoryNetwork> {
            Arc::new(MemoryNetwork {
                me: party.to_string(),
                hub: self.clone(),
            })
        }

        /// Puts `party`'s peer service on the network. The hub keeps only a weak
        /// reference: the party leaves the network when its service is dropped.
        pub fn join(&self, party: &str, service: &Arc<PeerService>) {
            self.lock_services()
                .insert(party.to_string(), Arc::downgrade(service));
        }

        /// Takes `party` off the network (as if its process died): calls to it
        /// fail as an unreachable peer's do.
        pub fn leave(&self, party: &str) {
            self.lock_services().remove(party);
        }

        /// Decides the fate of every later message (`None`: deliver all).
        pub fn set_rule(&self, rule: Option<Rule>) {
            *self.rule.lock().unwrap_or_else(|p| p.into_inner()) = rule.map(Arc::new);
        }

        /// Every message sent so far, in the order sent.
        pub fn sent(&self) -> Vec<Sent> {
            self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }

        /// Forgets the messages sent so far.
        pub fn clear_sent(&self) {
            self.log.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }

        fn lock_services(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Weak<PeerService>>> {
            self.services.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// Records `sent`, decides its fate and returns the receiver's service
        /// and how long the message takes to arrive.
        async fn route(&self, sent: Sent) -> Result<(Arc<PeerService>, Duration), TransportError> {
            let to = sent.to.clone();
            let rule = self.rule.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let fate = rule.map_or(Fate::Deliver, |r| r(&sent));
            self.log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(sent);
            let delay = match fate {
                Fate::Deliver => Duration::ZERO,
                Fate::Delay(d) => d,
                Fate::Lose => {
                    tokio::time::sleep(self.timeout).await;
                    return Err(TransportError::Unreachable {
                        peer: to,
                        reason: format!(
                            "no answer within {:.1} s (in memory)",
                            self.timeout.as_secs_f64()
                        ),
                    });
                }
            };
            self.lock_services()
                .get(&to)
                .and_then(Weak::upgrade)
                .map(|service| (service, delay))
                .ok_or(TransportError::Unreachable {
                    peer: to,
                    reason: "not on the network (in memory)".into(),
                })
        }

        /// Runs `call` in its own task, as the gRPC server runs each request,
        /// within the timeout.
        async fn call<T: Send + 'static>(
            &self,
            peer: &str,
            delay: Duration,
            call: impl std::future::Future<Output = Result<T, tonic::Status>> + Send + 'static,
        ) -> Result<T, TransportError> {
            // The delay counts towards the timeout, as a slow link's would.
            let call = async move {
                tokio::time::sleep(delay).await;
                call.await
            };
            // The handler stops when the call is dropped or times out, as a
            // gRPC server's does when the client resets the stream.
            let task = tokio::spawn(call);
            let _stop = AbortOnDrop(task.abort_handle());
            match tokio::time::timeout(self.timeout, task).await {
                Ok(Ok(Ok(t))) => Ok(t),
                Ok(Ok(Err(status))) => Err(status_error(peer, "memory", status)),
                Ok(Err(_)) => Err(TransportError::Protocol {
                    peer: peer.to_string(),
                    reason: "its handler panicked (in memory)".into(),
                }),
                Err(_) => Err(TransportError::Unreachable {
                    peer: peer.to_string(),
                    reason: format!(
                        "no answer within {:.1} s (in memory)",
                        self.timeout.as_secs_f64()
                    ),
                }),
            }
        }
    }

    /// One party's view of a [`MemoryHub`].
    pub struct MemoryNetwork {
        me: String,
        hub: Arc<MemoryHub>,
    }

    #[async_trait::async_trait]
    impl PeerNetwork for MemoryNetwork {
        fn timeout(&self) -> Duration {
            self.hub.timeout
        }

        async fn action(
            &self,
            peer: &str,
            kind: &str,
            body: Vec<u8>,
        ) -> Result<Vec<u8>, TransportError> {
            let (service, delay) = self
                .hub
                .route(Sent {
                    from: self.me.clone(),
                    to: peer.to_string(),
                    what: What::Action(kind.to_string()),
                })
                .await?;
            let (me, kind) = (self.me.clone(), kind.to_string());
            self.hub
                .call(peer, delay, async move {
                    service.handle_action(&me, &kind, &body).await
                })
                .await
        }

        async fn put(
            &self,
            peer: &str,
            header: &PutHeader,
            message: Outbound,
        ) -> Result<(), TransportError> {
            let (service, delay) = self
                .hub
                .route(Sent {
                    from: self.me.clone(),
                    to: peer.to_string(),
                    what: What::Share {
                        leader: header.leader.clone(),
                        query_id: header.query_id.clone(),
                        step: header.step,
                        rows: message.rows,
                    },
                })
                .await?;
            // The same Flight messages the gRPC client streams, made as the
            // receiver reads them.
            let (flight, failed) = share_flight(header, message)?;
            let me = self.me.clone();
            let call = self.hub.call(peer, delay, async move {
                service.handle_put(&me, flight.map(Ok).boxed()).await
            });
            unless_encoding_fails(peer, call, failed).await
        }
    }

    struct AbortOnDrop(tokio::task::AbortHandle);

    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
}
