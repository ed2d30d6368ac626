//! One party's gateway: its catalog, policy, data, audit log and peers.
//!
//! The life of a query is in three child modules, each read top to bottom
//! in the order of ARCHITECTURE.md's "a query's path":
//!
//! - [`as_leader`]: the querying gateway's path (plan → own policy →
//!   `propose` → agree → `start` → secure sum → reveal → post part);
//! - [`as_peer`]: the path of a party asked by a leader (`propose` →
//!   `start` → shares → `abort`), the message handlers of the peer service;
//! - [`compute`]: what both paths run once started (the local part, its
//!   encoding and noise, the engine, the post part).
//!
//! [`analyst`] is what the front doors adapt: authentication, a statement's
//! answer (EXPLAIN told from a query, the DP annotation), its schema, the
//! tables an analyst may see.
//!
//! The states a query goes through are the types of [`crate::session`].
//! Any failure before the reveal aborts every party and reveals nothing.

mod analyst;
mod as_leader;
mod as_peer;
mod compute;
#[cfg(test)]
mod tests;

pub use analyst::Answer;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use connectors::LocalSource;
use executor::{AbortKind, AbortReason, TransportError, Width};
use planner::privacy::{DpParams, Requirement};
use planner::{plan_query, Catalog, FederatedPlan, QueryOptions};
use policies::{Analyst, AuditEntry, AuditLog, Ledger, Policy};
use sha2::{Digest, Sha256};

use crate::config::{AnalystCredential, Fault, GatewayConfig};
use crate::network::PeerNetwork;
use crate::peer::{PeerAction, PeerClients, QueryRef};
use crate::session::{Charge, Ended, Sessions, SESSION_TTL};
pub use crate::session::{PeerRefusal, MAX_SESSIONS, MAX_SESSIONS_PER_LEADER};

/// Password checks that may run at once (argon2id takes 19 MiB and a core).
pub const LOGIN_SLOTS: usize = 2;
/// How long a login waits for a free slot before it is turned away.
pub const LOGIN_WAIT: Duration = Duration::from_secs(30);
/// Logins that may wait for a slot; more are turned away at once.
pub const LOGIN_QUEUE: usize = 256;

/// Statements (queries and EXPLAINs, through either door) one analyst may
/// have running at once at this gateway. Peers bound what each leader may
/// open there (`MAX_SESSIONS_PER_LEADER`); this bounds what one login may
/// open here, so that one login cannot take every slot of their own
/// gateway at the peers. Half the per-leader bound: a BI tool's pool of
/// connections under one service login keeps well within it (the load
/// test runs about 17 at once per gateway).
pub const MAX_STATEMENTS_PER_ANALYST: usize = MAX_SESSIONS_PER_LEADER / 2;

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
    /// The analyst already has as many statements running here as one
    /// analyst may ([`MAX_STATEMENTS_PER_ANALYST`]); nothing was asked.
    Busy,
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
pub struct Gateway {
    pub party: String,
    /// Every party of the federation, sorted; the order shares are dealt in.
    pub parties: Vec<String>,
    pub peers: BTreeMap<String, String>,
    /// The federation's data-less helper parties (this one may be one).
    helpers: Vec<String>,
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
    pub(crate) clients: Arc<dyn PeerNetwork>,
    /// Statements running now, per analyst (`MAX_STATEMENTS_PER_ANALYST`).
    statements: Mutex<HashMap<String, usize>>,
    /// The queries open here, by state, and why the last ones ended (a late
    /// `start` or share then learns why, instead of "no agreed query").
    sessions: Sessions,
    pub(crate) timeout: Duration,
    fault: Option<Fault>,
    log_queries: bool,
}

impl Gateway {
    /// The gateway of `cfg`, reaching its peers over gRPC and mutual TLS.
    pub async fn new(cfg: &GatewayConfig) -> anyhow::Result<Arc<Self>> {
        let clients =
            PeerClients::new(&cfg.peers, cfg.tls.peer_client_config()?, cfg.peer_timeout)?;
        Self::with_network(cfg, Arc::new(clients)).await
    }

    /// The gateway of `cfg`, reaching its peers through `network` (an
    /// in-memory one in tests: `crate::network::MemoryHub`).
    pub async fn with_network(
        cfg: &GatewayConfig,
        network: Arc<dyn PeerNetwork>,
    ) -> anyhow::Result<Arc<Self>> {
        Self::build(cfg, network, SESSION_TTL).await
    }

    async fn build(
        cfg: &GatewayConfig,
        network: Arc<dyn PeerNetwork>,
        session_ttl: Duration,
    ) -> anyhow::Result<Arc<Self>> {
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
        let mut parties: Vec<String> = cfg.peers.keys().cloned().collect();
        parties.push(cfg.party.clone());
        parties.sort();
        let gw = Arc::new(Gateway {
            party: cfg.party.clone(),
            parties,
            peers: cfg.peers.clone(),
            helpers: cfg.helpers.clone(),
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
            clients: network,
            statements: Mutex::new(HashMap::new()),
            sessions: Sessions::new(&cfg.party, session_ttl),
            timeout: cfg.peer_timeout,
            fault: cfg.fault,
            log_queries: cfg.log_queries,
        });
        // Agreed queries that are never started expire even when no new
        // proposal arrives to sweep them.
        let weak = Arc::downgrade(&gw);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(session_ttl / 10);
            loop {
                tick.tick().await;
                let Some(gw) = weak.upgrade() else { return };
                for ended in gw.sessions.expire() {
                    gw.finish(ended);
                }
            }
        });
        Ok(gw)
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Queries this party holds a session for (agreed and not yet ended).
    pub fn open_sessions(&self) -> usize {
        self.sessions.len()
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

    /// Plans a query that `leader` asked, as this party computes it.
    async fn plan(
        &self,
        sql: &str,
        options: &QueryOptions,
        leader: &str,
    ) -> Result<FederatedPlan, planner::PlanError> {
        plan_query(sql, &self.catalog, &self.parties, options)
            .await?
            .among(&self.helpers)?
            .led_by(leader)
    }

    /// Whether this party is a data-less helper: it runs no local part and
    /// its policy only decides whom it serves.
    pub(crate) fn is_helper(&self) -> bool {
        self.helpers.contains(&self.party)
    }

    /// Records a query that ended here: settles its DP charge (kept or
    /// refunded) and writes its outcome to the audit log.
    fn finish(&self, ended: Ended) {
        let Ended {
            query,
            plan,
            mut outcome,
            settled,
        } = ended;
        if let (Some(s), Some(ledger)) = (settled, &self.ledger) {
            let r = if s.kept {
                ledger.mark_spent(&s.charge.ledger_key)
            } else {
                ledger.refund(&s.charge.ledger_key).map(|_| ())
            };
            if let Err(e) = r {
                eprintln!("[{}] BUDGET LEDGER UPDATE FAILED: {e}", self.party);
            }
            // The audit log records what the query cost here.
            let eps = planner::privacy::epsilon_text(s.charge.epsilon_micro);
            outcome.push_str(&if s.kept {
                format!("; privacy budget charged: ε = {eps}")
            } else {
                format!("; privacy budget refunded: ε = {eps}")
            });
        }
        if self.log_queries {
            let id: String = query.id.chars().take(8).collect();
            eprintln!(
                "[{}] timing {id} (ms): {}",
                self.party,
                query.phases.summary()
            );
        }
        self.audit(AuditEntry {
            event: "outcome".into(),
            query_id: query.id.clone(),
            leader: query.leader.clone(),
            analyst: query.analyst.to_string(),
            sql: plan.sql.clone(),
            decision: "-".into(),
            fingerprint: Some(plan.fingerprint.clone()),
            outcome: Some(outcome),
            ..Default::default()
        });
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
    /// be revealed; refuses if the budget does not cover it. Only a party
    /// whose own policy required DP charges its ledger.
    fn charge(
        &self,
        required: bool,
        query: &crate::session::Query,
        plan: &FederatedPlan,
        params: &DpParams,
    ) -> Result<Option<Charge>, String> {
        let (true, Some(ledger), Some(pp)) = (required, &self.ledger, &self.policy.privacy) else {
            return Ok(None);
        };
        let key = query.ledger_key();
        ledger
            .charge(
                &key,
                &query.analyst.to_string(),
                params.epsilon_micro,
                params.delta,
                &pp.budget,
                self.policy.party_budget(&query.analyst.party).as_ref(),
                policies::ledger::now_unix(),
                &plan.sql,
            )
            .map_err(|e| format!("{} refused: {e} (policy: privacy.budget)", self.party))?;
        Ok(Some(Charge {
            ledger_key: key,
            epsilon_micro: params.epsilon_micro,
        }))
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
            TransportError::Local(_) => {
                AbortReason::new(AbortKind::Other, &self.party, e.to_string())
            }
        }
    }
}

/// The ring of each shared partial, in `shared_partials` order.
fn share_widths(plan: &FederatedPlan) -> Vec<Width> {
    // A gate's columns (64-bit words) come first.
    let gate = plan.gate_columns().len();
    std::iter::repeat_n(Width::Z64, gate)
        .chain(
            plan.shared_partials()
                .iter()
                .map(|&i| match plan.ring_bits(i) {
                    64 => Width::Z64,
                    128 => Width::Z128,
                    _ => Width::Z256,
                }),
        )
        .collect()
}

/// The public shape of `plan`'s shared input, which every engine's
/// messages follow.
fn table_shape(plan: &FederatedPlan) -> executor::TableShape {
    executor::TableShape {
        rows: if plan.grouped { plan.groups.len() } else { 1 },
        widths: share_widths(plan),
        key_columns: plan.groups.columns.len(),
        key_bytes: if plan.grouped {
            plan.groups.key_text_bytes()
        } else {
            0
        },
    }
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

/// EXPLAIN's answer: one text column, one line per row.
pub fn explain_schema() -> arrow::datatypes::SchemaRef {
    Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("plan", arrow::datatypes::DataType::Utf8, false),
    ]))
}

/// The first 16 characters of a fingerprint (which may come from a peer).
fn short(fingerprint: &str) -> String {
    fingerprint.chars().take(16).collect()
}

fn new_query_id() -> String {
    let mut b = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut b);
    hex::encode(b)
}
