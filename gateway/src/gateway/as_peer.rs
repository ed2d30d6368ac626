//! A party's path when another gateway leads the query: the handlers of
//! the peer service, in the order the messages arrive.
//!
//! `propose` (plan it here, decide with this party's own policy; an allowed
//! query becomes [`Agreed`] and its local part starts) → `start` (check the
//! leader's DP parameters, charge, [`Agreed::start`] → `Running` in its own
//! task) → shares (routed to the query's mailbox by its state) → the task
//! ends the query ([`Running::end`]). An `abort` ends an agreed query at
//! once and stops a running one.

use std::sync::Arc;
use std::time::Instant;

use executor::transport::Delivery;
use executor::{AbortKind, AbortReason, MessageShape, Step};
use planner::privacy::DpParams;
use policies::{AuditEntry, Decision};

use super::{short, table_shape, Gateway, ShareShape};
use crate::config::Fault;
use crate::peer::{Propose, QueryRef, Start, Verdict};
use crate::session::{
    Agreed, Agreement, Full, Key, PartyFailure, PeerRefusal, Phases, Query, Running,
};

/// The longest query id a leader may choose.
const MAX_QUERY_ID: usize = 64;

impl Gateway {
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
        if p.query_id.len() > MAX_QUERY_ID {
            return Verdict::Error {
                message: format!("a query id has at most {MAX_QUERY_ID} characters"),
            };
        }
        let plan = match self.plan(&p.sql, &p.options, from).await {
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
        let verdict = if self.is_helper() {
            self.policy.check_as_helper(&p.analyst)
        } else {
            self.policy.check(&plan, &p.analyst)
        };
        let decision = match verdict {
            Decision::Allow => self.own_requirement(&plan, &p.analyst),
            Decision::Deny { rule, reason } => Err((rule, reason)),
        };
        let requirement = match decision {
            Err((rule, reason)) => {
                entry.decision = "deny".into();
                entry.rule = Some(rule.clone());
                entry.outcome = Some(reason.clone());
                self.audit(entry);
                return Verdict::Deny { rule, reason };
            }
            Ok(requirement) => requirement,
        };
        entry.decision = "allow".into();
        let fingerprint = plan.fingerprint.clone();
        if p.explain_only {
            entry.event = "explain".into();
            self.audit(entry);
            return Verdict::Allow {
                fingerprint,
                source: if self.is_helper() {
                    vec!["a data-less helper: no local part, it computes only on shares".into()]
                } else {
                    self.source.explain(&plan.local).await
                },
                privacy: requirement,
                min_group_size: self.own_min_group_size(),
            };
        }
        let query = Query::new(from, &p.query_id, &p.analyst, self.timeout, phases);
        let agreed = Agreed::new(query, plan, requirement.clone());
        let (admitted, expired) = self.sessions.admit(agreed, |q, plan, spent| {
            self.prepare(q.clone(), plan.clone(), spent.clone())
        });
        for ended in expired {
            self.finish(ended);
        }
        if let Err((full, _)) = admitted {
            let message = match full {
                Full::TooMany { from_leader } => format!(
                    "peer {} has too many open queries ({from_leader} from {from}); try again when some have ended",
                    self.party
                ),
                Full::Duplicate => format!("query id {} is already in use", p.query_id),
                Full::Ended(reason) => {
                    format!("query {} already ended here: {reason}", p.query_id)
                }
            };
            entry.decision = "error".into();
            entry.outcome = Some(message.clone());
            self.audit(entry);
            return Verdict::Error { message };
        }
        self.audit(entry);
        Verdict::Allow {
            fingerprint,
            source: Vec::new(),
            privacy: requirement,
            min_group_size: self.own_min_group_size(),
        }
    }

    /// `start` from the leader: the agreed query runs in its own task.
    ///
    /// With differential privacy, `start` carries the parameters the leader
    /// merged from every party's requirement: this party checks them
    /// against its own, derives the DP plan itself (the fingerprint must
    /// match the leader's) and charges its budget before anything of the
    /// query can leave it.
    pub fn on_start(self: &Arc<Self>, from: &str, start: Start) -> Result<(), PeerRefusal> {
        let key: Key = (from.to_string(), start.query_id.clone());
        let agreed = match self.sessions.take_for_start(&key) {
            Ok(a) => a,
            Err((refusal, ended)) => {
                if let Some(ended) = ended {
                    self.finish(ended);
                }
                return Err(refusal);
            }
        };
        let agreement = match self.adopt_privacy(
            &agreed,
            start.privacy,
            start.fingerprint.as_deref(),
            start.threshold,
        ) {
            Ok(a) => a,
            Err(e) => {
                let reason = AbortReason::new(AbortKind::Other, &self.party, e.clone());
                self.sessions.close(&key, &reason);
                self.finish(agreed.end(format!("not run: {e}")));
                return Err(PeerRefusal::Ended(reason));
            }
        };
        if let Some(reason) = agreed.query.mailbox.aborted() {
            // Stopped while `start` was checked: it ends here, and a charge
            // just made is refunded (nothing of this party ran).
            self.sessions.close(&key, &reason);
            let mut ended = agreed.end(format!("not run: {reason}"));
            if let Agreement::UnderDp {
                charge: Some(charge),
                ..
            } = agreement
            {
                ended.settled = Some(crate::session::Settled {
                    charge,
                    kept: false,
                });
            }
            self.finish(ended);
            return Err(PeerRefusal::Ended(reason));
        }
        let running = agreed.start(agreement, |q, plan, spent| {
            self.prepare(q.clone(), plan.clone(), spent.clone())
        });
        self.sessions.run(&running);
        if self.fault == Some(Fault::SilentAfterStart) {
            // Plays dead right after accepting `start`: the query stays
            // open here and the others time out.
            tokio::spawn(async move {
                let _running = running;
                std::future::pending::<()>().await;
            });
            return Ok(());
        }
        let me = self.clone();
        tokio::spawn(async move { me.follow(running).await });
        Ok(())
    }

    /// A started query at a peer, to its end: its part of the secure sum
    /// (the leader alone receives the result shares).
    async fn follow(self: Arc<Self>, mut running: Running) {
        let key = running.query.key();
        // A panic in the computation ends the query like any failure (its
        // entry must not stay in the table, nor its charge unsettled).
        let computed = {
            use futures::FutureExt;
            std::panic::AssertUnwindSafe(self.compute(&mut running))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    Err(PartyFailure {
                        local: "the computation panicked".into(),
                        shared: AbortReason::new(AbortKind::Other, &self.party, "internal error"),
                    })
                })
        };
        let outcome = match computed {
            Ok(_) => {
                self.sessions.close(
                    &key,
                    &AbortReason::new(
                        AbortKind::Other,
                        &self.party,
                        "it had already sent its result share",
                    ),
                );
                "shares sent".to_string()
            }
            Err(f) => {
                eprintln!("[{}] query {} failed: {}", self.party, key.1, f.local);
                self.sessions.close(&key, &f.shared);
                running.query.mailbox.abort(&f.shared);
                self.abort_peers(&key.0, &key.1, &f.shared).await;
                format!("aborted: {}", f.local)
            }
        };
        self.finish(running.end(outcome));
    }

    /// Checks the leader's DP parameters against this party's requirement
    /// and derives the DP plan; charges the ledger if this party's own
    /// policy required DP.
    fn adopt_privacy(
        &self,
        agreed: &Agreed,
        params: Option<DpParams>,
        fingerprint: Option<&str>,
        threshold: u64,
    ) -> Result<Agreement, String> {
        let refuse = |m: String| format!("{} refused: {m}", self.party);
        let differs = |plan: &planner::FederatedPlan| {
            refuse(format!(
                "the leader's plan differs from the one computed here ({} vs {})",
                short(fingerprint.unwrap_or("none")),
                short(&plan.fingerprint)
            ))
        };
        // The started plan must enforce this party's minimum group size
        // (and may rely on the honest-majority model only if it accepts
        // it).
        // A helper holds no rows: its policy decides only whom it serves.
        let threshold_ok = |plan: &planner::FederatedPlan| match self.is_helper() {
            true => Ok(()),
            false => match self.policy.check_threshold(plan) {
                Decision::Allow => Ok(()),
                Decision::Deny { rule, reason } => {
                    Err(refuse(format!("{reason} (policy: {rule})")))
                }
            },
        };
        let params = match (params, &agreed.requirement) {
            (None, None) => {
                let plan = (*agreed.plan).clone();
                if threshold == 0 {
                    threshold_ok(&plan)?;
                    return Ok(Agreement::AsPlanned);
                }
                let plan = plan.with_threshold(threshold).map_err(|e| refuse(e.to_string()))?;
                if fingerprint != Some(plan.fingerprint.as_str()) {
                    return Err(differs(&plan));
                }
                threshold_ok(&plan)?;
                return Ok(Agreement::Thresholded { plan });
            }
            (None, Some(_)) => {
                return Err(refuse(
                    "its policy requires differential privacy for this query, and the leader started it without \
                     (policy: privacy)"
                        .into(),
                ))
            }
            (Some(p), req) => {
                if let Some(r) = req {
                    p.satisfies(r, self.parties.len()).map_err(|e| {
                        refuse(format!(
                            "the query's privacy parameters fall short: {e} (policy: privacy)"
                        ))
                    })?;
                } else if self.own_min_group_size() > 0 {
                    // Under another party's DP the threshold would apply
                    // to noised counts at the leader, after every group's
                    // totals were revealed to it with noise this party did
                    // not choose (an ε of its choosing): refused.
                    return Err(refuse(format!(
                        "its policy requires groups of at least {} rows, enforced in shares without DP, and the \
                         query was started under another party's DP, which would apply it to noised counts \
                         with noise this party did not set (policy: results.min_group_size)",
                        self.own_min_group_size()
                    )));
                }
                p
            }
        };
        let plan = (*agreed.plan)
            .clone()
            .with_privacy(params.clone())
            .map_err(|e| refuse(e.to_string()))?;
        if fingerprint != Some(plan.fingerprint.as_str()) {
            return Err(differs(&plan));
        }
        threshold_ok(&plan)?;
        let charge = self.charge(agreed.requirement.is_some(), &agreed.query, &plan, &params)?;
        Ok(Agreement::UnderDp { plan, charge })
    }

    /// The minimum group size this party states in its verdict (a helper
    /// holds no rows to protect).
    pub(super) fn own_min_group_size(&self) -> u64 {
        if self.is_helper() {
            0
        } else {
            self.policy.min_group_size
        }
    }

    /// `abort` from any party of the query.
    pub fn on_abort(&self, from: &str, r: &QueryRef) {
        let leader = if r.leader.is_empty() {
            from
        } else {
            r.leader.as_str()
        };
        // Only for a query a party of this federation can lead, with an id
        // such a query can have: anything else names no query here.
        if !self.parties.iter().any(|p| p == from)
            || !self.parties.iter().any(|p| p == leader)
            || r.query_id.len() > MAX_QUERY_ID
        {
            return;
        }
        let key = (leader.to_string(), r.query_id.clone());
        // A started query ends in its own task, which sees the abort.
        if let Some(ended) = self.sessions.abort(&key, from, &r.reason) {
            self.finish(ended);
        }
    }

    /// Opens `from`'s message at `step` of a query this party holds, if
    /// the query's engine says `from` may send it now, with the shape it
    /// may have, before a byte of it is decoded. A second message for the
    /// same step is refused here.
    pub fn open_share(
        &self,
        from: &str,
        leader: &str,
        query_id: &str,
        step: Step,
    ) -> Result<(Delivery, ShareShape), PeerRefusal> {
        let (mailbox, shape) = self.route(from, leader, query_id, step)?;
        let delivery = mailbox.open(from, step)?;
        Ok((
            delivery,
            ShareShape {
                rows: shape.rows,
                max_cols: shape.max_cols,
                key_bytes: shape.key_bytes,
            },
        ))
    }

    /// Where `from`'s message at `step` goes and what it may hold, if
    /// `from` may send it now: the engine of the query's plan decides
    /// which messages exist, from whom, to whom, and whether they may
    /// precede `start`.
    fn route(
        &self,
        from: &str,
        leader: &str,
        query_id: &str,
        step: Step,
    ) -> Result<(Arc<executor::transport::Mailbox>, MessageShape), PeerRefusal> {
        if !self.parties.iter().any(|p| p == from) {
            return Err(PeerRefusal::Other(format!(
                "{from} is not a party of this federation"
            )));
        }
        let route = self
            .sessions
            .route(&(leader.to_string(), query_id.to_string()))?;
        // Before `start` this party does not know yet whether the plan
        // that starts has a gate (a minimum group size that some party's
        // verdict asked for): a gate's message, in its own range of steps,
        // is checked against the gated plan (its shapes do not depend on
        // the threshold). Once started, the started plan decides.
        let gated;
        let plan =
            if !route.started && step.0 >= executor::pipeline::GATE_BASE && !route.plan.gated() {
                gated = (*route.plan)
                    .clone()
                    .with_threshold(1)
                    .map_err(|e| PeerRefusal::Other(e.to_string()))?;
                &gated
            } else {
                &*route.plan
            };
        let engine = self.engine_for(plan, None).map_err(PeerRefusal::Other)?;
        let Some(shape) = engine.expects(from, step, &table_shape(plan)) else {
            return Err(PeerRefusal::Other(format!(
                "the {} engine has no {step} message from {from} to {} in query {query_id}",
                engine.name(),
                self.party
            )));
        };
        if !shape.before_start && !route.started {
            return Err(PeerRefusal::Other(format!(
                "{from} sent its {step} message for query {query_id} before {} started it",
                self.party
            )));
        }
        Ok((route.mailbox, shape))
    }

    /// Ends the query whose share from a peer was malformed.
    /// An agreed query ends at once (before anything is charged); a
    /// running one stops in its own task.
    pub fn reject_share(&self, leader: &str, query_id: &str, reason: &str) {
        let reason = AbortReason::new(AbortKind::Protocol, &self.party, reason);
        let key = (leader.to_string(), query_id.to_string());
        if let Some(ended) = self.sessions.abort(&key, &self.party, &reason) {
            self.finish(ended);
        }
    }
}
