//! What every party runs once a query started, whichever path it is on:
//! the local part over this party's rows, its encoding as ring elements
//! (and under DP its noise), the engine's secure sum, and at the leader the
//! post part over the revealed totals.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use arrow::datatypes::i256;
use executor::encode::{dense_partials, sum_cannot_wrap};
use executor::pipeline::Idle;
use executor::{
    AbortKind, AbortReason, AdditiveEngine, Engine, GroupIndex, Pipeline, ReplicatedEngine,
    SharedTable,
};
use planner::finalize::{post_plan, revealed_batch, Revealed};
use planner::privacy::Noise;
use planner::FederatedPlan;

use super::{share_widths, FailureKind, Gateway, QueryFailure};
use crate::config::Fault;
use crate::peer::QueryTransport;
use crate::session::{Input, PartyFailure, Prepared, Query, Running, Spent};

impl Gateway {
    /// Starts this party's local part and encoding in the background. Only
    /// called once this party allowed the query; nothing leaves the party
    /// until the secure sum, which waits for the leader's `start`.
    pub(super) fn prepare(
        self: &Arc<Self>,
        query: Arc<Query>,
        plan: Arc<FederatedPlan>,
        spent: Spent,
    ) -> Prepared {
        let me = self.clone();
        tokio::spawn(async move { me.local_input(&query, &plan, &spent).await })
    }

    /// This party's share of the work: its prepared input, then the secure
    /// sum. Returns the revealed totals at the leader.
    pub(super) async fn compute(
        &self,
        running: &mut Running,
    ) -> Result<Option<Revealed>, PartyFailure> {
        let input = match running.prepared.take() {
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
            None => {
                self.local_input(&running.query, &running.plan, &running.spent)
                    .await?
            }
        };
        self.secure_sum(running, &input.table).await
    }

    /// The local part over this party's data, as ring elements per group.
    async fn local_input(
        &self,
        s: &Query,
        plan: &FederatedPlan,
        spent: &Spent,
    ) -> Result<Input, PartyFailure> {
        let t = Instant::now();
        let mine = |m: String| PartyFailure {
            shared: AbortReason::new(AbortKind::Data, &self.party, m.clone()),
            local: m,
        };
        // From here on, how the query ends may depend on this party's rows
        // (a source that fails, a value out of the declared domain, a sum
        // too large for the ring): under DP its charge is kept, whatever
        // happens next.
        if plan.privacy.is_some() {
            spent.local_ran.store(true, Ordering::SeqCst);
        }
        // A helper holds no data: its input is that of a party without
        // rows (no engine reads it; the helper inputs nothing).
        let batches = if self.is_helper() {
            Vec::new()
        } else {
            self.source
                .run(&plan.local)
                .await
                .map_err(|e| PartyFailure {
                    local: e.to_string(),
                    shared: AbortReason::new(
                        AbortKind::Data,
                        &self.party,
                        "its local part failed (details in its gateway log)",
                    ),
                })?
        };
        s.phases.span("local part", t);
        let t = Instant::now();
        let keys = if plan.grouped {
            plan.groups.key_arrays()
        } else {
            Vec::new()
        };
        let index = GroupIndex::new(keys.clone()).map_err(|e| mine(e.to_string()))?;
        let folds: Vec<_> = plan.local.partials.iter().map(|p| p.kind.fold()).collect();
        let dense = dense_partials(&batches, &index, &folds).map_err(|e| PartyFailure {
            local: e.to_string(),
            shared: AbortReason::new(
                AbortKind::Data,
                &self.party,
                "its local data does not fit the declared catalog (details in its gateway log)",
            ),
        })?;
        // The local answer is in the dense partials now; at 10^6 groups each
        // copy is tens of MiB, so none is kept past its use.
        drop(batches);
        if dense.outside > 0 {
            // For this party's operator only: how many of its rows keep the
            // catalog is a fact about its data, never sent anywhere.
            eprintln!(
                "[{}] query {}: {} local group(s) have a key outside the catalog's declared domain and were left out; \
                 add the value to the domain or fix the data",
                self.party,
                s.id,
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
        // A gate's columns: this party's partial, or its negation for an
        // upper bound of HAVING (beyond the gate's exact range, a value
        // that makes the condition pass: `GateColumn::value`).
        let gate = plan.gate_columns();
        let gate_values: Vec<Vec<i256>> = gate
            .iter()
            .map(|c| dense[c.partial].iter().map(|&v| c.value(v)).collect())
            .collect();
        let rows = index.len();
        drop((dense, index));
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
        let shared: Vec<Vec<i256>> = gate_values.into_iter().chain(shared).collect();
        let column_partials: Vec<usize> = gate
            .iter()
            .map(|c| c.partial)
            .chain(shared_idx.iter().copied())
            .collect();
        let engine = self
            .engine_for(plan, None)
            .map_err(|e| mine(format!("no engine runs this query: {e}")))?;
        let ring = engine.encode(&shared, &widths).map_err(|o| {
            // The engine names the column; an index it should never give
            // is reported, not indexed.
            let p = column_partials
                .get(o.partial)
                .and_then(|&i| plan.local.partials.get(i));
            PartyFailure {
                local: format!(
                    "partial {:?} of {:?} in group {} is {} and exceeds the per-party bound ±{} of the ring with {} parties",
                    p.map(|p| p.kind),
                    p.and_then(|p| p.arg.as_ref()).map(|a| a.to_string()),
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

    /// The engine that runs `plan` at this party: the one place an engine
    /// is picked, per stage of the plan's program (which the fingerprint
    /// covers): a stage that compares by the replicated engine, a sum by
    /// the additive engine (or the one the options name); a program of
    /// several stages as a [`Pipeline`]. Each engine checks that it
    /// supports its stage. With `spent`, the additive engine marks the
    /// point from which a DP charge is kept (DP plans have one stage).
    pub(super) fn engine_for(
        &self,
        plan: &FederatedPlan,
        spent: Option<&Spent>,
    ) -> Result<Box<dyn Engine>, String> {
        let program = &plan.program;
        // Every set-up and input of a comparison carries the plan's
        // fingerprint: parties started on different plans stop.
        let bind = executor::rep3::bind_of(&plan.fingerprint);
        let mut stages: Vec<(Box<dyn Engine>, usize)> = Vec::new();
        // A minimum group size: a gate before the stages (every party takes
        // part, as compute or input party).
        let gate = match program.stages.first() {
            Some(s) if s.gate().is_some() => {
                let one = program.stage(0).ok_or("the program has no gate")?;
                let mut gate = executor::gate::Gate::for_program(&one, &self.party)?;
                gate.bind = bind;
                Some(gate)
            }
            _ => None,
        };
        for (k, stage) in program.stages.iter().enumerate() {
            if k == 0 && gate.is_some() {
                continue;
            }
            let one = program
                .stage(k)
                .ok_or_else(|| format!("the program has no stage {k}"))?;
            // A party outside a stage (a helper among sums, or a stage of
            // comparisons whose inputs and compute parties it is not) has
            // no message in it.
            let takes_part = stage.compute.contains(&self.party)
                || (stage.compares() && program.roles_of(&self.party).input);
            let engine: Box<dyn Engine> = if !takes_part {
                Box::new(Idle)
            } else if stage.compares() {
                let mut e = ReplicatedEngine::for_program(&one, &self.party)?;
                e.bind = bind;
                Box::new(e)
            } else {
                match plan.options.engine {
                    planner::plan::Engine::Additive => {
                        let mut e = AdditiveEngine::for_program(&one, &self.party)?;
                        e.reveal_point = spent.map(|s| s.reveal_point.clone());
                        Box::new(e)
                    }
                }
            };
            stages.push((engine, stage.columns));
        }
        if plan.privacy.is_some() && (stages.len() != 1 || gate.is_some()) {
            return Err("a differentially private plan of several stages".into());
        }
        if let Some(gate) = gate {
            return Ok(Box::new(Pipeline::gated(
                gate,
                &program.result_party(),
                stages,
            )?));
        }
        if stages.len() == 1 {
            return stages
                .pop()
                .map(|(e, _)| e)
                .ok_or_else(|| "a program without stages".into());
        }
        Ok(Box::new(Pipeline::new(stages)?))
    }

    /// The secure sum of every party's input; the totals at the leader.
    async fn secure_sum(
        &self,
        running: &Running,
        input: &SharedTable,
    ) -> Result<Option<Revealed>, PartyFailure> {
        let t = Instant::now();
        let (s, plan) = (&running.query, &running.plan);
        let shared_idx = plan.shared_partials();
        let transport = QueryTransport {
            me: self.party.clone(),
            header_leader: s.leader.clone(),
            query_id: s.id.clone(),
            clients: self.clients.clone(),
            mailbox: s.mailbox.clone(),
            fault: self.fault,
        };
        if self.fault == Some(Fault::SilentBeforeShares) {
            // Play dead: the others must time out, abort, and reveal nothing.
            std::future::pending::<()>().await;
        }
        let engine = self
            .engine_for(plan, Some(&running.spent))
            .map_err(|e| PartyFailure {
                local: format!("no engine runs this query: {e}"),
                shared: AbortReason::new(AbortKind::Other, &self.party, e),
            })?;
        let out = engine
            .run(&transport, input)
            .await
            .map_err(|e| PartyFailure {
                local: e.to_string(),
                shared: self.reason_of(&e),
            })?;
        s.phases.span("secure sum", t);
        let Some(cols) = out else {
            return Ok(None);
        };
        let skip = usize::from(plan.gated());
        if cols.len() != shared_idx.len() + skip {
            return Err(PartyFailure {
                local: format!(
                    "{} totals for {} shared partials and {skip} gate",
                    cols.len(),
                    shared_idx.len()
                ),
                shared: AbortReason::new(AbortKind::Other, &self.party, "internal error"),
            });
        }
        let mut totals = vec![Vec::new(); plan.local.partials.len()];
        let mut wide = std::collections::BTreeMap::new();
        // A gate's pass bits come first, in place of its columns.
        let passing = plan.gated().then(|| {
            cols[0]
                .iter()
                .map(|v| *v == i256::ONE)
                .collect::<Vec<bool>>()
        });
        for (col, &i) in cols.iter().skip(skip).zip(&shared_idx) {
            let col = col.clone();
            if plan.ring_bits(i) > 128 {
                wide.insert(i, col);
            } else {
                // A total of a ring of at most 128 bits fits i128.
                totals[i] = col.iter().map(|v| v.as_i128()).collect();
            }
        }
        Ok(Some(Revealed {
            totals,
            wide,
            passing,
        }))
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
pub(super) async fn post_process(
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
