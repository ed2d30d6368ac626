//! The life of one query at one party, as states that are types.
//!
//! ```text
//!  a peer:    propose ─▶ Agreed ──start──▶ Running ──end──▶ Ended
//!                          └──── abort, expiry, a refused start ──▶ Ended
//!  the leader: plan + own policy ─▶ Agreed ──every party allowed──▶ Running ──end──▶ Ended
//!                                     └──── a refusal, a cancel ──▶ Ended
//! ```
//!
//! Every transition takes the old state by value, so what a state cannot do
//! cannot be written: only an [`Agreed`] query can start (a second `start`
//! finds no `Agreed` to take), only a [`Running`] one can receive result
//! shares, and an [`Ended`] one is gone from the table (a late message
//! learns why it ended). Whoever owns a state drives it: a peer's `Agreed`
//! waits in the [`Sessions`] table for the leader's `start`; once started,
//! the query's own task owns its `Running` state and the table keeps only
//! what messages to it need ([`Stage::Running`]). The leader's query is
//! owned by the analyst's request from the start (dropping it cancels the
//! query: see `gateway::as_leader`).
//!
//! Input shares may reach a party before the leader's `start` does (the
//! leader sends `start` together with its own input round, and a peer that
//! started first sends its input at once), so an `Agreed` query's mailbox
//! takes the messages its engine marks as allowed before `start`
//! (`executor::MessageShape::before_start`: the additive engine's seeds);
//! the gateway asks the engine ([`Route::started`] tells it the state), and
//! nothing is computed on them before `start`.
//!
//! This module does no I/O: the gateway decides (policy, ledger, engine)
//! and hands each transition what it decided.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use executor::transport::Mailbox;
use executor::{AbortKind, AbortReason, SharedTable};
use planner::privacy::Requirement;
use planner::FederatedPlan;
use policies::Analyst;

/// A query's key at a party: (its leader, its id).
pub type Key = (String, String);

/// Agreed queries not started within this time are ended.
pub const SESSION_TTL: Duration = Duration::from_secs(600);
/// Open queries one leader may have at this party, and all leaders together.
pub const MAX_SESSIONS_PER_LEADER: usize = 64;
pub const MAX_SESSIONS: usize = 512;
/// Ended queries whose reason a late message can still learn.
const ENDED_KEPT: usize = 512;

/// What every state of one query knows, from its agreement to its end.
pub struct Query {
    pub leader: String,
    pub id: String,
    pub analyst: Analyst,
    /// Where the other parties' batches for this query wait.
    pub mailbox: Arc<Mailbox>,
    pub created: Instant,
    /// Where this party's time went, for the query log.
    pub phases: Phases,
}

impl Query {
    pub fn new(
        leader: &str,
        id: &str,
        analyst: &Analyst,
        timeout: Duration,
        phases: Phases,
    ) -> Arc<Self> {
        Arc::new(Query {
            leader: leader.to_string(),
            id: id.to_string(),
            analyst: analyst.clone(),
            mailbox: Arc::new(Mailbox::new(timeout)),
            created: Instant::now(),
            phases,
        })
    }

    pub fn key(&self) -> Key {
        (self.leader.clone(), self.id.clone())
    }

    /// The query's key in the budget ledger.
    pub fn ledger_key(&self) -> String {
        format!("{}/{}", self.leader, self.id)
    }
}

/// This party's encoded input: its partials as ring elements per group
/// and, under DP, its noise already in them.
pub struct Input {
    pub table: SharedTable,
}

/// A party's failure: the full story for its own log, and what it may tell
/// the others (no private values).
pub struct PartyFailure {
    pub local: String,
    pub shared: AbortReason,
}

/// This party's local part and encoding, running in the background from
/// the moment it may (nothing of it leaves the party before the secure sum).
pub type Prepared = tokio::task::JoinHandle<Result<Input, PartyFailure>>;

/// What decides whether a DP charge is kept when a query ends: set by the
/// engine once this party's part can lead to a reveal, and by the local
/// part once it ran over this party's rows under the DP plan (from then on
/// how the query ends may depend on them).
#[derive(Clone, Default)]
pub struct Spent {
    pub reveal_point: Arc<AtomicBool>,
    pub local_ran: Arc<AtomicBool>,
}

impl Spent {
    pub fn any(&self) -> bool {
        self.reveal_point.load(Ordering::SeqCst) || self.local_ran.load(Ordering::SeqCst)
    }
}

/// A charge to this party's privacy-budget ledger, made on the way into
/// [`Running`] and settled (kept or refunded) on the way out.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    pub ledger_key: String,
    pub epsilon_micro: u64,
}

/// Allowed by this party's own policy; not started.
pub struct Agreed {
    pub query: Arc<Query>,
    pub plan: Arc<FederatedPlan>,
    /// What this party's own policy demands under DP (decided at `propose`).
    pub requirement: Option<Requirement>,
    /// The local part, started at this party's allow unless its own DP
    /// requirement makes it wait for the agreed clamps.
    pub prepared: Option<Prepared>,
}

/// How a query runs once every party agreed: with the plan as agreed, or
/// with the DP plan derived from the merged parameters (and this party's
/// charge for it, if its own policy required DP).
pub enum Agreement {
    AsPlanned,
    UnderDp {
        plan: FederatedPlan,
        charge: Option<Charge>,
    },
    /// With a minimum group size decided in shares (its gate reads a
    /// second copy of the row count, so the local part is prepared again).
    Thresholded {
        plan: FederatedPlan,
    },
}

impl Agreed {
    pub fn new(query: Arc<Query>, plan: FederatedPlan, requirement: Option<Requirement>) -> Self {
        Agreed {
            query,
            plan: Arc::new(plan),
            requirement,
            prepared: None,
        }
    }

    /// Starts the local part now, unless this party's own DP requirement
    /// makes it wait for the agreed clamps and bounds (at `start`).
    pub fn prepare(
        &mut self,
        prepare: impl FnOnce(&Arc<Query>, &Arc<FederatedPlan>, &Spent) -> Prepared,
    ) {
        if self.requirement.is_none() && self.prepared.is_none() {
            self.prepared = Some(prepare(&self.query, &self.plan, &Spent::default()));
        }
    }

    /// Every party agreed: the query runs. Under DP the local part prepared
    /// without clamps is dropped and prepared again under the DP plan.
    pub fn start(
        mut self,
        agreement: Agreement,
        prepare: impl FnOnce(&Arc<Query>, &Arc<FederatedPlan>, &Spent) -> Prepared,
    ) -> Running {
        let spent = Spent::default();
        let (plan, charge) = match agreement {
            Agreement::AsPlanned => (self.plan.clone(), None),
            Agreement::UnderDp { plan, charge } => {
                if let Some(task) = self.prepared.take() {
                    task.abort();
                }
                (Arc::new(plan), charge)
            }
            Agreement::Thresholded { plan } => {
                if let Some(task) = self.prepared.take() {
                    task.abort();
                }
                (Arc::new(plan), None)
            }
        };
        let prepared = match self.prepared.take() {
            Some(task) => task,
            None => prepare(&self.query, &plan, &spent),
        };
        Running {
            query: self.query.clone(),
            plan,
            charge,
            local: Some(prepared.abort_handle()),
            prepared: Some(prepared),
            spent,
        }
    }

    /// Ended before it started (refused, aborted, expired, cancelled).
    /// Nothing was charged yet.
    pub fn end(mut self, outcome: impl Into<String>) -> Ended {
        if let Some(task) = self.prepared.take() {
            task.abort();
        }
        Ended {
            query: self.query.clone(),
            plan: self.plan.clone(),
            outcome: outcome.into(),
            settled: None,
        }
    }

    pub fn expired(&self, ttl: Duration) -> bool {
        self.query.created.elapsed() >= ttl
    }
}

impl Drop for Agreed {
    fn drop(&mut self) {
        if let Some(task) = self.prepared.take() {
            task.abort();
        }
    }
}

/// Started: the local part, the engine's steps, the reveal.
pub struct Running {
    pub query: Arc<Query>,
    /// The plan the query runs under (the DP plan, with DP).
    pub plan: Arc<FederatedPlan>,
    pub charge: Option<Charge>,
    /// Taken once by the computation.
    pub prepared: Option<Prepared>,
    /// Stops the local part when the query ends, also after the
    /// computation took `prepared` (a cancelled query's scan does not
    /// outlive it).
    pub local: Option<tokio::task::AbortHandle>,
    pub spent: Spent,
}

impl Running {
    /// The query ended, revealed or not. A DP charge is kept if this
    /// party's part could have led to a reveal or its local part ran under
    /// the DP plan; otherwise it is refunded. The local part is stopped
    /// first: one that had not begun never will, and one that began set
    /// `local_ran` before touching a row (an end its rows caused is always
    /// seen after that).
    pub fn end(mut self, outcome: impl Into<String>) -> Ended {
        self.stop_local_part();
        let settled = self.charge.take().map(|c| Settled {
            charge: c,
            kept: self.spent.any(),
        });
        Ended {
            query: self.query.clone(),
            plan: self.plan.clone(),
            outcome: outcome.into(),
            settled,
        }
    }
}

impl Running {
    /// `local` is the abort handle of the task `prepared` holds (or held,
    /// once the computation took it): one abort stops it either way.
    fn stop_local_part(&mut self) {
        if let Some(local) = self.local.take() {
            local.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop_local_part();
    }
}

/// A DP charge at the end of its query.
#[derive(Debug, Clone, PartialEq)]
pub struct Settled {
    pub charge: Charge,
    /// Kept (spent) rather than refunded.
    pub kept: bool,
}

/// A query that ended here: what the audit log and the ledger record.
pub struct Ended {
    pub query: Arc<Query>,
    pub plan: Arc<FederatedPlan>,
    pub outcome: String,
    /// The DP charge to settle, if this party made one.
    pub settled: Option<Settled>,
}

/// A state in which a query is still open: it can be ended (by its owner,
/// or by a cancel when its owner is dropped).
pub trait Open: Send + 'static {
    fn query(&self) -> &Arc<Query>;
    fn end(self, outcome: String) -> Ended;
}

impl Open for Agreed {
    fn query(&self) -> &Arc<Query> {
        &self.query
    }
    fn end(self, outcome: String) -> Ended {
        Agreed::end(self, outcome)
    }
}

impl Open for Running {
    fn query(&self) -> &Arc<Query> {
        &self.query
    }
    fn end(self, outcome: String) -> Ended {
        Running::end(self, outcome)
    }
}

/// A query in the table, by what messages to it may do.
pub enum Stage {
    /// A peer's query allowed here, waiting for the leader's `start`.
    Agreed(Agreed),
    /// `start` arrived and is being checked (DP parameters, the charge):
    /// messages that may precede `start` and aborts are taken, a second
    /// `start` is refused. The plan is the agreed one.
    Starting(Arc<Query>, Arc<FederatedPlan>),
    /// Running in its own task, under `plan`.
    Running(Arc<Query>, Arc<FederatedPlan>),
}

impl Stage {
    fn query(&self) -> &Arc<Query> {
        match self {
            Stage::Agreed(a) => &a.query,
            Stage::Starting(q, _) | Stage::Running(q, _) => q,
        }
    }
}

/// Why this party turns down a peer's `start` or share: the query ended
/// here (with the reason, which the peer adopts), or the message does not
/// belong to any query it may send to.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerRefusal {
    Ended(AbortReason),
    Other(String),
}

impl PeerRefusal {
    /// As a gRPC status: an ended query is `aborted` with the reason as
    /// JSON, which `peer::status_error` decodes (never matched as text).
    pub fn to_status(&self) -> tonic::Status {
        match self {
            PeerRefusal::Ended(r) => {
                tonic::Status::aborted(serde_json::to_string(r).unwrap_or_default())
            }
            PeerRefusal::Other(m) => tonic::Status::failed_precondition(m.clone()),
        }
    }
}

impl From<executor::TransportError> for PeerRefusal {
    /// A message this party could not take: the query's end, with its
    /// reason, or what else stopped it.
    fn from(e: executor::TransportError) -> Self {
        match e {
            executor::TransportError::Aborted(r) => PeerRefusal::Ended(r),
            other => PeerRefusal::Other(other.to_string()),
        }
    }
}

impl std::fmt::Display for PeerRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerRefusal::Ended(r) => write!(f, "the query already ended: {r}"),
            PeerRefusal::Other(m) => f.write_str(m),
        }
    }
}

/// Where a peer's message for an open query goes.
pub struct Route {
    pub mailbox: Arc<Mailbox>,
    pub plan: Arc<FederatedPlan>,
    /// The query started here (it runs under `plan`).
    pub started: bool,
}

/// Why an agreed query could not be admitted to the table.
#[derive(Debug, PartialEq)]
pub enum Full {
    /// The leader's or everyone's open queries are at their bound.
    TooMany { from_leader: usize },
    /// The leader reused a query id that is still open.
    Duplicate,
    /// The query already ended here (an abort overtook the proposal, or
    /// the id was used before).
    Ended(AbortReason),
}

/// The queries open at this party, and the reasons of the last that ended.
pub struct Sessions {
    party: String,
    live: Mutex<HashMap<Key, Stage>>,
    ended: Mutex<VecDeque<(Key, AbortReason)>>,
    ttl: Duration,
}

impl Sessions {
    pub fn new(party: &str, ttl: Duration) -> Self {
        Sessions {
            party: party.to_string(),
            live: Mutex::new(HashMap::new()),
            ended: Mutex::new(VecDeque::new()),
            ttl,
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Stage>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.live().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps a peer's agreed query until its `start`. Agreed queries past
    /// their time are ended first and returned (the caller records them);
    /// each leader may hold [`MAX_SESSIONS_PER_LEADER`] open queries here,
    /// all leaders [`MAX_SESSIONS`], so that no peer can make this party
    /// scan its data without end.
    /// Its local part starts only once it is admitted.
    pub fn admit(
        &self,
        mut agreed: Agreed,
        prepare: impl FnOnce(&Arc<Query>, &Arc<FederatedPlan>, &Spent) -> Prepared,
    ) -> (Result<(), (Full, Agreed)>, Vec<Ended>) {
        let expired = self.expire();
        let key = agreed.query.key();
        // Lock order: `live`, then `ended` (an abort that overtakes its
        // proposal records itself under `live` too, so it cannot slip in
        // between this check and the insertion).
        let mut live = self.live();
        if let PeerRefusal::Ended(reason) = self.no_session(&key) {
            // Ended before it was admitted (an abort that overtook the
            // proposal), or a reused id.
            drop(live);
            return (Err((Full::Ended(reason), agreed)), expired);
        }
        let from_leader = live.keys().filter(|(l, _)| *l == key.0).count();
        // The queries this party leads come from its own authenticated
        // analysts and do not count here: a busy local analyst must not
        // lock other leaders out of this party.
        let led_by_others = live.keys().filter(|(l, _)| *l != self.party).count();
        let r = if live.contains_key(&key) {
            Err((Full::Duplicate, agreed))
        } else if from_leader >= MAX_SESSIONS_PER_LEADER || led_by_others >= MAX_SESSIONS {
            Err((Full::TooMany { from_leader }, agreed))
        } else {
            agreed.prepare(prepare);
            live.insert(key, Stage::Agreed(agreed));
            Ok(())
        };
        (r, expired)
    }

    /// Ends every agreed query older than the time to live.
    pub fn expire(&self) -> Vec<Ended> {
        let stale: Vec<Agreed> = {
            let mut live = self.live();
            let keys: Vec<Key> = live
                .iter()
                .filter(|(_, s)| matches!(s, Stage::Agreed(a) if a.expired(self.ttl)))
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| match live.remove(&k) {
                    Some(Stage::Agreed(a)) => Some(a),
                    _ => None,
                })
                .collect()
        };
        stale
            .into_iter()
            .map(|a| {
                let reason = self.expiry_reason();
                self.remember(a.query.key(), &reason);
                a.query.mailbox.abort(&reason);
                a.end(format!(
                    "expired: not started within {} s",
                    self.ttl.as_secs()
                ))
            })
            .collect()
    }

    fn expiry_reason(&self) -> AbortReason {
        AbortReason::new(
            AbortKind::Other,
            &self.party,
            format!(
                "the query was not started within {} s of its agreement",
                self.ttl.as_secs()
            ),
        )
    }

    /// The leader's `start` takes the agreed query out of the table; until
    /// the caller puts it back as running ([`Sessions::run`]) or ends it,
    /// the table holds it as [`Stage::Starting`].
    pub fn take_for_start(&self, key: &Key) -> Result<Agreed, (PeerRefusal, Option<Ended>)> {
        let mut live = self.live();
        match live.remove(key) {
            Some(Stage::Agreed(a)) if a.expired(self.ttl) => {
                drop(live);
                let reason = self.expiry_reason();
                self.remember(key.clone(), &reason);
                let ended = a.end(format!(
                    "expired: not started within {} s",
                    self.ttl.as_secs()
                ));
                Err((PeerRefusal::Ended(reason), Some(ended)))
            }
            Some(Stage::Agreed(a)) => match a.query.mailbox.aborted() {
                // Stopped already (a malformed message from a peer): it
                // ends here, before anything is charged.
                Some(reason) => {
                    drop(live);
                    self.remember(key.clone(), &reason);
                    let ended = a.end(format!("not run: {reason}"));
                    Err((PeerRefusal::Ended(reason), Some(ended)))
                }
                None => {
                    live.insert(
                        key.clone(),
                        Stage::Starting(a.query.clone(), a.plan.clone()),
                    );
                    Ok(a)
                }
            },
            Some(other) => {
                live.insert(key.clone(), other);
                Err((
                    PeerRefusal::Other(format!("query {} was already started", key.1)),
                    None,
                ))
            }
            None => {
                drop(live);
                Err((self.no_session(key), None))
            }
        }
    }

    /// The query now runs in its own task under `plan` (a peer's, after
    /// [`Sessions::take_for_start`]; the leader's, before it sends `start`).
    pub fn run(&self, running: &Running) {
        self.live().insert(
            running.query.key(),
            Stage::Running(running.query.clone(), running.plan.clone()),
        );
    }

    /// Where a message from another party for `key` goes, the plan its
    /// shape follows (the agreed one before `start`, the one it runs under
    /// after), and whether the query started here. Which messages an
    /// engine allows before `start` is the engine's to say
    /// (`executor::MessageShape::before_start`).
    pub fn route(&self, key: &Key) -> Result<Route, PeerRefusal> {
        let live = self.live();
        match live.get(key) {
            Some(Stage::Running(q, plan)) => Ok(Route {
                mailbox: q.mailbox.clone(),
                plan: plan.clone(),
                started: true,
            }),
            Some(Stage::Agreed(a)) => Ok(Route {
                mailbox: a.query.mailbox.clone(),
                plan: a.plan.clone(),
                started: false,
            }),
            Some(Stage::Starting(q, plan)) => Ok(Route {
                mailbox: q.mailbox.clone(),
                plan: plan.clone(),
                started: false,
            }),
            None => {
                drop(live);
                Err(self.no_session(key))
            }
        }
    }

    /// An abort for `key`: an agreed query ends here and is returned (the
    /// caller records it); a starting or running one has its mailbox
    /// aborted, and its own task ends it.
    pub fn abort(&self, key: &Key, from: &str, reason: &AbortReason) -> Option<Ended> {
        let mut live = self.live();
        match live.remove(key) {
            Some(Stage::Agreed(a)) => {
                drop(live);
                self.remember(key.clone(), reason);
                a.query.mailbox.abort(reason);
                Some(a.end(format!("aborted by {from}: {reason}")))
            }
            Some(other) => {
                other.query().mailbox.abort(reason);
                live.insert(key.clone(), other);
                None
            }
            None => {
                // Not open (yet): the leader's abort may overtake its own
                // proposal (an analyst who cancels while the peers plan),
                // which is then refused at admission. Only the leader's:
                // nobody else may fill the ring of reasons. A query that
                // already ended keeps its first reason. Under `live`, so
                // that `admit` sees it.
                if from == key.0 && !matches!(self.no_session(key), PeerRefusal::Ended(_)) {
                    self.remember(key.clone(), reason);
                }
                drop(live);
                None
            }
        }
    }

    /// Whether the query is still open here.
    pub fn is_open(&self, key: &Key) -> bool {
        self.live().contains_key(key)
    }

    /// The query ended with `reason` (what a late message learns): it
    /// leaves the table.
    pub fn close(&self, key: &Key, reason: &AbortReason) {
        self.live().remove(key);
        self.remember(key.clone(), reason);
    }

    fn remember(&self, key: Key, reason: &AbortReason) {
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        if ended.len() >= ENDED_KEPT {
            ended.pop_front();
        }
        ended.push_back((key, reason.clone()));
    }

    /// The answer to a message for a query that is not open here: why it
    /// ended, if it did.
    pub fn no_session(&self, key: &Key) -> PeerRefusal {
        let ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        match ended.iter().rev().find(|(k, _)| k == key) {
            Some((_, reason)) => PeerRefusal::Ended(reason.clone()),
            None => PeerRefusal::Other(format!(
                "{} has no agreed query {} from {}",
                self.party, key.1, key.0
            )),
        }
    }
}

/// Wall-clock spans of one query at one party: the profile that
/// `log_queries` prints (where the fixed cost of a query goes). Phases may
/// overlap: the local part runs while the agreement is still under way.
pub struct Phases {
    t0: Instant,
    spans: Mutex<Vec<(&'static str, Duration, Duration)>>,
}

impl Default for Phases {
    fn default() -> Self {
        Self::new()
    }
}

impl Phases {
    pub fn new() -> Self {
        Phases {
            t0: Instant::now(),
            spans: Mutex::new(Vec::new()),
        }
    }

    /// Records that phase `name` ran from `since` until now.
    pub fn span(&self, name: &'static str, since: Instant) {
        let now = Instant::now();
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).push((
            name,
            since.saturating_duration_since(self.t0),
            now - since,
        ));
    }

    /// `name start+duration` per phase, in ms from the query's start here.
    pub fn summary(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        let mut s: Vec<String> = spans
            .iter()
            .map(|(n, at, d)| format!("{n} {:.2}+{:.2}", ms(*at), ms(*d)))
            .collect();
        s.push(format!("total {:.2}", ms(self.t0.elapsed())));
        s.join(", ")
    }
}

#[cfg(test)]
mod tests {
    //! Every transition of the life cycle, the refusals, expiry and an
    //! abort in each state, without a network (they run in milliseconds).
    use super::*;
    use executor::additive::SEEDS;
    use executor::SharedTable;
    use tokio::sync::oneshot;

    const CATALOG: &str = r#"
[tables.t]
columns = [
  { name = "g", type = "int", domain = { min = 0, max = 3 } },
  { name = "x", type = "int" },
]
"#;

    async fn plan() -> FederatedPlan {
        let catalog = planner::Catalog::from_toml(CATALOG, "catalog.toml").unwrap();
        let parties = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        planner::plan_query(
            "SELECT g, COUNT(*), SUM(x) FROM t GROUP BY g",
            &catalog,
            &parties,
            &Default::default(),
        )
        .await
        .unwrap()
    }

    fn analyst(party: &str) -> Analyst {
        Analyst {
            party: party.into(),
            name: "alice".into(),
            roles: vec![],
        }
    }

    fn query(leader: &str, id: &str) -> Arc<Query> {
        Query::new(
            leader,
            id,
            &analyst(leader),
            Duration::from_secs(5),
            Phases::new(),
        )
    }

    /// A local part that never ends by itself; `dropped` fires when its
    /// task is aborted.
    fn pending_part() -> (Prepared, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel::<()>();
        struct Notify(Option<oneshot::Sender<()>>);
        impl Drop for Notify {
            fn drop(&mut self) {
                if let Some(tx) = self.0.take() {
                    let _ = tx.send(());
                }
            }
        }
        let guard = Notify(Some(tx));
        let task = tokio::spawn(async move {
            let _guard = guard;
            std::future::pending::<Result<Input, PartyFailure>>().await
        });
        (task, rx)
    }

    fn no_part(_: &Arc<Query>, _: &Arc<FederatedPlan>, _: &Spent) -> Prepared {
        tokio::spawn(async {
            Ok(Input {
                table: SharedTable {
                    keys: Vec::new(),
                    columns: Vec::new(),
                    rows: 0,
                },
            })
        })
    }

    /// Party b's table, holding leader a's agreed query q.
    async fn agreed_at_b() -> (Sessions, Key) {
        let s = Sessions::new("b", SESSION_TTL);
        let admitted = s.admit(Agreed::new(query("a", "q"), plan().await, None), no_part);
        assert!(admitted.0.is_ok());
        (s, ("a".to_string(), "q".to_string()))
    }

    fn reason(party: &str) -> AbortReason {
        AbortReason::new(AbortKind::Data, party, "its local part failed")
    }

    fn one_row_batch() -> arrow::array::RecordBatch {
        let a: arrow::array::ArrayRef = Arc::new(arrow::array::UInt64Array::from(vec![1u64]));
        arrow::array::RecordBatch::try_from_iter([("s", a)]).unwrap()
    }

    #[tokio::test]
    async fn each_leader_has_a_bound_and_an_id_is_used_once() {
        let plan = plan().await;
        let s = Sessions::new("b", SESSION_TTL);
        for i in 0..MAX_SESSIONS_PER_LEADER {
            let a = Agreed::new(query("a", &format!("q{i}")), plan.clone(), None);
            assert!(s.admit(a, no_part).0.is_ok());
        }
        let a = Agreed::new(query("a", "one-more"), plan.clone(), None);
        match s.admit(a, no_part).0 {
            Err((Full::TooMany { from_leader }, _)) => {
                assert_eq!(from_leader, MAX_SESSIONS_PER_LEADER)
            }
            _ => panic!("the 65th query of one leader must be turned away"),
        }
        // Another leader is not held back by the first.
        let c = Agreed::new(query("c", "q0"), plan.clone(), None);
        assert!(s.admit(c, no_part).0.is_ok());
        let again = Agreed::new(query("c", "q0"), plan.clone(), None);
        assert!(matches!(
            s.admit(again, no_part).0,
            Err((Full::Duplicate, _))
        ));
        assert_eq!(s.len(), MAX_SESSIONS_PER_LEADER + 1);
    }

    #[tokio::test]
    async fn a_turned_away_query_never_runs_its_local_part() {
        let plan = plan().await;
        let s = Sessions::new("b", SESSION_TTL);
        assert!(s
            .admit(Agreed::new(query("a", "q"), plan.clone(), None), no_part)
            .0
            .is_ok());
        let mut ran = false;
        let dup = Agreed::new(query("a", "q"), plan, None);
        let _ = s.admit(dup, |q, p, sp| {
            ran = true;
            no_part(q, p, sp)
        });
        assert!(!ran);
    }

    #[tokio::test]
    async fn only_an_agreed_query_starts_and_only_once() {
        let (s, key) = agreed_at_b().await;
        let agreed = s.take_for_start(&key).ok().unwrap();
        // While `start` is checked, a second one is refused.
        let (r, ended) = s.take_for_start(&key).err().unwrap();
        assert!(ended.is_none());
        assert!(r.to_string().contains("already started"), "{r}");
        let running = agreed.start(Agreement::AsPlanned, no_part);
        s.run(&running);
        let (r, _) = s.take_for_start(&key).err().unwrap();
        assert!(r.to_string().contains("already started"), "{r}");
        // The end leaves the table with its reason.
        s.close(&key, &reason("b"));
        let _ended = running.end("shares sent");
        let (r, _) = s.take_for_start(&key).err().unwrap();
        assert_eq!(r, PeerRefusal::Ended(reason("b")));
        assert!(s.is_empty());
    }

    #[tokio::test]
    async fn a_message_for_an_unknown_query_is_refused_and_an_ended_one_says_why() {
        let plan = plan().await;
        let s = Sessions::new("b", SESSION_TTL);
        let unknown = ("a".to_string(), "nope".to_string());
        let (r, _) = s.take_for_start(&unknown).err().unwrap();
        assert_eq!(
            r,
            PeerRefusal::Other("b has no agreed query nope from a".into())
        );
        assert!(s.route(&unknown).is_err());
        // An abort of an agreed query ends it at once, with the reason.
        let key = ("a".to_string(), "q".to_string());
        s.admit(Agreed::new(query("a", "q"), plan.clone(), None), no_part)
            .0
            .ok()
            .unwrap();
        let ended = s.abort(&key, "c", &reason("c")).unwrap();
        assert!(
            ended.outcome.starts_with("aborted by c"),
            "{}",
            ended.outcome
        );
        assert!(ended.settled.is_none());
        assert_eq!(
            s.take_for_start(&key).err().unwrap().0,
            PeerRefusal::Ended(reason("c"))
        );
        assert_eq!(
            s.route(&key).err().unwrap(),
            PeerRefusal::Ended(reason("c"))
        );
        // Another party's abort for a query not open here is not kept (no
        // party but the leader may fill the ring of reasons) ...
        assert!(s.abort(&unknown, "c", &reason("c")).is_none());
        assert!(matches!(
            s.take_for_start(&unknown).err().unwrap().0,
            PeerRefusal::Other(_)
        ));
        // ... the leader's is: an abort that overtakes its proposal makes
        // the proposal refused when it arrives, and it runs nothing.
        assert!(s.abort(&unknown, "a", &reason("a")).is_none());
        let late = Agreed::new(query("a", "nope"), plan, None);
        let (r, _) = s.admit(late, |_, _, _| panic!("an ended query runs nothing"));
        assert!(matches!(r, Err((Full::Ended(why), _)) if why == reason("a")));
        // An ended query keeps its first reason.
        s.abort(&key, "a", &reason("a"));
        assert_eq!(
            s.take_for_start(&key).err().unwrap().0,
            PeerRefusal::Ended(reason("c"))
        );
    }

    #[tokio::test]
    async fn a_query_stopped_before_start_ends_at_start_before_any_charge() {
        let (s, key) = agreed_at_b().await;
        // A peer's malformed message stopped the mailbox.
        s.route(&key).unwrap().mailbox.abort(&reason("c"));
        let (r, ended) = s.take_for_start(&key).err().unwrap();
        assert_eq!(r, PeerRefusal::Ended(reason("c")));
        let ended = ended.unwrap();
        assert!(ended.outcome.starts_with("not run"), "{}", ended.outcome);
        assert!(ended.settled.is_none());
        assert!(s.is_empty());
    }

    #[tokio::test]
    async fn this_partys_own_queries_do_not_lock_other_leaders_out() {
        let plan = plan().await;
        let s = Sessions::new("b", SESSION_TTL);
        let mut running = Vec::new();
        for i in 0..MAX_SESSIONS {
            let r = Agreed::new(query("b", &format!("own{i}")), plan.clone(), None)
                .start(Agreement::AsPlanned, no_part);
            s.run(&r);
            running.push(r);
        }
        let a = Agreed::new(query("a", "q"), plan, None);
        assert!(s.admit(a, no_part).0.is_ok());
    }

    #[tokio::test]
    async fn a_running_query_that_ends_stops_its_local_part_even_once_taken() {
        let plan = plan().await;
        let mut a = Agreed::new(query("a", "q"), plan, None);
        let (task, dropped) = pending_part();
        a.prepare(|_, _, _| task);
        let mut r = a.start(Agreement::AsPlanned, no_part);
        // The computation took the handle and was then dropped (a cancel).
        drop(r.prepared.take());
        let _ = r.end("cancelled by the analyst");
        dropped.await.unwrap();
    }

    #[tokio::test]
    async fn shares_go_where_the_state_allows() {
        let plan = plan().await;
        let s = Sessions::new("a", SESSION_TTL);
        let key = ("a".to_string(), "q".to_string());
        s.admit(Agreed::new(query("a", "q"), plan, None), no_part)
            .0
            .ok()
            .unwrap();
        // Messages may come before `start` (a peer that started first):
        // they go to the query's mailbox, checked against the agreed plan,
        // and the engine says which steps may (the gateway asks it).
        let r = s.route(&key).unwrap();
        assert!(!r.started);
        r.mailbox.deliver("b", SEEDS, one_row_batch()).unwrap();
        let agreed = s.take_for_start(&key).ok().unwrap();
        let r = s.route(&key).unwrap();
        assert!(!r.started);
        let agreed_fingerprint = r.plan.fingerprint.clone();
        let running = agreed.start(
            Agreement::UnderDp {
                plan: (*r.plan).clone().led_by("b").unwrap(),
                charge: None,
            },
            no_part,
        );
        s.run(&running);
        let r = s.route(&key).unwrap();
        assert!(r.started);
        assert_eq!(
            r.plan.fingerprint, running.plan.fingerprint,
            "a message to a running query is checked against the plan it runs under"
        );
        assert_ne!(r.plan.fingerprint, agreed_fingerprint);
        // The seeds kept before `start` are in the same mailbox.
        assert!(r.mailbox.deliver("b", SEEDS, one_row_batch()).is_err());
    }

    #[tokio::test]
    async fn an_abort_stops_a_started_query_in_its_own_task() {
        let (s, key) = agreed_at_b().await;
        let agreed = s.take_for_start(&key).ok().unwrap();
        // Aborted while `start` is being checked: the mailbox knows.
        assert!(s.abort(&key, "c", &reason("c")).is_none());
        assert_eq!(agreed.query.mailbox.aborted(), Some(reason("c")));
        let running = agreed.start(Agreement::AsPlanned, no_part);
        s.run(&running);
        // Still open: its task sees the abort and ends it.
        assert!(s.is_open(&key));
        assert!(s.abort(&key, "c", &reason("c")).is_none());
        assert!(s.route(&key).unwrap().started);
    }

    #[tokio::test]
    async fn an_agreed_query_not_started_in_time_expires() {
        let plan = plan().await;
        let s = Sessions::new("b", Duration::ZERO);
        let key = ("a".to_string(), "q1".to_string());
        s.admit(Agreed::new(query("a", "q1"), plan.clone(), None), no_part)
            .0
            .ok()
            .unwrap();
        // Expiry runs before the next admission, and ends the stale query.
        let (r, expired) = s.admit(Agreed::new(query("a", "q2"), plan.clone(), None), no_part);
        assert!(r.is_ok());
        assert_eq!(expired.len(), 1);
        assert!(expired[0].outcome.starts_with("expired"));
        let (refusal, _) = s.take_for_start(&key).err().unwrap();
        let PeerRefusal::Ended(why) = refusal else {
            panic!("an expired query says why it ended");
        };
        assert!(why.detail.contains("not started within"), "{why:?}");
        // A `start` that finds its query past its time ends it too.
        let (refusal, ended) = s
            .take_for_start(&("a".to_string(), "q2".to_string()))
            .err()
            .unwrap();
        assert!(matches!(refusal, PeerRefusal::Ended(_)));
        assert!(ended.unwrap().outcome.starts_with("expired"));
        assert!(s.is_empty());
    }

    #[tokio::test]
    async fn ending_or_replanning_stops_the_local_part() {
        let plan = plan().await;
        // Ended before `start`: the local part stops.
        let mut a = Agreed::new(query("a", "q"), plan.clone(), None);
        let (task, dropped) = pending_part();
        a.prepare(|_, _, _| task);
        let _ = a.end("aborted");
        dropped.await.unwrap();
        // Started under DP: the part prepared without clamps stops and a
        // new one starts under the DP plan.
        let mut a = Agreed::new(query("a", "q"), plan.clone(), None);
        let (task, dropped) = pending_part();
        a.prepare(|_, _, _| task);
        let mut again = false;
        let running = a.start(
            Agreement::UnderDp {
                plan: plan.clone(),
                charge: None,
            },
            |q, p, s| {
                again = true;
                no_part(q, p, s)
            },
        );
        dropped.await.unwrap();
        assert!(again);
        // Started as planned: the prepared part is the one that runs.
        let mut a = Agreed::new(query("a", "q"), plan.clone(), None);
        let (task, dropped) = pending_part();
        a.prepare(|_, _, _| task);
        let running2 = a.start(Agreement::AsPlanned, |_, _, _| {
            panic!("the prepared local part is used")
        });
        assert!(running2.prepared.is_some());
        // A running query that ends stops its local part too.
        let _ = running2.end("aborted");
        dropped.await.unwrap();
        drop(running);
    }

    #[tokio::test]
    async fn a_dp_requirement_holds_the_local_part_until_start() {
        let plan = plan().await;
        let req = Requirement {
            party: "b".into(),
            mechanism: planner::privacy::Mechanism::Laplace,
            epsilon_micro: 1_000_000,
            delta: 0.0,
            colluders: None,
            clamps: Default::default(),
            individual_id: None,
            max_rows: 1,
            min_group_size: 0,
        };
        let mut a = Agreed::new(query("a", "q"), plan, Some(req));
        a.prepare(|_, _, _| panic!("no local part before the agreed clamps"));
        assert!(a.prepared.is_none());
    }

    #[tokio::test]
    async fn a_charge_is_kept_once_the_local_part_ran_or_a_reveal_could_follow() {
        let plan = plan().await;
        let charge = Charge {
            ledger_key: "a/q".into(),
            epsilon_micro: 500_000,
        };
        let run = || {
            Agreed::new(query("a", "q"), plan.clone(), None).start(
                Agreement::UnderDp {
                    plan: plan.clone(),
                    charge: Some(charge.clone()),
                },
                no_part,
            )
        };
        let settled = run().end("not run").settled.unwrap();
        assert_eq!(settled.charge, charge);
        assert!(!settled.kept, "nothing ran: refunded");
        let r = run();
        r.spent.local_ran.store(true, Ordering::SeqCst);
        assert!(r.end("aborted").settled.unwrap().kept);
        let r = run();
        r.spent.reveal_point.store(true, Ordering::SeqCst);
        assert!(r.end("revealed").settled.unwrap().kept);
        // Without a charge there is nothing to settle.
        let r =
            Agreed::new(query("a", "q"), plan.clone(), None).start(Agreement::AsPlanned, no_part);
        assert!(r.end("revealed").settled.is_none());
    }
}
