//! One party's gateway: its catalog, policy, data, audit log and peers, and
//! the life of a query, as the querying gateway (the leader) and as a peer.
//!
//! A query's path at the leader: plan → own policy → `propose` to every peer
//! (each plans and decides for itself) → all fingerprints equal? → `start` →
//! every party runs its local part and shares → the leader alone adds the
//! result shares → post part on revealed values. Any failure before the
//! reveal aborts every party and reveals nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::i256;
use connectors::LocalSource;
use executor::encode::{dense_partials, sum_cannot_wrap, to_ring};
use executor::transport::Mailbox;
use executor::{
    AbortKind, AbortReason, AdditiveEngine, GroupIndex, SecureSum, SharedTable, TransportError,
    Width,
};
use planner::finalize::{post_plan, revealed_batch, Revealed};
use planner::privacy::{DpParams, Noise, Requirement};
use planner::{plan_query, Catalog, FederatedPlan, QueryOptions};
use policies::{Analyst, AuditEntry, AuditLog, Decision, Ledger, Policy};
use sha2::{Digest, Sha256};

use crate::config::{AnalystCredential, Fault, GatewayConfig};
use crate::peer::{PeerAction, PeerClients, Propose, QueryRef, QueryTransport, Start, Verdict};

/// How a party's abort that may depend on its rows begins. It does not
/// name the party: which party's data made a query fail is itself
/// something the analyst must not learn (the secure sum hides which party
/// holds what). The party's own log names itself and the cause.

/// Sessions not started within this time are dropped.
const SESSION_TTL: Duration = Duration::from_secs(600);
/// Open queries (sessions) one leader may have at this party, and in all.
pub const MAX_SESSIONS_PER_LEADER: usize = 64;
pub const MAX_SESSIONS: usize = 512;
/// Password checks that may run at once (argon2id takes 19 MiB and a core).
pub const LOGIN_SLOTS: usize = 2;
/// How long a login waits for a free slot before it is turned away.
pub const LOGIN_WAIT: Duration = Duration::from_secs(30);
/// Logins that may wait for a slot; more are turned away at once.
pub const LOGIN_QUEUE: usize = 256;

/// What kind of failure an analyst sees (maps to gRPC codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Bad SQL or an unsupported construct.
    Invalid,
    /// A policy refused.
    Refused,
    /// A peer is down, slow or broke the protocol; nothing was revealed.
    Unavailable,
    /// The computation stopped before the reveal; nothing was revealed.
    Aborted,
    Unauthenticated,
    Internal,
}

#[derive(Debug, Clone)]
pub struct QueryFailure {
    pub kind: FailureKind,
    pub message: String,
}

impl std::fmt::Display for QueryFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl QueryFailure {
    fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        QueryFailure {
            kind,
            message: message.into(),
        }
    }
}

/// The answer to a query.
pub struct QueryAnswer {
    pub schema: arrow::datatypes::SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub fingerprint: String,
    /// Differential privacy: the noise behind each output column (empty
    /// without DP; `None` for group columns).
    pub noise: Vec<Option<planner::finalize::ColumnNoise>>,
    /// Differential privacy: the one-line summary (mechanism, ε, δ).
    pub privacy: Option<String>,
}

/// One query at one party, between `propose` and its end.
struct Session {
    /// The agreed plan; replaced once, at `start`, by its DP version.
    plan: Mutex<Arc<FederatedPlan>>,
    /// What this party's own policy demands under DP, decided at `propose`.
    requirement: Option<Requirement>,
    /// This party charged its budget ledger for the query.
    charged: AtomicBool,
    /// Set by the engine once this party's part can lead to a reveal; a
    /// charge is refunded only if it never was.
    reveal_point: Arc<AtomicBool>,
    /// This party's local part started under the DP plan: from then on an
    /// abort can depend on its rows, so a charge is never refunded.
    local_ran: AtomicBool,
    leader: String,
    analyst: Analyst,
    query_id: String,
    mailbox: Arc<Mailbox>,
    started: AtomicBool,
    created: Instant,
    /// Where this party's time went, for the query log.
    phases: Phases,
    /// The local part and its encoding, started at the party's own `allow`
    /// (nothing leaves the party before the secure sum).
    prepared: Mutex<Option<Prepared>>,
}

impl Session {
    fn plan(&self) -> Arc<FederatedPlan> {
        self.plan.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_plan(&self, plan: FederatedPlan) {
        *self.plan.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(plan);
    }

    fn new(
        plan: FederatedPlan,
        leader: &str,
        analyst: &Analyst,
        query_id: &str,
        timeout: Duration,
        phases: Phases,
    ) -> Self {
        Session {
            plan: Mutex::new(Arc::new(plan)),
            requirement: None,
            charged: AtomicBool::new(false),
            reveal_point: Arc::new(AtomicBool::new(false)),
            local_ran: AtomicBool::new(false),
            leader: leader.to_string(),
            analyst: analyst.clone(),
            query_id: query_id.to_string(),
            mailbox: Arc::new(Mailbox::new(timeout)),
            started: AtomicBool::new(false),
            created: Instant::now(),
            phases,
            prepared: Mutex::new(None),
        }
    }
}

/// Wall-clock spans of one query at one party: the profile that
/// `log_queries` prints (where the fixed cost of a query goes). Phases may
/// overlap: the local part runs while the agreement is still under way.
struct Phases {
    t0: Instant,
    spans: Mutex<Vec<(&'static str, Duration, Duration)>>,
}

impl Phases {
    fn new() -> Self {
        Phases {
            t0: Instant::now(),
            spans: Mutex::new(Vec::new()),
        }
    }

    /// Records that phase `name` ran from `since` until now.
    fn span(&self, name: &'static str, since: Instant) {
        let now = Instant::now();
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).push((
            name,
            since.saturating_duration_since(self.t0),
            now - since,
        ));
    }

    /// `name start+duration` per phase, in ms from the query's start here.
    fn summary(&self) -> String {
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

/// A query as the leader asks for it.
#[derive(Clone, Copy)]
struct Ask<'a> {
    query_id: &'a str,
    sql: &'a str,
    analyst: &'a Analyst,
    options: &'a QueryOptions,
    explain_only: bool,
}

/// This party's encoded input, computed as soon as it allowed the query.
type Prepared = tokio::task::JoinHandle<Result<Input, PartyFailure>>;

/// A party's encoded partials and, under DP, its noise draws (made while
/// preparing, so that their value-dependent time hides in the local part's).
struct Input {
    /// Under DP, this party's noise is already in it.
    table: SharedTable,
}

pub struct Gateway {
    pub party: String,
    /// Every party of the federation, sorted; the order shares are dealt in.
    pub parties: Vec<String>,
    pub peers: BTreeMap<String, String>,
    catalog: Catalog,
    policy: Policy,
    source: Arc<dyn LocalSource>,
    audit: AuditLog,
    /// The privacy-budget ledger, when the policy uses DP.
    ledger: Option<Arc<Ledger>>,
    analysts: Vec<AnalystCredential>,
    auth_cache: Mutex<HashMap<String, [u8; 32]>>,
    /// One lock per (user, password) being checked: logins with the same
    /// credentials (a BI tool opening a pool of connections) wait for one
    /// check instead of each queueing their own.
    auth_inflight: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
    /// Bounds the password checks running at once.
    password_checks: crate::config::PasswordChecks,
    /// An argon2id hash of a random password, checked for unknown users.
    standin_hash: String,
    /// A secret of this gateway (derived from its private key) for the
    /// stand-in SCRAM verifiers of unknown users: stable across attempts and
    /// restarts, and not computable by anyone else.
    standin_secret: [u8; 32],
    pub(crate) clients: Arc<PeerClients>,
    sessions: Mutex<HashMap<(String, String), Arc<Session>>>,
    /// The last queries that ended here, with a reason this party may tell
    /// the others: a late `start` or share then learns why, instead of
    /// "no agreed query".
    ended: Mutex<std::collections::VecDeque<((String, String), AbortReason)>>,
    timeout: Duration,
    fault: Option<Fault>,
    log_queries: bool,
}

impl Gateway {
    pub async fn new(cfg: &GatewayConfig) -> anyhow::Result<Arc<Self>> {
        let source = open_sources(cfg).await?;
        if let Some(dir) = cfg.audit_log.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        }
        let audit = AuditLog::open(&cfg.audit_log)
            .map_err(|e| anyhow::anyhow!("audit log {}: {e}", cfg.audit_log.display()))?;
        let ledger = match &cfg.policy.privacy {
            Some(_) => Some(Arc::new(
                Ledger::open(&cfg.budget_ledger).map_err(|e| anyhow::anyhow!("{e}"))?,
            )),
            None => None,
        };
        let clients =
            PeerClients::new(&cfg.peers, cfg.tls.peer_client_config()?, cfg.peer_timeout)?;
        let mut parties: Vec<String> = cfg.peers.keys().cloned().collect();
        parties.push(cfg.party.clone());
        parties.sort();
        Ok(Arc::new(Gateway {
            party: cfg.party.clone(),
            parties,
            peers: cfg.peers.clone(),
            catalog: cfg.catalog.clone(),
            policy: cfg.policy.clone(),
            source: Arc::new(source),
            audit,
            ledger,
            analysts: cfg.analysts.clone(),
            auth_cache: Mutex::new(HashMap::new()),
            auth_inflight: Mutex::new(HashMap::new()),
            password_checks: crate::config::PasswordChecks::new(LOGIN_SLOTS, LOGIN_QUEUE),
            standin_hash: crate::config::standin_password_hash(),
            standin_secret: Sha256::digest(
                [
                    b"council-scram-standin\0".as_slice(),
                    cfg.tls.key.secret_der(),
                ]
                .concat(),
            )
            .into(),
            clients: Arc::new(clients),
            sessions: Mutex::new(HashMap::new()),
            ended: Mutex::new(std::collections::VecDeque::new()),
            timeout: cfg.peer_timeout,
            fault: cfg.fault,
            log_queries: cfg.log_queries,
        }))
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Queries this party holds a session for (agreed and not yet ended).
    pub fn open_sessions(&self) -> usize {
        self.sessions().len()
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn audit(&self, entry: AuditEntry) {
        if self.log_queries {
            let id: String = entry.query_id.chars().take(8).collect();
            let mut line = format!(
                "[{}] {} {id} by {}: {}",
                self.party, entry.event, entry.analyst, entry.decision
            );
            if let Some(r) = &entry.rule {
                line.push_str(&format!(" ({r})"));
            }
            if let Some(o) = &entry.outcome {
                line.push_str(&format!(" {o}"));
            }
            eprintln!("{line}");
        }
        if let Err(e) = self.audit.append(&entry) {
            eprintln!("[{}] AUDIT LOG WRITE FAILED: {e}", self.party);
        }
    }

    /// An analyst of this party by name (after the front door checked them).
    pub fn analyst_named(&self, user: &str) -> Option<Analyst> {
        self.analysts
            .iter()
            .find(|a| a.name == user)
            .map(|cred| self.as_analyst(cred))
    }

    /// A configured analyst as policies see them.
    fn as_analyst(&self, cred: &AnalystCredential) -> Analyst {
        Analyst {
            party: self.party.clone(),
            name: cred.name.clone(),
            roles: cred.roles.clone(),
        }
    }

    /// A stand-in SCRAM (salt, salted password) for a user this gateway
    /// does not know: keyed by its secret, so that nobody can tell it from a
    /// real verifier.
    pub fn standin_scram(&self, user: &str) -> (Vec<u8>, Vec<u8>) {
        let d =
            Sha256::digest([self.standin_secret.as_slice(), b"salt\0", user.as_bytes()].concat());
        let k =
            Sha256::digest([self.standin_secret.as_slice(), b"key\0", user.as_bytes()].concat());
        (d[..16].to_vec(), k.to_vec())
    }

    /// The SCRAM-SHA-256 (salt, salted password) of an analyst, if set.
    pub fn scram_verifier(&self, user: &str) -> Option<(Vec<u8>, Vec<u8>)> {
        let cred = self.analysts.iter().find(|a| a.name == user)?;
        crate::config::parse_scram(cred.scram.as_deref()?)
    }

    /// Checks a preset Bearer token (its SHA-256 is in the config).
    pub fn authenticate_token(&self, token: &str) -> Result<Analyst, QueryFailure> {
        let digest = hex::encode(Sha256::digest(token.as_bytes()));
        self.analysts
            .iter()
            .find(|a| a.token_sha256.as_deref() == Some(digest.as_str()))
            .map(|cred| self.as_analyst(cred))
            .ok_or_else(|| {
                QueryFailure::new(
                    FailureKind::Unauthenticated,
                    format!(
                        "the Bearer token is not valid at gateway {} (expired session or unknown token); \
                         authenticate again with user name and password",
                        self.party
                    ),
                )
            })
    }

    /// The federated tables `analyst` may query, with the columns this
    /// party's policy lets them use: what catalog browsing shows.
    pub fn visible_tables(&self, analyst: &Analyst) -> Vec<(String, arrow::datatypes::Schema)> {
        self.catalog
            .tables
            .values()
            .filter_map(|t| {
                let cols = self.policy.visible_columns(analyst, &t.name)?;
                let full = t.schema();
                let fields: Vec<_> = full
                    .fields()
                    .iter()
                    .filter(|f| cols.iter().any(|c| c == f.name()))
                    .cloned()
                    .collect();
                Some((t.name.clone(), arrow::datatypes::Schema::new(fields)))
            })
            .collect()
    }

    /// The schema a query's answer will have, planned here without running
    /// it or asking anyone (for prepared statements).
    pub async fn describe(&self, sql: &str) -> Result<arrow::datatypes::SchemaRef, QueryFailure> {
        let (explain, sql) = planner::split_explain(sql);
        if explain {
            return Ok(explain_schema());
        }
        let plan = self
            .plan(sql, &QueryOptions::default())
            .await
            .map_err(|e| QueryFailure::new(FailureKind::Invalid, e.to_string()))?;
        Ok(Arc::new(plan.logical.schema().as_arrow().clone()))
    }

    /// Checks an analyst's password; returns the analyst as policies see them.
    ///
    /// A password check (argon2id, 19 MiB) runs on one of [`LOGIN_SLOTS`]
    /// threads of its own (`config::PasswordChecks`): a flood of bad logins
    /// queues there (at most [`LOGIN_QUEUE`], each turned away after
    /// [`LOGIN_WAIT`]) instead of taking the gateway's memory and cores from
    /// the analysts already logged in. An
    /// unknown user name costs the same check against a stand-in hash, so
    /// the time of a refusal does not tell which names exist.
    pub async fn authenticate(
        self: &Arc<Self>,
        user: &str,
        password: &str,
    ) -> Result<Analyst, QueryFailure> {
        let denied = || {
            QueryFailure::new(
                FailureKind::Unauthenticated,
                format!(
                    "wrong user name or password for `{}` at gateway {}",
                    user.chars().take(64).collect::<String>(),
                    self.party
                ),
            )
        };
        if user.len() > 256 || password.len() > 1024 {
            return Err(denied());
        }
        let cred = self.analysts.iter().find(|a| a.name == user).cloned();
        let hash = match &cred {
            Some(c) => c.password_hash.clone(),
            None => self.standin_hash.clone(),
        };
        let digest: [u8; 32] =
            Sha256::digest(format!("{user}\0{password}\0{hash}").as_bytes()).into();
        let cached = || {
            cred.is_some()
                && self
                    .auth_cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(user)
                    == Some(&digest)
        };
        let busy = || {
            QueryFailure::new(
                FailureKind::Unauthenticated,
                format!(
                    "gateway {} is checking too many passwords at once; try again in a moment",
                    self.party
                ),
            )
        };
        let flight = (!cached()).then(|| {
            let mut m = self.auth_inflight.lock().unwrap_or_else(|p| p.into_inner());
            if m.len() > LOGIN_QUEUE {
                m.retain(|_, l| Arc::strong_count(l) > 1);
            }
            InflightLogin {
                map: &self.auth_inflight,
                digest,
                lock: m.entry(digest).or_default().clone(),
            }
        });
        let _turn = match &flight {
            Some(l) => Some(
                tokio::time::timeout(LOGIN_WAIT, l.lock.clone().lock_owned())
                    .await
                    .map_err(|_| busy())?,
            ),
            None => None,
        };
        if flight.is_some() && !cached() {
            let ok = self
                .password_checks
                .check(password, &hash, LOGIN_WAIT)
                .await
                .ok_or_else(busy)?;
            if !ok || cred.is_none() {
                return Err(denied());
            }
            let mut cache = self.auth_cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.insert(user.to_string(), digest);
        }
        match cred {
            Some(c) => Ok(self.as_analyst(&c)),
            None => Err(denied()),
        }
    }

    async fn plan(
        &self,
        sql: &str,
        options: &QueryOptions,
    ) -> Result<FederatedPlan, planner::PlanError> {
        plan_query(sql, &self.catalog, &self.parties, options).await
    }

    // ----- as a peer -------------------------------------------------------

    /// `propose` from `from`: plan it ourselves, decide with our own policy.
    pub async fn on_propose(self: &Arc<Self>, from: &str, p: Propose) -> Verdict {
        if self.fault == Some(Fault::SilentBeforeVerdict) && !p.explain_only {
            std::future::pending::<()>().await;
        }
        let phases = Phases::new();
        let t = Instant::now();
        let mut entry = AuditEntry {
            event: "decision".into(),
            query_id: p.query_id.clone(),
            leader: from.to_string(),
            analyst: p.analyst.to_string(),
            sql: p.sql.clone(),
            ..Default::default()
        };
        if p.analyst.party != from {
            let v = Verdict::Deny {
                rule: "analysts".into(),
                reason: format!(
                    "gateway {from} may only submit queries of its own analysts, not of {}",
                    p.analyst
                ),
            };
            entry.decision = "deny".into();
            entry.rule = Some("analysts".into());
            self.audit(entry);
            return v;
        }
        let plan = match self.plan(&p.sql, &p.options).await {
            Ok(plan) => plan,
            Err(e) => {
                entry.decision = "error".into();
                entry.outcome = Some(e.to_string());
                self.audit(entry);
                return Verdict::Error {
                    message: e.to_string(),
                };
            }
        };
        entry.fingerprint = Some(plan.fingerprint.clone());
        phases.span("plan", t);
        let decision = match self.policy.check(&plan, &p.analyst) {
            Decision::Allow => self.own_requirement(&plan, &p.analyst),
            Decision::Deny { rule, reason } => Err((rule, reason)),
        };
        match decision {
            Err((rule, reason)) => {
                entry.decision = "deny".into();
                entry.rule = Some(rule.clone());
                entry.outcome = Some(reason.clone());
                self.audit(entry);
                Verdict::Deny { rule, reason }
            }
            Ok(requirement) => {
                entry.decision = "allow".into();
                if p.explain_only {
                    entry.event = "explain".into();
                } else {
                    let mut sessions = self.sessions();
                    sessions.retain(|_, s| {
                        s.started.load(Ordering::SeqCst) || s.created.elapsed() < SESSION_TTL
                    });
                    // Each session may run a local part: bound them per
                    // leader and in total, so that one peer cannot make this
                    // party scan its data without end.
                    let from_leader = sessions.keys().filter(|(l, _)| l == from).count();
                    if from_leader >= MAX_SESSIONS_PER_LEADER || sessions.len() >= MAX_SESSIONS {
                        drop(sessions);
                        entry.decision = "error".into();
                        entry.outcome = Some("too many open queries".into());
                        self.audit(entry);
                        return Verdict::Error {
                            message: format!(
                                "peer {} has too many open queries ({from_leader} from {from}); try again when some have ended",
                                self.party
                            ),
                        };
                    }
                    if p.query_id.len() > 64 {
                        return Verdict::Error {
                            message: "a query id has at most 64 characters".into(),
                        };
                    }
                    let key = (from.to_string(), p.query_id.clone());
                    if sessions.contains_key(&key) {
                        return Verdict::Error {
                            message: format!("query id {} is already in use", p.query_id),
                        };
                    }
                    let mut session = Session::new(
                        plan.clone(),
                        from,
                        &p.analyst,
                        &p.query_id,
                        self.timeout,
                        phases,
                    );
                    session.requirement = requirement.clone();
                    let session = Arc::new(session);
                    sessions.insert(key, session.clone());
                    drop(sessions);
                    // Under this party's own DP requirement the local part
                    // will be clamped and bounded: it waits for `start`.
                    if requirement.is_none() {
                        self.prepare(&session);
                    }
                }
                self.audit(entry);
                let source = if p.explain_only {
                    self.source.explain(&plan.local).await
                } else {
                    Vec::new()
                };
                Verdict::Allow {
                    fingerprint: plan.fingerprint,
                    source,
                    privacy: requirement,
                }
            }
        }
    }

    /// `start` from the leader: run our part in the background.
    ///
    /// With differential privacy, `start` carries the parameters the leader
    /// merged from every party's requirement: this party checks them
    /// against its own, derives the DP plan itself (the fingerprint must
    /// match the leader's) and charges its budget before anything of the
    /// query can leave it.
    pub fn on_start(self: &Arc<Self>, from: &str, start: Start) -> Result<(), PeerRefusal> {
        let query_id = &start.query_id;
        let s = self
            .sessions()
            .get(&(from.to_string(), query_id.to_string()))
            .cloned()
            .ok_or_else(|| self.no_session(from, query_id))?;
        if s.started.swap(true, Ordering::SeqCst) {
            return Err(PeerRefusal::Other(format!(
                "query {query_id} was already started"
            )));
        }
        if let Err(e) = self.adopt_privacy(&s, start.privacy, start.fingerprint.as_deref()) {
            let reason = AbortReason::new(AbortKind::Other, &self.party, e.clone());
            self.note_end(&s, &reason);
            self.finish(&s, format!("not run: {e}"));
            return Err(PeerRefusal::Ended(reason));
        }
        if self.fault == Some(Fault::SilentAfterStart) {
            // Played dead right after accepting `start`.
            return Ok(());
        }
        let me = self.clone();
        tokio::spawn(async move {
            let outcome = match me.compute(&s).await {
                Ok(_) => {
                    me.note_end(
                        &s,
                        &AbortReason::new(
                            AbortKind::Other,
                            &me.party,
                            "it had already sent its result share",
                        ),
                    );
                    "shares sent".to_string()
                }
                Err(f) => {
                    eprintln!("[{}] query {} failed: {}", me.party, s.query_id, f.local);
                    me.note_end(&s, &f.shared);
                    me.abort_everywhere(&s, &f.shared).await;
                    format!("aborted: {}", f.local)
                }
            };
            me.finish(&s, outcome);
        });
        Ok(())
    }

    /// Remembers why a query ended here (a reason other parties may see).
    fn note_end(&self, s: &Session, reason: &AbortReason) {
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        if ended.len() >= 512 {
            ended.pop_front();
        }
        ended.push_back(((s.leader.clone(), s.query_id.clone()), reason.clone()));
    }

    /// The answer to a `start` or share for a query this party does not
    /// hold: why it ended, if it did.
    fn no_session(&self, leader: &str, query_id: &str) -> PeerRefusal {
        let ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        match ended
            .iter()
            .rev()
            .find(|((l, q), _)| l == leader && q == query_id)
        {
            Some((_, reason)) => PeerRefusal::Ended(reason.clone()),
            None => PeerRefusal::Other(format!(
                "{} has no agreed query {query_id} from {leader}",
                self.party
            )),
        }
    }

    /// Checks the leader's DP parameters against this party's requirement,
    /// switches the session to the DP plan and charges the ledger.
    fn adopt_privacy(
        self: &Arc<Self>,
        s: &Arc<Session>,
        params: Option<DpParams>,
        fingerprint: Option<&str>,
    ) -> Result<(), String> {
        let refuse = |m: String| format!("{} refused: {m}", self.party);
        let params = match (params, &s.requirement) {
            (None, None) => return Ok(()),
            (None, Some(_)) => {
                return Err(refuse(
                    "its policy requires differential privacy for this query, and the leader started it without \
                     (policy: privacy)"
                        .into(),
                ))
            }
            (Some(p), req) => {
                if let Some(r) = req {
                    p.satisfies(r, self.parties.len())
                        .map_err(|e| refuse(format!("the query's privacy parameters fall short: {e} (policy: privacy)")))?;
                }
                p
            }
        };
        let plan = (*s.plan())
            .clone()
            .with_privacy(params.clone())
            .map_err(|e| refuse(e.to_string()))?;
        if fingerprint != Some(plan.fingerprint.as_str()) {
            return Err(refuse(format!(
                "the leader's DP plan differs from the one computed here ({} vs {})",
                short(fingerprint.unwrap_or("none")),
                short(&plan.fingerprint)
            )));
        }
        s.set_plan(plan);
        self.charge(s, &params)?;
        // The local part prepared at `propose` had no clamps or bounds.
        if let Some(task) = s.prepared.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
        self.prepare(s);
        Ok(())
    }

    /// This party's requirement for `plan`, after checking that the
    /// analyst's budget still covers one query at this party.
    fn own_requirement(
        &self,
        plan: &FederatedPlan,
        analyst: &Analyst,
    ) -> Result<Option<Requirement>, (String, String)> {
        let Some(mut req) = self.policy.requirement(plan, analyst) else {
            return Ok(None);
        };
        req.party = self.party.clone();
        if let (Some(ledger), Some(pp)) = (&self.ledger, &self.policy.privacy) {
            let who = analyst.to_string();
            let left = ledger
                .remaining(&who, &pp.budget, policies::ledger::now_unix())
                .map_err(|e| ("privacy.budget".to_string(), e.to_string()))?;
            if left.epsilon_micro < req.epsilon_micro || (req.delta > 0.0 && left.delta < req.delta)
            {
                return Err((
                    "privacy.budget".into(),
                    policies::ledger::over_budget_message(
                        &who,
                        &pp.budget,
                        left,
                        req.epsilon_micro,
                        req.delta,
                    ),
                ));
            }
            if let Some(pb) = self.policy.party_budget(&analyst.party) {
                let left = ledger
                    .remaining_for_party(&analyst.party, &pb, policies::ledger::now_unix())
                    .map_err(|e| ("privacy.budget".to_string(), e.to_string()))?;
                if left.epsilon_micro < req.epsilon_micro
                    || (req.delta > 0.0 && left.delta < req.delta)
                {
                    return Err((
                        "privacy.budget.per_party_epsilon".into(),
                        policies::ledger::over_budget_message(
                            &format!("all analysts of {} together", analyst.party),
                            &pb,
                            left,
                            req.epsilon_micro,
                            req.delta,
                        ),
                    ));
                }
            }
        }
        Ok(Some(req))
    }

    /// Records the charge for a DP query durably, before anything of it can
    /// be revealed; refuses if the budget does not cover it.
    fn charge(&self, s: &Session, params: &DpParams) -> Result<(), String> {
        let (Some(_), Some(ledger), Some(pp)) =
            (&s.requirement, &self.ledger, &self.policy.privacy)
        else {
            return Ok(());
        };
        ledger
            .charge(
                &ledger_key(s),
                &s.analyst.to_string(),
                params.epsilon_micro,
                params.delta,
                &pp.budget,
                self.policy.party_budget(&s.analyst.party).as_ref(),
                policies::ledger::now_unix(),
                &s.plan().sql,
            )
            .map_err(|e| format!("{} refused: {e} (policy: privacy.budget)", self.party))?;
        s.charged.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// `abort` from any party of the query.
    pub fn on_abort(&self, from: &str, r: &QueryRef) {
        let leader = if r.leader.is_empty() {
            from
        } else {
            r.leader.as_str()
        };
        if !self.parties.iter().any(|p| p == from) {
            return;
        }
        let key = (leader.to_string(), r.query_id.clone());
        let s = self.sessions().get(&key).cloned();
        if let Some(s) = s {
            s.mailbox.abort(&r.reason);
            // A started session ends in its own task, which sees the abort.
            if !s.started.load(Ordering::SeqCst) {
                self.note_end(&s, &r.reason);
                self.finish(&s, format!("aborted by {from}: {}", r.reason));
            }
        }
    }

    /// The shape of `from`'s share for a query this party holds: (rows,
    /// most columns). An input share is one 32-byte seed; a result share
    /// has one row per group and at most two columns per shared partial plus
    /// the keys.
    pub fn expected_share(
        &self,
        from: &str,
        leader: &str,
        query_id: &str,
        round: executor::Round,
    ) -> Result<ShareShape, PeerRefusal> {
        let s = self.share_session(from, leader, query_id, round)?;
        let plan = s.plan();
        let (rows, max_cols) = share_shape(&plan, round);
        let key_bytes = match round {
            executor::Round::Result if plan.grouped => plan.groups.key_text_bytes(),
            _ => 0,
        };
        Ok(ShareShape {
            rows,
            max_cols,
            key_bytes,
        })
    }

    /// The session a share from `from` belongs to, if `from` may send it.
    fn share_session(
        &self,
        from: &str,
        leader: &str,
        query_id: &str,
        round: executor::Round,
    ) -> Result<Arc<Session>, PeerRefusal> {
        if !self.parties.iter().any(|p| p == from) {
            return Err(PeerRefusal::Other(format!(
                "{from} is not a party of this federation"
            )));
        }
        if round == executor::Round::Result && leader != self.party {
            return Err(PeerRefusal::Other(format!(
                "result shares go to the querying gateway {leader}, not to {}",
                self.party
            )));
        }
        self.sessions()
            .get(&(leader.to_string(), query_id.to_string()))
            .cloned()
            .ok_or_else(|| self.no_session(leader, query_id))
    }

    /// Ends the query whose share from a peer was malformed.
    pub fn reject_share(&self, leader: &str, query_id: &str, reason: &str) {
        let s = self
            .sessions()
            .get(&(leader.to_string(), query_id.to_string()))
            .cloned();
        if let Some(s) = s {
            s.mailbox
                .abort(&AbortReason::new(AbortKind::Protocol, &self.party, reason));
        }
    }

    /// A share batch from `from`.
    pub fn on_put(
        &self,
        from: &str,
        leader: &str,
        query_id: &str,
        round: executor::Round,
        batch: RecordBatch,
    ) -> Result<(), PeerRefusal> {
        let s = self.share_session(from, leader, query_id, round)?;
        // The shape is checked on delivery, before anything is kept (and
        // before decoding, in `service::decode_share_stream`).
        let (rows, max_cols) = share_shape(&s.plan(), round);
        if batch.num_rows() != rows || batch.num_columns() > max_cols {
            let reason = format!(
                "{from} sent a {round:?} share of {} rows and {} columns where {rows} rows and at most {max_cols} \
                 columns belong",
                batch.num_rows(),
                batch.num_columns()
            );
            s.mailbox.abort(&AbortReason::new(
                AbortKind::Protocol,
                &self.party,
                reason.clone(),
            ));
            return Err(PeerRefusal::Other(reason));
        }
        s.mailbox.deliver(from, round, batch).map_err(|e| match e {
            TransportError::Aborted(r) => PeerRefusal::Ended(r),
            other => PeerRefusal::Other(other.to_string()),
        })
    }

    fn finish(&self, s: &Session, mut outcome: String) {
        self.sessions()
            .remove(&(s.leader.clone(), s.query_id.clone()));
        if s.charged.swap(false, Ordering::SeqCst) {
            if let Some(ledger) = &self.ledger {
                let key = ledger_key(s);
                let spent =
                    s.reveal_point.load(Ordering::SeqCst) || s.local_ran.load(Ordering::SeqCst);
                let r = if spent {
                    ledger.mark_spent(&key)
                } else {
                    ledger.refund(&key).map(|_| ())
                };
                if let Err(e) = r {
                    eprintln!("[{}] BUDGET LEDGER UPDATE FAILED: {e}", self.party);
                }
                // The audit log records what the query cost here.
                let eps = s
                    .plan()
                    .privacy
                    .as_ref()
                    .map(|p| planner::privacy::epsilon_text(p.epsilon_micro))
                    .unwrap_or_default();
                outcome.push_str(&if spent {
                    format!("; privacy budget charged: ε = {eps}")
                } else {
                    format!("; privacy budget refunded: ε = {eps}")
                });
            }
        }
        if let Some(task) = s.prepared.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
        if self.log_queries {
            let id: String = s.query_id.chars().take(8).collect();
            eprintln!("[{}] timing {id} (ms): {}", self.party, s.phases.summary());
        }
        self.audit(AuditEntry {
            event: "outcome".into(),
            query_id: s.query_id.clone(),
            leader: s.leader.clone(),
            analyst: s.analyst.to_string(),
            sql: s.plan().sql.clone(),
            decision: "-".into(),
            fingerprint: Some(s.plan().fingerprint.clone()),
            outcome: Some(outcome),
            ..Default::default()
        });
    }

    async fn abort_everywhere(&self, s: &Session, reason: &AbortReason) {
        s.mailbox.abort(reason);
        self.abort_peers(&s.leader, &s.query_id, reason).await;
    }

    /// Tells every peer to drop the query (best effort: a peer that cannot
    /// be reached times out on its own).
    async fn abort_peers(&self, leader: &str, query_id: &str, reason: &AbortReason) {
        let abort = PeerAction::Abort(QueryRef {
            query_id: query_id.to_string(),
            reason: reason.clone(),
            leader: leader.to_string(),
        });
        let sends = self.peers.keys().map(|p| {
            let abort = &abort;
            async move {
                let _ = self.clients.send(p, abort).await;
            }
        });
        futures::future::join_all(sends).await;
    }

    /// Starts this party's local part and encoding in the background. Only
    /// called once this party allowed the query; nothing leaves the party
    /// until the secure sum, which waits for the leader's `start`.
    fn prepare(self: &Arc<Self>, s: &Arc<Session>) {
        let me = self.clone();
        let s2 = s.clone();
        let task = tokio::spawn(async move { me.local_input(&s2).await });
        *s.prepared.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    /// This party's share of the work: its prepared input, then the secure
    /// sum. Returns the revealed totals at the leader.
    async fn compute(&self, s: &Session) -> Result<Option<Revealed>, PartyFailure> {
        let task = s.prepared.lock().unwrap_or_else(|p| p.into_inner()).take();
        let input = match task {
            // The local part ran over this party's rows, so how it ended
            // may depend on them: a data abort, which does not name it.
            Some(task) => task.await.map_err(|e| PartyFailure {
                local: format!("the local part's task ended abnormally: {e}"),
                shared: AbortReason::new(
                    AbortKind::Data,
                    &self.party,
                    "its local part failed (details in its gateway log)",
                ),
            })??,
            None => self.local_input(s).await?,
        };
        self.secure_sum(s, &input.table).await
    }

    /// The local part over this party's data, as ring elements per group.
    async fn local_input(&self, s: &Session) -> Result<Input, PartyFailure> {
        let t = Instant::now();
        let plan = &s.plan();
        let mine = |m: String| PartyFailure {
            shared: AbortReason::new(AbortKind::Data, &self.party, m.clone()),
            local: m,
        };
        // From here on, how the query ends may depend on this party's rows
        // (a source that fails, a value out of the declared domain, a sum
        // too large for the ring): under DP its charge is kept, whatever
        // happens next.
        if plan.privacy.is_some() {
            s.local_ran.store(true, Ordering::SeqCst);
        }
        let batches = self
            .source
            .run(&plan.local)
            .await
            .map_err(|e| PartyFailure {
                local: e.to_string(),
                shared: AbortReason::new(
                    AbortKind::Data,
                    &self.party,
                    "its local part failed (details in its gateway log)",
                ),
            })?;
        s.phases.span("local part", t);
        let t = Instant::now();
        let keys = if plan.grouped {
            plan.groups.key_arrays()
        } else {
            Vec::new()
        };
        let index = GroupIndex::new(keys.clone()).map_err(|e| mine(e.to_string()))?;
        let dense = dense_partials(&batches, &index, plan.local.partials.len()).map_err(|e| {
            PartyFailure {
                local: e.to_string(),
                shared: AbortReason::new(
                    AbortKind::Data,
                    &self.party,
                    "its local data does not fit the declared catalog (details in its gateway log)",
                ),
            }
        })?;
        if dense.outside > 0 {
            // For this party's operator only: how many of its rows keep the
            // catalog is a fact about its data, never sent anywhere.
            eprintln!(
                "[{}] query {}: {} local group(s) have a key outside the catalog's declared domain and were left out; \
                 add the value to the domain or fix the data",
                self.party,
                s.query_id,
                dense.outside
            );
        }
        let dense = dense.values;
        check_no_wrap(&self.party, plan, &dense, index.len())?;
        let shared_idx = plan.shared_partials();
        let mut shared: Vec<Vec<i256>> = shared_idx
            .iter()
            .map(|&i| plan.shared_values(i, &dense))
            .collect();
        let rows = index.len();
        // Differential privacy: this party's noise is drawn now (its
        // value-dependent time hides in the local part's) and added to its
        // own input before the ring bound is checked, so a noised total can
        // never wrap. The input is only ever seen as additive shares, so
        // adding the noise here is the same as adding it to a share.
        let t_noise = Instant::now();
        let specs: Vec<Option<executor::noise::NoiseSpec>> = shared_idx
            .iter()
            .map(|&i| {
                plan.noise_of(i).map(|n| executor::noise::NoiseSpec {
                    distribution: match n.noise {
                        Noise::Laplace { num, den } => {
                            executor::noise::Distribution::Laplace { num, den }
                        }
                        Noise::Gaussian { sigma2 } => {
                            executor::noise::Distribution::Gaussian { sigma2 }
                        }
                    },
                    bound: n.noise.draw_bound(),
                })
            })
            .collect();
        if plan.privacy.is_some() && specs.iter().any(|s| s.is_none()) {
            // Never reveal a total without its noise under DP.
            return Err(mine("a revealed total has no calibrated noise".into()));
        }
        let noise = executor::noise::draw_all(&specs, rows).map_err(mine)?;
        for (col, draws) in shared.iter_mut().zip(&noise) {
            if let Some(draws) = draws {
                for (v, d) in col.iter_mut().zip(draws) {
                    *v = v
                        .checked_add(i256::from_i128(*d))
                        .ok_or_else(|| mine("a noised partial does not fit its ring".into()))?;
                }
            }
        }
        if plan.privacy.is_some() {
            s.phases.span("noise", t_noise);
        }
        let widths = share_widths(plan);
        let ring = to_ring(&shared, &widths, self.parties.len()).map_err(|o| {
            let p = &plan.local.partials[shared_idx[o.partial]];
            PartyFailure {
                local: format!(
                    "partial {:?} of {:?} in group {} is {} and exceeds the per-party bound ±{} of the ring with {} parties",
                    p.kind,
                    p.arg.as_ref().map(|a| a.to_string()),
                    o.group,
                    o.value,
                    o.bound,
                    self.parties.len()
                ),
                shared: AbortReason::new(
                    AbortKind::Data,
                    &self.party,
                    "one of its partial sums is too large to combine exactly in the ring; \
                     lower the declared scale of the aggregated column or narrow the query",
                ),
            }
        })?;
        s.phases.span("encode", t);
        Ok(Input {
            table: SharedTable {
                keys,
                columns: ring,
                rows,
            },
        })
    }

    /// The secure sum of every party's input; the totals at the leader.
    async fn secure_sum(
        &self,
        s: &Session,
        input: &SharedTable,
    ) -> Result<Option<Revealed>, PartyFailure> {
        let t = Instant::now();
        let plan = &s.plan();
        let shared_idx = plan.shared_partials();
        let transport = QueryTransport {
            me: self.party.clone(),
            header_leader: s.leader.clone(),
            query_id: s.query_id.clone(),
            clients: self.clients.clone(),
            mailbox: s.mailbox.clone(),
            fault: self.fault,
        };
        if self.fault == Some(Fault::SilentBeforeShares) {
            // Play dead: the others must time out, abort, and reveal nothing.
            std::future::pending::<()>().await;
        }
        let engine: Box<dyn SecureSum> = match plan.options.engine {
            planner::plan::Engine::Additive => {
                let mut e =
                    AdditiveEngine::new(self.parties.clone(), self.party.clone(), s.leader.clone());
                e.reveal_point = Some(s.reveal_point.clone());
                Box::new(e)
            }
        };
        let out = engine
            .sum_and_reveal(&transport, input)
            .await
            .map_err(|e| PartyFailure {
                local: e.to_string(),
                shared: self.reason_of(&e),
            })?;
        s.phases.span("secure sum", t);
        let Some(cols) = out else {
            return Ok(None);
        };
        if cols.len() != shared_idx.len() {
            return Err(PartyFailure {
                local: format!(
                    "{} totals for {} shared partials",
                    cols.len(),
                    shared_idx.len()
                ),
                shared: AbortReason::new(AbortKind::Other, &self.party, "internal error"),
            });
        }
        let mut totals = vec![Vec::new(); plan.local.partials.len()];
        let mut wide = std::collections::BTreeMap::new();
        for (k, &i) in shared_idx.iter().enumerate() {
            let col = cols[k].clone();
            if plan.ring_bits(i) > 128 {
                wide.insert(i, col);
            } else {
                // A total of a ring of at most 128 bits fits i128.
                totals[i] = col.iter().map(|v| v.as_i128()).collect();
            }
        }
        Ok(Some(Revealed { totals, wide }))
    }

    // ----- as the leader ---------------------------------------------------

    /// Plans the query and decides with this party's own policy. A query the
    /// own policy refuses is never shown to the peers.
    async fn decide_own(
        &self,
        q: &Ask<'_>,
        phases: &Phases,
    ) -> Result<(FederatedPlan, Verdict), QueryFailure> {
        let Ask {
            query_id,
            sql,
            analyst,
            options,
            explain_only,
        } = *q;
        let t = Instant::now();
        let plan = self
            .plan(sql, options)
            .await
            .map_err(|e| QueryFailure::new(FailureKind::Invalid, e.to_string()))?;
        phases.span("plan", t);
        let mut requirement = None;
        let own = match self.policy.check(&plan, analyst) {
            Decision::Allow => match self.own_requirement(&plan, analyst) {
                Ok(r) => {
                    requirement = r;
                    Decision::Allow
                }
                Err((rule, reason)) => Decision::Deny { rule, reason },
            },
            deny => deny,
        };
        self.audit(AuditEntry {
            event: if explain_only {
                "explain".into()
            } else {
                "decision".into()
            },
            query_id: query_id.to_string(),
            leader: self.party.clone(),
            analyst: analyst.to_string(),
            sql: sql.to_string(),
            decision: if own == Decision::Allow {
                "allow".into()
            } else {
                "deny".into()
            },
            rule: match &own {
                Decision::Deny { rule, .. } => Some(rule.clone()),
                Decision::Allow => None,
            },
            fingerprint: Some(plan.fingerprint.clone()),
            ..Default::default()
        });
        if !explain_only {
            if let Decision::Deny { rule, reason } = &own {
                return Err(QueryFailure::new(
                    FailureKind::Refused,
                    format!("{} refused: {reason} (policy: {rule})", self.party),
                ));
            }
        }
        let verdict = match own {
            Decision::Allow => Verdict::Allow {
                fingerprint: plan.fingerprint.clone(),
                source: if explain_only {
                    self.source.explain(&plan.local).await
                } else {
                    Vec::new()
                },
                privacy: requirement,
            },
            Decision::Deny { rule, reason } => Verdict::Deny { rule, reason },
        };
        Ok((plan, verdict))
    }

    /// Asks every peer to plan and decide; returns every party's verdict,
    /// this party's first, or the first refusal or mismatch.
    async fn ask_peers(
        &self,
        q: &Ask<'_>,
        plan: &FederatedPlan,
        own: Verdict,
        phases: &Phases,
    ) -> Result<Vec<(String, Verdict)>, QueryFailure> {
        let Ask {
            query_id,
            sql,
            analyst,
            options,
            explain_only,
        } = *q;
        let t = Instant::now();
        let mut verdicts = vec![(self.party.clone(), own)];
        let proposal = Propose {
            query_id: query_id.to_string(),
            sql: sql.to_string(),
            options: options.clone(),
            analyst: analyst.clone(),
            explain_only,
        };
        let proposal = PeerAction::Propose(proposal);
        let asks = self.peers.keys().map(|p| {
            let proposal = &proposal;
            async move {
                let r = self.clients.send(p, proposal).await;
                let v = match r {
                    Ok(bytes) => serde_json::from_slice::<Verdict>(&bytes).unwrap_or_else(|e| {
                        Verdict::Error {
                            message: format!("unreadable verdict: {e}"),
                        }
                    }),
                    Err(
                        e @ (TransportError::Unreachable { .. } | TransportError::Timeout { .. }),
                    ) => Verdict::Unreachable {
                        message: e.to_string(),
                    },
                    Err(e) => Verdict::Error {
                        message: e.to_string(),
                    },
                };
                (p.clone(), v)
            }
        });
        verdicts.extend(futures::future::join_all(asks).await);
        phases.span("propose", t);
        if explain_only {
            return Ok(verdicts);
        }
        let mut failure = None;
        for (p, v) in &verdicts {
            let f = match v {
                Verdict::Allow { fingerprint, .. } if *fingerprint == plan.fingerprint => continue,
                Verdict::Allow { fingerprint, .. } => QueryFailure::new(
                    FailureKind::Refused,
                    format!(
                        "{p} computed a different plan (fingerprint {} vs {} here); check that every gateway \
                         runs the same Council version with the same catalog",
                        short(fingerprint),
                        short(&plan.fingerprint)
                    ),
                ),
                Verdict::Deny { rule, reason } => {
                    QueryFailure::new(FailureKind::Refused, format!("{p} refused: {reason} (policy: {rule})"))
                }
                Verdict::Unreachable { message } => {
                    QueryFailure::new(FailureKind::Unavailable, message.clone())
                }
                Verdict::Error { message } => QueryFailure::new(FailureKind::Invalid, format!("{p} could not plan the query: {message}")),
            };
            failure.get_or_insert(f);
        }
        if let Some(f) = failure {
            self.abort_peers(
                &self.party,
                query_id,
                &AbortReason::new(AbortKind::Other, &self.party, f.message.clone()),
            )
            .await;
            return Err(f);
        }
        Ok(verdicts)
    }

    /// Every party's DP requirement (from its verdict), merged.
    fn merged_privacy(&self, verdicts: &[(String, Verdict)]) -> Result<Option<DpParams>, String> {
        let reqs: Vec<Requirement> = verdicts
            .iter()
            .filter_map(|(p, v)| match v {
                Verdict::Allow {
                    privacy: Some(r), ..
                } => {
                    let mut r = r.clone();
                    r.party = p.clone();
                    Some(r)
                }
                _ => None,
            })
            .collect();
        DpParams::merge(&reqs, self.parties.len())
    }

    /// At the leader, once every party allowed: the merged DP parameters,
    /// the DP plan, the charge to this party's ledger and the local part
    /// under the agreed clamps and bounds.
    fn agree_privacy(
        self: &Arc<Self>,
        session: &Arc<Session>,
        verdicts: &[(String, Verdict)],
    ) -> Result<Option<DpParams>, QueryFailure> {
        let refused = |m: String| QueryFailure::new(FailureKind::Refused, m);
        let Some(params) = self.merged_privacy(verdicts).map_err(|e| {
            refused(format!(
                "the parties' privacy requirements cannot be met together: {e}"
            ))
        })?
        else {
            return Ok(None);
        };
        let plan = (*session.plan())
            .clone()
            .with_privacy(params.clone())
            .map_err(|e| QueryFailure::new(FailureKind::Invalid, e.to_string()))?;
        session.set_plan(plan);
        self.charge(session, &params).map_err(refused)?;
        if let Some(task) = session
            .prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
        self.prepare(session);
        Ok(Some(params))
    }

    /// EXPLAIN: the plan, the disclosure manifest and every party's verdict.
    pub async fn explain(
        &self,
        analyst: &Analyst,
        sql: &str,
        options: &QueryOptions,
    ) -> Result<String, QueryFailure> {
        let query_id = new_query_id();
        let phases = Phases::new();
        let ask = Ask {
            query_id: &query_id,
            sql,
            analyst,
            options,
            explain_only: true,
        };
        let (plan, own) = self.decide_own(&ask, &phases).await?;
        let verdicts = self.ask_peers(&ask, &plan, own, &phases).await?;
        let base_fingerprint = plan.fingerprint.clone();
        let (plan, dp_problem) = match self.merged_privacy(&verdicts) {
            Ok(Some(params)) => match plan.clone().with_privacy(params) {
                Ok(p) => (p, None),
                Err(e) => (plan, Some(e.to_string())),
            },
            Ok(None) => (plan, None),
            Err(e) => (plan, Some(e)),
        };
        let mut s = plan.explain(&self.party);
        if let Some(e) = dp_problem {
            s.push_str(&format!(
                "Differential privacy: required, but the query cannot run under it: {e}\n"
            ));
        }
        s.push_str("Verdicts:\n");
        let mut sources = String::new();
        for (p, v) in verdicts {
            let line = match v {
                Verdict::Allow {
                    fingerprint,
                    source,
                    privacy,
                } => {
                    for l in &source {
                        sources.push_str(&format!("  {p}: {l}\n"));
                    }
                    let dp = match privacy {
                        Some(r) => format!(
                            "; requires DP: {}, ε ≤ {} per query{}",
                            r.mechanism.name(),
                            planner::privacy::epsilon_text(r.epsilon_micro),
                            if r.delta > 0.0 {
                                format!(", δ ≤ {:e}", r.delta)
                            } else {
                                String::new()
                            }
                        ),
                        None => String::new(),
                    };
                    if fingerprint == base_fingerprint {
                        format!("allow (same plan){dp}")
                    } else {
                        format!("allow, but a DIFFERENT plan {}{dp}", short(&fingerprint))
                    }
                }
                Verdict::Deny { rule, reason } => format!("deny: {reason} (policy: {rule})"),
                Verdict::Error { message } => format!("error: {message}"),
                Verdict::Unreachable { message } => format!("unreachable: {message}"),
            };
            s.push_str(&format!("  {p}: {line}\n"));
        }
        if !sources.is_empty() {
            s.push_str("Local parts at each party's source (as that party reports them):\n");
            s.push_str(&sources);
        }
        Ok(s)
    }

    /// Runs a query for an authenticated analyst of this party.
    pub async fn run_query(
        self: &Arc<Self>,
        analyst: &Analyst,
        sql: &str,
        options: &QueryOptions,
    ) -> Result<QueryAnswer, QueryFailure> {
        let query_id = new_query_id();
        let phases = Phases::new();
        let ask = Ask {
            query_id: &query_id,
            sql,
            analyst,
            options,
            explain_only: false,
        };
        let (plan, own) = self.decide_own(&ask, &phases).await?;
        let own_requirement = match &own {
            Verdict::Allow { privacy, .. } => privacy.clone(),
            _ => None,
        };
        // Our own policy allowed it: start our local part now, while the
        // peers decide (nothing leaves this party before the secure sum).
        // Under DP the local part waits for the agreed clamps and bounds.
        let mut session = Session::new(plan, &self.party, analyst, &query_id, self.timeout, phases);
        session.requirement = own_requirement;
        let session = Arc::new(session);
        session.started.store(true, Ordering::SeqCst);
        self.sessions()
            .insert((self.party.clone(), query_id.clone()), session.clone());
        // An analyst who disconnects drops this future at whatever await it
        // is in: the guard then ends the query at every party and settles
        // this party's charge, as any other failure would.
        let _cancel = CancelGuard {
            gw: self.clone(),
            session: session.clone(),
        };
        if session.requirement.is_none() {
            self.prepare(&session);
        }
        let verdicts = match self
            .ask_peers(&ask, &session.plan(), own, &session.phases)
            .await
        {
            Ok(v) => v,
            Err(f) => {
                self.finish(&session, format!("not run: {}", f.message));
                return Err(f);
            }
        };
        let mut start = Start {
            query_id: query_id.clone(),
            privacy: None,
            fingerprint: None,
        };
        match self.agree_privacy(&session, &verdicts) {
            Ok(Some(params)) => {
                start.fingerprint = Some(session.plan().fingerprint.clone());
                start.privacy = Some(params);
            }
            Ok(None) => {}
            Err(f) => {
                self.abort_peers(
                    &self.party,
                    &query_id,
                    &AbortReason::new(AbortKind::Other, &self.party, f.message.clone()),
                )
                .await;
                self.finish(&session, format!("not run: {}", f.message));
                return Err(f);
            }
        }

        // `start` and our own part of the secure sum go together: our input
        // round carries only random seeds, and the peers' sessions exist
        // since they allowed. A failed start stops our part at once.
        let t = Instant::now();
        let start = PeerAction::Start(start);
        let starts = self.peers.keys().map(|p| {
            let start = &start;
            async move {
                self.clients
                    .send(p, start)
                    .await
                    .map_err(|e| self.reason_of_transport(&e))
            }
        });
        let starts = async {
            let failed = futures::future::join_all(starts)
                .await
                .into_iter()
                .find_map(|r| r.err());
            if let Some(e) = &failed {
                session.mailbox.abort(e);
            }
            session.phases.span("start", t);
            failed
        };
        let (failed_start, result) = tokio::join!(starts, self.compute(&session));
        let result = match (failed_start, result) {
            // Another party aborted first (its abort reached our mailbox
            // before our `start` reached a peer that had already ended the
            // query): its reason is the true one.
            (Some(e), Err(f)) if f.shared != e => Err(f),
            (Some(e), _) => Err(PartyFailure {
                local: e.to_string(),
                shared: e,
            }),
            (None, result) => result,
        };
        let revealed = match result {
            Ok(Some(r)) => r,
            Ok(None) => {
                let f = PartyFailure {
                    local: "the leader got no result".into(),
                    shared: AbortReason::new(AbortKind::Other, &self.party, "internal error"),
                };
                return Err(self.fail(&session, f).await);
            }
            Err(f) => return Err(self.fail(&session, f).await),
        };
        let t = Instant::now();
        let plan = session.plan();
        let batches = post_process(&plan, &revealed).await;
        session.phases.span("post part", t);
        self.finish(&session, "revealed to analyst".into());
        let (schema, batches) = batches?;
        Ok(QueryAnswer {
            schema,
            batches,
            fingerprint: plan.fingerprint.clone(),
            noise: planner::finalize::noise_report(&plan),
            privacy: plan.privacy.as_ref().map(crate::dp::summary),
        })
    }

    async fn fail(&self, s: &Session, f: PartyFailure) -> QueryFailure {
        self.note_end(s, &f.shared);
        self.abort_everywhere(s, &f.shared).await;
        self.finish(s, format!("aborted: {}", f.local));
        let kind = if f.shared.kind == AbortKind::Unavailable {
            FailureKind::Unavailable
        } else {
            FailureKind::Aborted
        };
        // The reason's own wording: a data abort does not name the party.
        QueryFailure::new(
            kind,
            format!(
                "{}; the query was aborted at every party and nothing was revealed",
                f.shared
            ),
        )
    }

    /// Why a secure computation failed, as this party tells the others.
    fn reason_of(&self, e: &executor::ExecError) -> AbortReason {
        match e {
            executor::ExecError::Transport(t) => self.reason_of_transport(t),
            executor::ExecError::Malformed { .. } => {
                AbortReason::new(AbortKind::Protocol, &self.party, e.to_string())
            }
            other => AbortReason::new(AbortKind::Other, &self.party, other.to_string()),
        }
    }

    fn reason_of_transport(&self, e: &TransportError) -> AbortReason {
        match e {
            // Another party's reason, as it gave it.
            TransportError::Aborted(r) => r.clone(),
            TransportError::Unreachable { .. } | TransportError::Timeout { .. } => {
                AbortReason::new(AbortKind::Unavailable, &self.party, e.to_string())
            }
            TransportError::Protocol { .. } => {
                AbortReason::new(AbortKind::Protocol, &self.party, e.to_string())
            }
        }
    }
}

/// The ring of each shared partial, in `shared_partials` order.
fn share_widths(plan: &FederatedPlan) -> Vec<Width> {
    plan.shared_partials()
        .iter()
        .map(|&i| match plan.ring_bits(i) {
            64 => Width::Z64,
            128 => Width::Z128,
            _ => Width::Z256,
        })
        .collect()
}

/// (rows, most columns) of a share in `round` of `plan`.
fn share_shape(plan: &FederatedPlan, round: executor::Round) -> (usize, usize) {
    match round {
        executor::Round::Input => (1, 1),
        executor::Round::Result => (
            if plan.grouped { plan.groups.len() } else { 1 },
            share_widths(plan).iter().map(|w| w.limbs()).sum::<usize>() + plan.groups.columns.len(),
        ),
    }
}

/// A login's place in the per-credential locks of `authenticate`. The last
/// login of these credentials removes their entry on every path (a wrong
/// password included), so no digest of an attempted password outlives its
/// check. Declared before the lock's guard, so dropped after it.
struct InflightLogin<'a> {
    map: &'a Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
    digest: [u8; 32],
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for InflightLogin<'_> {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // Ours and the map's: nobody else waits on these credentials.
        if Arc::strong_count(&self.lock) <= 2 {
            m.remove(&self.digest);
        }
    }
}

/// Ends a leader's query that was dropped before it finished (the analyst
/// cancelled or disconnected). A query that finished is no longer in the
/// session table, and the guard does nothing.
struct CancelGuard {
    gw: Arc<Gateway>,
    session: Arc<Session>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        let key = (self.session.leader.clone(), self.session.query_id.clone());
        if !self.gw.sessions().contains_key(&key) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let gw = self.gw.clone();
        let s = self.session.clone();
        rt.spawn(async move {
            let reason =
                AbortReason::new(AbortKind::Cancelled, &gw.party, "the analyst disconnected");
            gw.note_end(&s, &reason);
            gw.abort_everywhere(&s, &reason).await;
            gw.finish(&s, "cancelled by the analyst".into());
        });
    }
}

/// A party's failure: the full story for its own log, and what it may tell
/// the others (no private values).
struct PartyFailure {
    local: String,
    shared: AbortReason,
}

/// What a share stream from a peer may hold, known before a byte of it is
/// decoded: its rows, its most columns, and the bytes of text its group
/// keys take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareShape {
    pub rows: usize,
    pub max_cols: usize,
    pub key_bytes: u64,
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

impl std::fmt::Display for PeerRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerRefusal::Ended(r) => write!(f, "the query already ended: {r}"),
            PeerRefusal::Other(m) => f.write_str(m),
        }
    }
}

/// Proves that no local 128-bit sum wrapped: every summand of every sum
/// partial is below its cap (10^26 at most: by the guard, the type, whole
/// squares only of narrow factors, limbs otherwise), so the count alone
/// decides, and only some 10^12 rows in one group could fail it.
#[allow(clippy::needless_range_loop)]
fn check_no_wrap(
    party: &str,
    plan: &FederatedPlan,
    raw: &[Vec<i128>],
    groups: usize,
) -> Result<(), PartyFailure> {
    for p in &plan.local.partials {
        if !p.kind.is_sum() {
            continue;
        }
        let Some(c) = p.count_of_arg else {
            continue;
        };
        let cap = p.summand_cap();
        for g in 0..groups {
            if !sum_cannot_wrap(raw[c][g], cap) {
                return Err(PartyFailure {
                    local: format!("a local sum in group {g} might exceed 128 bits (count {}, |summand| ≤ {cap})", raw[c][g]),
                    shared: AbortReason::new(
                        AbortKind::Data,
                        party,
                        "one of its local sums is too large to compute exactly; narrow the query",
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The post part: final values, then HAVING / ORDER BY / LIMIT / arithmetic
/// by DataFusion on revealed values only.
async fn post_process(
    plan: &FederatedPlan,
    revealed: &Revealed,
) -> Result<(arrow::datatypes::SchemaRef, Vec<RecordBatch>), QueryFailure> {
    let invalid = |e: planner::PlanError| QueryFailure::new(FailureKind::Invalid, e.to_string());
    let batch = revealed_batch(plan, revealed).map_err(invalid)?;
    let logical = post_plan(plan, batch).map_err(invalid)?;
    let ctx = datafusion::prelude::SessionContext::new();
    let df = ctx.execute_logical_plan(logical).await.map_err(|e| {
        QueryFailure::new(
            FailureKind::Invalid,
            planner::plan::clean_df_error(&e.to_string()),
        )
    })?;
    let schema = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await.map_err(|e| {
        QueryFailure::new(
            FailureKind::Invalid,
            planner::plan::clean_df_error(&e.to_string()),
        )
    })?;
    Ok((schema, batches))
}

/// EXPLAIN's answer: one text column, one line per row.
/// Every source of this party, checked against the catalog; every mismatch
/// of every source is reported at once.
async fn open_sources(cfg: &GatewayConfig) -> anyhow::Result<connectors::Sources> {
    use connectors::{Database, DatabaseSource, SourceError};
    let mut sources = connectors::Sources::default();
    let mut problems = Vec::new();
    let mut note = |r: Result<(), SourceError>| -> anyhow::Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(SourceError::Mismatch(p)) => {
                problems.extend(p);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    };
    if !cfg.tables.is_empty() {
        let names: Vec<String> = cfg.tables.iter().map(|t| t.table.name.clone()).collect();
        let r = connectors::FileSource::open(cfg.tables.clone(), cfg.local_partitions)
            .await
            .map(|f| sources.add(Arc::new(f), names));
        note(r)?;
    }
    for (name, db) in &cfg.databases {
        let tables: Vec<connectors::SqlTable> = cfg
            .db_tables
            .iter()
            .filter(|t| &t.source == name)
            .map(|t| t.table.clone())
            .collect();
        if tables.is_empty() {
            continue;
        }
        let names: Vec<String> = tables.iter().map(|t| t.table.name.clone()).collect();
        let database: Arc<dyn Database> = match db {
            crate::config::DatabaseConfig::Postgres(c) => Arc::new(
                connectors::postgres::PostgresDatabase::connect(c)
                    .await
                    .map_err(|e| anyhow::anyhow!("source {name}: {e}"))?,
            ),
            crate::config::DatabaseConfig::Sqlite(path) => Arc::new(
                connectors::sqlite::SqliteDatabase::open(path)
                    .map_err(|e| anyhow::anyhow!("source {name}: {e}"))?,
            ),
            crate::config::DatabaseConfig::FlightSql(c) => Arc::new(
                connectors::flight_sql::FlightSqlDatabase::connect(c)
                    .await
                    .map_err(|e| anyhow::anyhow!("source {name}: {e}"))?,
            ),
        };
        let r = DatabaseSource::open(database, tables, cfg.local_partitions)
            .await
            .map(|s| sources.add(Arc::new(s), names));
        note(r)?;
    }
    if !problems.is_empty() {
        return Err(SourceError::Mismatch(problems).into());
    }
    Ok(sources)
}

pub fn explain_schema() -> arrow::datatypes::SchemaRef {
    Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("plan", arrow::datatypes::DataType::Utf8, false),
    ]))
}

/// The first 16 characters of a fingerprint (which may come from a peer).
fn short(fingerprint: &str) -> String {
    fingerprint.chars().take(16).collect()
}

/// A query's key in the budget ledger.
fn ledger_key(s: &Session) -> String {
    format!("{}/{}", s.leader, s.query_id)
}

fn new_query_id() -> String {
    let mut b = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut b);
    hex::encode(b)
}
