//! The analyst-facing API that both front doors (Flight SQL, PostgreSQL)
//! adapt: authenticate, answer a statement, describe its answer, list the
//! tables. Whether a statement is EXPLAIN, the DP annotation of an answer
//! and its notice, and the kind of every failure are decided here once; a
//! door only speaks its wire protocol (a gRPC status, a SQLSTATE).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::SchemaRef;
use planner::QueryOptions;
use policies::Analyst;
use sha2::{Digest, Sha256};

use super::{
    explain_schema, FailureKind, Gateway, QueryFailure, LOGIN_QUEUE, LOGIN_WAIT,
    MAX_STATEMENTS_PER_ANALYST,
};
use crate::config::AnalystCredential;

/// A statement's answer as an analyst receives it.
pub struct Answer {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    /// Under differential privacy: what noise the answer carries, one
    /// paragraph (the doors show it as a notice or beside the rows).
    pub notice: Option<String>,
}

impl Gateway {
    /// Answers one statement for an authenticated analyst of this party:
    /// EXPLAIN's text as one line per row, or the query's answer with,
    /// under DP, each noised column's distribution in its field metadata
    /// and a notice.
    pub async fn answer(
        self: &Arc<Self>,
        analyst: &Analyst,
        sql: &str,
    ) -> Result<Answer, QueryFailure> {
        let internal = |e: arrow::error::ArrowError| QueryFailure {
            kind: FailureKind::Internal,
            message: e.to_string(),
        };
        let (explain, inner) = planner::split_explain(sql);
        if explain {
            // A query counts itself (`run_query`); an EXPLAIN keeps nothing
            // at the peers and counts while it runs.
            let _slot = self.admit_statement(analyst)?;
            let text = self
                .explain(analyst, inner, &QueryOptions::default())
                .await?;
            let schema = explain_schema();
            let lines: Vec<&str> = text.lines().collect();
            let batch =
                RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(lines))])
                    .map_err(internal)?;
            return Ok(Answer {
                schema,
                batches: vec![batch],
                notice: None,
            });
        }
        let a = self
            .run_query(analyst, sql, &QueryOptions::default())
            .await?;
        let (schema, batches) =
            crate::dp::annotate(a.schema, a.batches, a.privacy.as_deref(), &a.noise)
                .map_err(internal)?;
        let notice = crate::dp::footer(&schema);
        Ok(Answer {
            schema,
            batches,
            notice,
        })
    }

    /// Counts a statement of `analyst` as running until the returned slot
    /// drops, or refuses it if they already have as many running as one
    /// analyst may. A query's slot goes with the query's state
    /// (`as_leader::Lead`): it is freed only once the peers were told to
    /// drop the query, so cancelling and resubmitting cannot hold more
    /// sessions open at the peers than the bound.
    pub(super) fn admit_statement(
        self: &Arc<Self>,
        analyst: &Analyst,
    ) -> Result<StatementSlot, QueryFailure> {
        let who = analyst.to_string();
        let mut running = self.statements.lock().unwrap_or_else(|p| p.into_inner());
        let n = running.entry(who.clone()).or_insert(0);
        if *n >= MAX_STATEMENTS_PER_ANALYST {
            return Err(QueryFailure {
                kind: FailureKind::Busy,
                message: format!(
                    "{analyst} already has {MAX_STATEMENTS_PER_ANALYST} statements running at {}, \
                     the most one analyst may; wait for one to finish",
                    self.party
                ),
            });
        }
        *n += 1;
        Ok(StatementSlot {
            gw: self.clone(),
            who,
        })
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
            .tables()
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
            .plan(sql, &QueryOptions::default(), &self.party)
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

/// One running statement of one analyst: counted while it lives.
pub(super) struct StatementSlot {
    gw: Arc<Gateway>,
    who: String,
}

impl Drop for StatementSlot {
    fn drop(&mut self) {
        let mut running = self.gw.statements.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = running.get_mut(&self.who) {
            *n -= 1;
            if *n == 0 {
                running.remove(&self.who);
            }
        }
    }
}
