//! The querying gateway's path, top to bottom: [`Gateway::run_query`]
//! plans the query and decides with this party's own policy, proposes it to
//! every peer (each plans and decides for itself), checks that every party
//! allowed the same plan, agrees the DP parameters and charges, sends
//! `start` together with its own part of the secure sum, adds the result
//! shares and runs the post part over the revealed totals.
//!
//! From its own `allow` on, the query is owned by a [`Lead`]: the analyst's
//! request holds it, and dropping the request (a disconnect, a cancel) ends
//! the query at every party and settles this party's charge, as any other
//! failure would.

use std::sync::Arc;
use std::time::Instant;

use executor::{AbortKind, AbortReason, TransportError};
use planner::privacy::{DpParams, Requirement};
use planner::{FederatedPlan, QueryOptions};
use policies::{Analyst, AuditEntry, Decision};

use super::analyst::StatementSlot;
use super::compute::post_process;
use super::{new_query_id, short, FailureKind, Gateway, QueryAnswer, QueryFailure};
use crate::peer::{PeerAction, Propose, Start, Verdict};
use crate::session::{Agreed, Agreement, Open, PartyFailure, Phases, Query, Running};

/// A query as the leader asks for it.
#[derive(Clone, Copy)]
struct Ask<'a> {
    query_id: &'a str,
    sql: &'a str,
    analyst: &'a Analyst,
    options: &'a QueryOptions,
    explain_only: bool,
}

impl Gateway {
    /// Runs a query for an authenticated analyst of this party.
    pub async fn run_query(
        self: &Arc<Self>,
        analyst: &Analyst,
        sql: &str,
        options: &QueryOptions,
    ) -> Result<QueryAnswer, QueryFailure> {
        let slot = self.admit_statement(analyst)?;
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
        let requirement: Option<Requirement> = match &own {
            Verdict::Allow { privacy, .. } => privacy.clone(),
            _ => None,
        };
        // Our own policy allowed it: start our local part now, while the
        // peers decide (nothing leaves this party before the secure sum).
        // Under DP the local part waits for the agreed clamps and bounds.
        let query = Query::new(&self.party, &query_id, analyst, self.timeout, phases);
        let mut agreed = Agreed::new(query.clone(), plan, requirement);
        agreed.prepare(|q, plan, spent| self.prepare(q.clone(), plan.clone(), spent.clone()));
        let agreed = Lead::new(self.clone(), agreed, slot);

        let verdicts = match self
            .ask_peers(&ask, &agreed.state().plan, own, &query.phases)
            .await
        {
            Ok(v) => v,
            Err(f) => {
                self.finish(agreed.into_inner().end(format!("not run: {}", f.message)));
                return Err(f);
            }
        };
        let (agreement, privacy, threshold) = match self.agree_privacy(agreed.state(), &verdicts) {
            Ok(a) => a,
            Err(f) => {
                let (agreed, _slot) = agreed.into_parts();
                self.finish(agreed.end(format!("not run: {}", f.message)));
                self.abort_peers(
                    &self.party,
                    &query_id,
                    &AbortReason::new(AbortKind::Other, &self.party, f.message.clone()),
                )
                .await;
                return Err(f);
            }
        };
        let mut running = agreed.map(|a| {
            a.start(agreement, |q, plan, spent| {
                self.prepare(q.clone(), plan.clone(), spent.clone())
            })
        });
        // Open for the peers' shares before any of them can start.
        self.sessions.run(running.state());
        let start = Start {
            query_id: query_id.clone(),
            fingerprint: (privacy.is_some() || threshold > 0)
                .then(|| running.state().plan.fingerprint.clone()),
            privacy,
            threshold,
        };

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
                query.mailbox.abort(e);
            }
            query.phases.span("start", t);
            failed
        };
        let (failed_start, result) = tokio::join!(starts, self.compute(running.state_mut()));
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
                return Err(self.fail(running, f).await);
            }
            Err(f) => return Err(self.fail(running, f).await),
        };
        let t = Instant::now();
        let plan = running.state().plan.clone();
        let batches = post_process(&plan, &revealed).await;
        query.phases.span("post part", t);
        self.sessions.close(
            &query.key(),
            &AbortReason::new(
                AbortKind::Other,
                &self.party,
                "its result was already revealed",
            ),
        );
        self.finish(running.into_inner().end("revealed to analyst"));
        let (schema, batches) = batches?;
        Ok(QueryAnswer {
            schema,
            batches,
            fingerprint: plan.fingerprint.clone(),
            noise: planner::finalize::noise_report(&plan),
            privacy: plan.privacy.as_ref().map(crate::dp::summary),
        })
    }

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
            .plan(sql, options, &self.party)
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
                min_group_size: self.own_min_group_size(),
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

    /// The largest minimum group size of any party (from its verdict).
    fn merged_threshold(verdicts: &[(String, Verdict)]) -> u64 {
        verdicts
            .iter()
            .filter_map(|(_, v)| match v {
                Verdict::Allow { min_group_size, .. } => Some(*min_group_size),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// The plan every party's verdict calls for: under the merged DP
    /// parameters (their minimum group size at least every party's, on
    /// noised counts), or without DP with the largest minimum group size
    /// enforced in shares; checked against this party's own policy.
    fn agreed_plan(
        &self,
        plan: &FederatedPlan,
        verdicts: &[(String, Verdict)],
    ) -> Result<(FederatedPlan, Option<DpParams>, u64), String> {
        let k = Self::merged_threshold(verdicts);
        let (plan, params, threshold) = match self.merged_privacy(verdicts)? {
            Some(_)
                if verdicts.iter().any(|(_, v)| {
                    matches!(v, Verdict::Allow { privacy: None, min_group_size, .. } if *min_group_size > 0)
                }) =>
            {
                // A party that requires a minimum group size without DP of
                // its own does not accept it on noised counts under
                // another party's DP (as_peer::adopt_privacy).
                return Err(
                    "one party requires differential privacy and another a minimum group size without it; \
                     Council runs a query under one or the other (policy: results.min_group_size)"
                        .into(),
                );
            }
            Some(mut params) => {
                params.min_group_size = params.min_group_size.max(k);
                let p = plan
                    .clone()
                    .with_privacy(params.clone())
                    .map_err(|e| e.to_string())?;
                (p, Some(params), 0)
            }
            None if k > 0 => (
                plan.clone().with_threshold(k).map_err(|e| e.to_string())?,
                None,
                k,
            ),
            None => (plan.clone(), None, 0),
        };
        match self.policy.check_threshold(&plan) {
            Decision::Allow => Ok((plan, params, threshold)),
            Decision::Deny { rule, reason } => {
                Err(format!("{} refused: {reason} (policy: {rule})", self.party))
            }
        }
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

    /// Once every party allowed: the merged DP parameters, the DP plan and
    /// the charge to this party's ledger (the local part is then prepared
    /// again under the agreed clamps and bounds, by [`Agreed::start`]).
    fn agree_privacy(
        &self,
        agreed: &Agreed,
        verdicts: &[(String, Verdict)],
    ) -> Result<(Agreement, Option<DpParams>, u64), QueryFailure> {
        let refused = |m: String| QueryFailure::new(FailureKind::Refused, m);
        let (plan, params, threshold) = self.agreed_plan(&agreed.plan, verdicts).map_err(|e| {
            refused(format!(
                "the parties' requirements cannot be met together: {e}"
            ))
        })?;
        let Some(params) = params else {
            if threshold == 0 {
                return Ok((Agreement::AsPlanned, None, 0));
            }
            return Ok((Agreement::Thresholded { plan }, None, threshold));
        };
        let charge = self
            .charge(agreed.requirement.is_some(), &agreed.query, &plan, &params)
            .map_err(refused)?;
        Ok((Agreement::UnderDp { plan, charge }, Some(params), 0))
    }

    /// The query failed before its reveal: it ends here first (audit,
    /// charge), then at every other party.
    async fn fail(&self, running: Lead<Running>, f: PartyFailure) -> QueryFailure {
        // The analyst's slot is freed once the peers were told.
        let (running, _slot) = running.into_parts();
        let query = running.query.clone();
        self.sessions.close(&query.key(), &f.shared);
        query.mailbox.abort(&f.shared);
        self.finish(running.end(format!("aborted: {}", f.local)));
        self.abort_peers(&query.leader, &query.id, &f.shared).await;
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
        let (plan, problem) = match self.agreed_plan(&plan, &verdicts) {
            Ok((p, _, _)) => (p, None),
            Err(e) => (plan, Some(e)),
        };
        let mut s = plan.explain(&self.party);
        if let Some(e) = problem {
            s.push_str(&format!(
                "The parties' requirements (differential privacy, minimum group size) cannot be met together: {e}\n"
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
                    min_group_size,
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
                    let dp = if min_group_size > 0 {
                        format!("{dp}; requires groups of at least {min_group_size} rows")
                    } else {
                        dp
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
}

/// The leader's query in state `S`, owned by the analyst's request. Its
/// transitions consume it; dropped while open (the request was dropped:
/// the analyst cancelled or disconnected), it ends the query at every
/// party and settles this party's charge, as any other failure would.
struct Lead<S: Open> {
    gw: Arc<Gateway>,
    /// `Some` until a consuming method or `drop` takes it.
    state: Option<S>,
    /// The analyst's statement slot, held until the query ended everywhere.
    slot: Option<StatementSlot>,
}

impl<S: Open> Lead<S> {
    fn new(gw: Arc<Gateway>, state: S, slot: StatementSlot) -> Self {
        Lead {
            gw,
            state: Some(state),
            slot: Some(slot),
        }
    }

    fn state(&self) -> &S {
        // Only `into_inner`, `map` and `drop` take the state, and each
        // consumes the `Lead`.
        self.state.as_ref().expect("a Lead holds its state")
    }

    fn state_mut(&mut self) -> &mut S {
        self.state.as_mut().expect("a Lead holds its state")
    }

    /// The state, for its owner to end: no cancel.
    fn into_inner(self) -> S {
        self.into_parts().0
    }

    /// The state and the analyst's slot, for an owner that still tells the
    /// peers to drop the query before the slot is freed.
    fn into_parts(mut self) -> (S, Option<StatementSlot>) {
        let state = self.state.take().expect("a Lead holds its state");
        (state, self.slot.take())
    }

    /// A transition: the new state is owned the same way.
    fn map<T: Open>(mut self, f: impl FnOnce(S) -> T) -> Lead<T> {
        let state = self.state.take().expect("a Lead holds its state");
        Lead {
            gw: self.gw.clone(),
            state: Some(f(state)),
            slot: self.slot.take(),
        }
    }
}

impl<S: Open> Drop for Lead<S> {
    fn drop(&mut self) {
        let Some(state) = self.state.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let gw = self.gw.clone();
        // Dropped while unwinding: the leader's own path panicked, which is
        // neither the analyst's doing nor a fact to tell the peers.
        let (reason, outcome) = if std::thread::panicking() {
            (
                AbortReason::new(AbortKind::Other, &gw.party, "internal error"),
                "aborted: the leader's path panicked (internal error)",
            )
        } else {
            (
                AbortReason::new(AbortKind::Cancelled, &gw.party, "the analyst disconnected"),
                "cancelled by the analyst",
            )
        };
        let slot = self.slot.take();
        rt.spawn(async move {
            let _slot = slot;
            let query = state.query().clone();
            gw.sessions.close(&query.key(), &reason);
            query.mailbox.abort(&reason);
            gw.finish(state.end(outcome.into()));
            gw.abort_peers(&query.leader, &query.id, &reason).await;
        });
    }
}
