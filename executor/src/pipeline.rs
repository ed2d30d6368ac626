//! A program of several stages, each run by its own engine one after the
//! other over its own columns: the planner picks the engine per stage (a
//! comparison needs the replicated engine, a sum is cheapest additively),
//! and the pipeline is one [`Engine`] to the gateway.
//!
//! Stage `k`'s steps are `k · STAGE_STEPS + s` for its engine's step `s`,
//! so every message still has exactly one sender, length and stage known
//! from the plan before it is decoded ([`Engine::expects`] routes by the
//! step). Stages run in order; a stage reveals to its result party as it
//! ends, and a later stage's failure fails the query, so the analyst gets
//! nothing (the leader's gateway discards what an earlier stage revealed
//! to it; see ARCHITECTURE.md, "A query of several stages").

use arrow::datatypes::i256;

use crate::encode::OutOfRange;
use crate::gate::Gate;
use crate::shares::{ShareColumn, SharedTable, Width};
use crate::transport::{Inbound, Outbound, Step, Transport, TransportError};
use crate::{Engine, ExecError, MessageShape, TableShape};

/// Steps each stage may use.
pub const STAGE_STEPS: u16 = 1024;

/// The first step of a gate: the last range of steps, so that a plan's
/// stages take the same steps with or without a gate (a gate's messages
/// may reach a party that has not yet learned, at `start`, that the plan
/// is gated; their shapes do not depend on the threshold).
pub const GATE_BASE: u16 = (u16::MAX / STAGE_STEPS) * STAGE_STEPS;

/// The engine of a stage in which this party takes no part (a data-less
/// helper in a stage of sums): no message, no result.
pub struct Idle;

#[async_trait::async_trait]
impl Engine for Idle {
    fn name(&self) -> &'static str {
        "idle"
    }
    fn supports(&self, _: &crate::Program) -> Result<(), String> {
        Ok(())
    }
    /// Its input is never used: zeros of the widths' shape.
    fn encode(
        &self,
        values: &[Vec<i256>],
        _widths: &[Width],
    ) -> Result<Vec<ShareColumn>, OutOfRange> {
        Ok(values
            .iter()
            .map(|v| ShareColumn::Z64(vec![0; v.len()]))
            .collect())
    }
    fn expects(&self, _: &str, _: Step, _: &TableShape) -> Option<MessageShape> {
        None
    }
    async fn run(
        &self,
        _: &dyn Transport,
        _: &SharedTable,
    ) -> Result<Option<Vec<Vec<i256>>>, ExecError> {
        Ok(None)
    }
}

/// The stages of one program, with the number of shared columns each
/// takes, after an optional gate (its conditions, one column each, first;
/// its steps from [`GATE_BASE`]).
pub struct Pipeline {
    gate: Option<(Gate, String)>,
    stages: Vec<(Box<dyn Engine>, usize)>,
}

impl Pipeline {
    /// At most `u16::MAX / STAGE_STEPS` stages, each of at least one column.
    pub fn new(stages: Vec<(Box<dyn Engine>, usize)>) -> Result<Self, String> {
        if stages.is_empty() || stages.len() > usize::from(GATE_BASE / STAGE_STEPS) {
            return Err(format!("a program of {} stages", stages.len()));
        }
        if stages.iter().any(|(_, c)| *c == 0) {
            return Err("a stage without columns".into());
        }
        Ok(Pipeline { gate: None, stages })
    }

    /// The stages after `gate`, whose pass bits reach every party, and the
    /// result party `leader` (which also receives them, as a first column).
    pub fn gated(
        gate: Gate,
        leader: &str,
        stages: Vec<(Box<dyn Engine>, usize)>,
    ) -> Result<Self, String> {
        // A gate alone is a program (`SELECT g … GROUP BY g HAVING
        // COUNT(*) >= 5` reveals only which groups pass).
        let mut p = if stages.is_empty() {
            Pipeline { gate: None, stages }
        } else {
            Self::new(stages)?
        };
        p.gate = Some((gate, leader.to_string()));
        Ok(p)
    }

    /// Columns the gate takes before the stages'.
    fn offset(&self) -> usize {
        self.gate.as_ref().map_or(0, |(g, _)| g.bounds.len())
    }

    /// The column range of stage `k`.
    fn columns(&self, k: usize) -> std::ops::Range<usize> {
        let start: usize = self.offset() + self.stages[..k].iter().map(|(_, c)| c).sum::<usize>();
        start..start + self.stages[k].1
    }

    fn total_columns(&self) -> usize {
        self.offset() + self.stages.iter().map(|(_, c)| c).sum::<usize>()
    }
}

/// `table` with every row of a group that did not pass replaced by
/// `neutral` (all limbs zero in the wide rings).
fn withhold(mut table: SharedTable, pass: &[bool], neutral: u64) -> SharedTable {
    for c in &mut table.columns {
        let limbs: Vec<&mut Vec<u64>> = match c {
            ShareColumn::Z64(v) => vec![v],
            ShareColumn::Z128 { lo, hi } => vec![lo, hi],
            ShareColumn::Z256(l) => l.iter_mut().collect(),
        };
        let z64 = limbs.len() == 1;
        for v in limbs {
            for (x, p) in v.iter_mut().zip(pass) {
                if !p {
                    *x = if z64 { neutral } else { 0 };
                }
            }
        }
    }
    table
}

/// A stage's view of the transport: its steps shifted to the stage's range.
struct Shifted<'t> {
    inner: &'t dyn Transport,
    base: u16,
}

impl Shifted<'_> {
    fn step(&self, s: Step) -> Result<Step, TransportError> {
        if s.0 >= STAGE_STEPS {
            return Err(TransportError::Local(format!(
                "a stage used {s}, beyond its {STAGE_STEPS} steps"
            )));
        }
        Ok(Step(self.base + s.0))
    }
}

#[async_trait::async_trait]
impl Transport for Shifted<'_> {
    async fn send(&self, to: &str, step: Step, message: Outbound) -> Result<(), TransportError> {
        let s = self.step(step)?;
        self.inner.send(to, s, message).await
    }
    async fn recv(&self, from: &str, step: Step) -> Result<Inbound, TransportError> {
        let s = self.step(step)?;
        self.inner.recv(from, s).await
    }
}

#[async_trait::async_trait]
impl Engine for Pipeline {
    fn name(&self) -> &'static str {
        "pipeline"
    }

    fn supports(&self, program: &crate::Program) -> Result<(), String> {
        if program.stages.len() != self.stages.len() + usize::from(self.gate.is_some()) {
            return Err(format!(
                "a pipeline of {} stages for a program of {}",
                self.stages.len(),
                program.stages.len()
            ));
        }
        if let Some((gate, _)) = &self.gate {
            let stage = program.stage(0).ok_or("the program has no gate")?;
            Gate::for_program(&stage, &gate.me)?;
        }
        for (k, (engine, _)) in self.stages.iter().enumerate() {
            let stage = program
                .stage(k + usize::from(self.gate.is_some()))
                .ok_or_else(|| format!("the program has no stage {k}"))?;
            engine.supports(&stage)?;
        }
        Ok(())
    }

    fn encode(
        &self,
        values: &[Vec<i256>],
        widths: &[Width],
    ) -> Result<Vec<ShareColumn>, OutOfRange> {
        let mut out = Vec::with_capacity(values.len());
        if let Some((gate, _)) = &self.gate {
            // The gate's columns, as the words it compares.
            out.extend(gate.encode(values.get(..self.offset()).unwrap_or(&[]))?);
        }
        for (k, (engine, _)) in self.stages.iter().enumerate() {
            let r = self.columns(k);
            let (Some(v), Some(w)) = (values.get(r.clone()), widths.get(r.clone())) else {
                return Err(OutOfRange {
                    partial: r.start.min(values.len()),
                    group: 0,
                    value: i256::ZERO,
                    bound: i256::ZERO,
                });
            };
            let encoded = engine.encode(v, w).map_err(|mut o| {
                o.partial += r.start;
                o
            })?;
            out.extend(encoded);
        }
        Ok(out)
    }

    fn expects(&self, from: &str, step: Step, shape: &TableShape) -> Option<MessageShape> {
        if shape.widths.len() != self.total_columns() {
            return None;
        }
        let k = usize::from(step.0 / STAGE_STEPS);
        let sub_step = Step(step.0 % STAGE_STEPS);
        if step.0 >= GATE_BASE {
            let (gate, _) = self.gate.as_ref()?;
            return gate.expects(from, sub_step, shape.rows);
        }
        let (engine, _) = self.stages.get(k)?;
        let sub = TableShape {
            widths: shape.widths.get(self.columns(k))?.to_vec(),
            ..shape.clone()
        };
        engine.expects(from, sub_step, &sub)
    }

    async fn run(
        &self,
        transport: &dyn Transport,
        input: &SharedTable,
    ) -> Result<Option<Vec<Vec<i256>>>, ExecError> {
        if input.columns.len() != self.total_columns() {
            return Err(ExecError::Encode(format!(
                "{} input columns for stages of {}",
                input.columns.len(),
                self.total_columns()
            )));
        }
        // The gate first: every party learns which groups pass, and from
        // then on contributes nothing computed from a group that does not.
        let mut outs: Vec<Option<Vec<Vec<i256>>>> = Vec::new();
        let mut pass: Option<Vec<bool>> = None;
        if let Some((gate, leader)) = &self.gate {
            let words = gate
                .inputs
                .contains(&gate.me)
                .then(|| crate::gate::gate_words(&input.columns[..self.offset()]));
            let shifted = Shifted {
                inner: transport,
                base: GATE_BASE,
            };
            let bits = gate.run(&shifted, words.as_deref(), input.rows).await?;
            outs.push(
                (&gate.me == leader)
                    .then(|| vec![bits.iter().map(|&b| i256::from_i128(b as i128)).collect()]),
            );
            pass = Some(bits);
        }
        for (k, (engine, _)) in self.stages.iter().enumerate() {
            let mut sub = SharedTable {
                keys: input.keys.clone(),
                columns: input.columns[self.columns(k)].to_vec(),
                rows: input.rows,
            };
            if let Some(pass) = &pass {
                sub = withhold(sub, pass, engine.neutral());
            }
            let shifted = Shifted {
                inner: transport,
                base: (k as u16) * STAGE_STEPS,
            };
            outs.push(engine.run(&shifted, &sub).await?);
        }
        // Every stage reveals to the same party (the program's one result
        // party), so either all stages return totals here or none does.
        let revealed = if outs.iter().all(Option::is_none) {
            None
        } else if outs.iter().all(Option::is_some) {
            Some(outs.into_iter().flatten().flatten().collect())
        } else {
            return Err(ExecError::Encode(
                "the stages of one program revealed to different parties".into(),
            ));
        };
        Ok(revealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::program::{Op, Program, Stage};
    use crate::replicated::ReplicatedEngine;
    use crate::transport::InMemoryNetwork;
    use crate::AdditiveEngine;
    use std::time::Duration;

    type ExpectsFn = Box<dyn Fn(&str, Step, &TableShape) -> Option<MessageShape> + Send>;

    trait ExpectsOf {
        fn expects_fn(self) -> ExpectsFn;
    }

    impl<E: Engine + 'static> ExpectsOf for E {
        fn expects_fn(self) -> ExpectsFn {
            Box::new(move |f, s, shape| self.expects(f, s, shape))
        }
    }

    /// A minimum (replicated) then a sum (additive) in one run: each
    /// stage's columns reach its engine, the totals come back in order at
    /// the leader only, and every message a party receives is one its
    /// pipeline expects at that step.
    #[tokio::test]
    async fn a_minimum_then_a_sum_each_by_its_engine() {
        let parties: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let program = Program::with_stages(
            &parties,
            &[],
            "b",
            vec![
                Stage {
                    ops: vec![Op::Min, Op::Reveal],
                    columns: 2,
                    compute: parties.clone(),
                    bounds: Vec::new(),
                },
                Stage {
                    ops: vec![Op::Sum, Op::Reveal],
                    columns: 1,
                    compute: parties.clone(),
                    bounds: Vec::new(),
                },
            ],
        );
        let inputs: [[i64; 3]; 3] = [[5, -7, 100], [3, 9, -40], [8, -2, 1]];
        let net = InMemoryNetwork::connect(&parties, Duration::from_secs(20));
        let mut tasks = Vec::new();
        for ((t, me), x) in net.into_iter().zip(&parties).zip(inputs) {
            let program = program.clone();
            let me = me.clone();
            tasks.push(tokio::spawn(async move {
                let stages: Vec<(Box<dyn Engine>, usize)> = vec![
                    (
                        Box::new(
                            ReplicatedEngine::for_program(&program.stage(0).unwrap(), &me).unwrap(),
                        ),
                        2,
                    ),
                    (
                        Box::new(
                            AdditiveEngine::for_program(&program.stage(1).unwrap(), &me).unwrap(),
                        ),
                        1,
                    ),
                ];
                let p = Pipeline::new(stages).unwrap();
                p.supports(&program).unwrap();
                let shape = TableShape {
                    rows: 1,
                    widths: vec![Width::Z64, Width::Z64, Width::Z128],
                    key_columns: 0,
                    key_bytes: 0,
                };
                // Each stage's steps are its engine's, shifted, over its
                // own columns.
                let alone = [
                    (
                        ReplicatedEngine::for_program(&program.stage(0).unwrap(), &me)
                            .unwrap()
                            .expects_fn(),
                        0..2,
                    ),
                    (
                        AdditiveEngine::for_program(&program.stage(1).unwrap(), &me)
                            .unwrap()
                            .expects_fn(),
                        2..3,
                    ),
                ];
                for (k, (f, cols)) in alone.iter().enumerate() {
                    let sub = TableShape {
                        widths: shape.widths[cols.clone()].to_vec(),
                        ..shape.clone()
                    };
                    for from in ["a", "b", "c"] {
                        for s in 0..64u16 {
                            let at = Step(k as u16 * STAGE_STEPS + s);
                            assert_eq!(p.expects(from, at, &shape), f(from, Step(s), &sub));
                        }
                    }
                }
                assert!(p.expects("a", Step(2 * STAGE_STEPS), &shape).is_none());
                let values: Vec<Vec<i256>> = x
                    .iter()
                    .map(|&v| vec![i256::from_i128(v as i128)])
                    .collect();
                let columns = p.encode(&values, &shape.widths).unwrap();
                let input = SharedTable {
                    keys: vec![],
                    columns,
                    rows: 1,
                };
                p.run(&t, &input).await.unwrap()
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        let w = |v: i128| vec![i256::from_i128(v)];
        assert_eq!(out[1], Some(vec![w(3), w(-7), w(61)]));
        assert_eq!((&out[0], &out[2]), (&None, &None));
    }

    #[test]
    fn a_stage_without_columns_or_no_stage_is_refused() {
        let a = || -> Box<dyn Engine> {
            Box::new(AdditiveEngine::new(
                vec!["a".into()],
                "a".into(),
                "a".into(),
            ))
        };
        assert!(Pipeline::new(vec![]).is_err());
        assert!(Pipeline::new(vec![(a(), 0)]).is_err());
        assert!(Pipeline::new(vec![(a(), 1)]).is_ok());
    }

    /// Records every message sent: (from, to, step, rows).
    struct Recording {
        inner: crate::transport::InMemoryTransport,
        me: String,
        log: std::sync::Arc<std::sync::Mutex<Vec<(String, String, Step, usize)>>>,
    }

    #[async_trait::async_trait]
    impl Transport for Recording {
        async fn send(&self, to: &str, step: Step, m: Outbound) -> Result<(), TransportError> {
            self.log
                .lock()
                .unwrap()
                .push((self.me.clone(), to.to_string(), step, m.rows));
            self.inner.send(to, step, m).await
        }
        async fn recv(&self, from: &str, step: Step) -> Result<Inbound, TransportError> {
            self.inner.recv(from, step).await
        }
    }

    /// A minimum group size of 5 before a minimum and a sum, with three
    /// parties and with five (two of them outside the compute parties),
    /// alone and with HAVING's bounds on every party's sum (at least 250,
    /// at most 1000: a lower bound and a negated column): every party
    /// learns the same pass bits, the result party receives them first,
    /// and for a group that fails it receives nothing computed from its
    /// rows (a sum of 0, a minimum of NO_VALUE) even where some party has
    /// rows there; every message sent is one its receiver expects, and
    /// every expected one is sent.
    #[tokio::test]
    async fn a_gate_withholds_every_group_below_the_minimum() {
        use crate::gate::Gate;
        use crate::program::Bound;
        use crate::replicated::NO_VALUE;
        for (n, having) in [(3usize, false), (5, false), (3, true), (5, true)] {
            let mut bounds = vec![Bound {
                at_least: 5,
                result_party: false,
            }];
            if having {
                bounds.push(Bound {
                    at_least: 250,
                    result_party: true,
                });
                bounds.push(Bound {
                    at_least: -1000,
                    result_party: true,
                });
            }
            let c = bounds.len();
            let parties: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
            let leader = parties[n - 1].clone();
            let compute: Vec<String> = parties[..3].to_vec();
            let program = Program::with_stages(
                &parties,
                &[],
                &leader,
                vec![
                    Stage {
                        ops: vec![Op::Pass, Op::Reveal],
                        columns: c,
                        compute: compute.clone(),
                        bounds: bounds.clone(),
                    },
                    Stage {
                        ops: vec![Op::Min, Op::Reveal],
                        columns: 1,
                        compute: compute.clone(),
                        bounds: Vec::new(),
                    },
                    Stage {
                        ops: vec![Op::Sum, Op::Reveal],
                        columns: 1,
                        compute: parties.clone(),
                        bounds: Vec::new(),
                    },
                ],
            );
            // Rows per party and group (the leader, last, does not count):
            // group 0 has 2 per party (4 at three parties: fails; 8 at
            // five: passes), group 1 has 3 per party (passes), group 2 has
            // 4 at p0 only (fails), group 3 has 9 at the leader only (fails:
            // its own rows do not count), group 4 none (fails).
            let rows = move |p: usize, g: usize| -> u64 {
                match g {
                    0 => 2,
                    1 => 3,
                    2 => u64::from(p == 0) * 4,
                    3 => u64::from(p == n - 1) * 9,
                    _ => 0,
                }
            };
            let groups = 5;
            let mut widths = vec![Width::Z64; c];
            widths.extend([Width::Z64, Width::Z128]);
            let shape = TableShape {
                rows: groups,
                widths,
                key_columns: 0,
                key_bytes: 0,
            };
            let build = |me: &str| -> Pipeline {
                let stage = |k: usize| program.stage(k).unwrap();
                let gate = Gate::for_program(&stage(0), me).unwrap();
                let rep: Box<dyn Engine> =
                    Box::new(ReplicatedEngine::for_program(&stage(1), me).unwrap());
                let add: Box<dyn Engine> =
                    Box::new(AdditiveEngine::for_program(&stage(2), me).unwrap());
                let p = Pipeline::gated(gate, &leader, vec![(rep, 1), (add, 1)]).unwrap();
                p.supports(&program).unwrap();
                p
            };
            let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let net = InMemoryNetwork::connect(&parties, Duration::from_secs(20));
            let mut tasks = Vec::new();
            for (i, t) in net.into_iter().enumerate() {
                let me = parties[i].clone();
                let p = build(&me);
                let log = log.clone();
                let shape = shape.clone();
                tasks.push(tokio::spawn(async move {
                    let w = |v: i128| i256::from_i128(v);
                    let counts: Vec<i256> = (0..groups).map(|g| w(rows(i, g) as i128)).collect();
                    let least: Vec<i256> = (0..groups)
                        .map(|g| {
                            if rows(i, g) > 0 {
                                w(10 * g as i128 - i as i128)
                            } else {
                                w(NO_VALUE as i128)
                            }
                        })
                        .collect();
                    let sums: Vec<i256> =
                        (0..groups).map(|g| w(rows(i, g) as i128 * 100)).collect();
                    let mut values = vec![counts];
                    if having {
                        values.push(sums.clone());
                        values.push(sums.iter().map(|&v| -v).collect());
                    }
                    values.extend([least, sums]);
                    let columns = p.encode(&values, &shape.widths).unwrap();
                    let t = Recording {
                        inner: t,
                        me: me.clone(),
                        log,
                    };
                    p.run(
                        &t,
                        &SharedTable {
                            keys: vec![],
                            columns,
                            rows: groups,
                        },
                    )
                    .await
                    .unwrap()
                }));
            }
            let mut outs = Vec::new();
            for t in tasks {
                outs.push(t.await.unwrap());
            }
            for (i, o) in outs.iter().enumerate() {
                assert_eq!(
                    o.is_some(),
                    i == n - 1,
                    "{n} parties: only the leader learns"
                );
            }
            let got = outs[n - 1].clone().unwrap();
            // The result party's own rows do not count towards the minimum.
            let total = |g: usize| (0..n - 1).map(|p| rows(p, g)).sum::<u64>();
            let all = |g: usize| (0..n).map(|p| rows(p, g)).sum::<u64>();
            let passes =
                |g: usize| total(g) >= 5 && (!having || (250..=1000).contains(&(all(g) * 100)));
            assert_eq!(
                (0..groups).filter(|&g| passes(g)).count(),
                if n == 3 || having { 1 } else { 2 },
                "both outcomes are exercised"
            );
            for g in 0..groups {
                let passes = passes(g);
                assert_eq!(
                    got[0][g],
                    i256::from_i128(passes as i128),
                    "{n}: pass bit of {g}"
                );
                let (want_min, want_sum) = if passes {
                    let least = (0..n)
                        .filter(|&p| rows(p, g) > 0)
                        .map(|p| 10 * g as i128 - p as i128)
                        .min()
                        .unwrap();
                    (least, all(g) as i128 * 100)
                } else {
                    (NO_VALUE as i128, 0)
                };
                assert_eq!(got[1][g], i256::from_i128(want_min), "{n}: min of {g}");
                assert_eq!(got[2][g], i256::from_i128(want_sum), "{n}: sum of {g}");
            }
            let log = log.lock().unwrap().clone();
            for (from, to, step, rows) in &log {
                let expected = build(to).expects(from, *step, &shape);
                assert_eq!(
                    expected.map(|s| s.rows),
                    Some(*rows),
                    "{n}: {from} → {to} at {step}"
                );
            }
            for to in &parties {
                let receiver = build(to);
                for from in &parties {
                    for base in [GATE_BASE, 0, STAGE_STEPS, 2 * STAGE_STEPS] {
                        for s in 0..64u16 {
                            let step = Step(base + s);
                            if receiver.expects(from, step, &shape).is_some() {
                                assert!(
                                    log.iter()
                                        .any(|(f, t, st, _)| f == from && t == to && *st == step),
                                    "{n}: {to} expects {from}'s {step}, never sent"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
