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
use crate::shares::{ShareColumn, SharedTable, Width};
use crate::transport::{Inbound, Outbound, Step, Transport, TransportError};
use crate::{Engine, ExecError, MessageShape, TableShape};

/// Steps each stage may use.
pub const STAGE_STEPS: u16 = 1024;

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

/// The stages of one program, with the number of shared columns each takes.
pub struct Pipeline {
    stages: Vec<(Box<dyn Engine>, usize)>,
}

impl Pipeline {
    /// At most `u16::MAX / STAGE_STEPS` stages, each of at least one column.
    pub fn new(stages: Vec<(Box<dyn Engine>, usize)>) -> Result<Self, String> {
        if stages.is_empty() || stages.len() > usize::from(u16::MAX / STAGE_STEPS) {
            return Err(format!("a program of {} stages", stages.len()));
        }
        if stages.iter().any(|(_, c)| *c == 0) {
            return Err("a stage without columns".into());
        }
        Ok(Pipeline { stages })
    }

    /// The column range of stage `k`.
    fn columns(&self, k: usize) -> std::ops::Range<usize> {
        let start: usize = self.stages[..k].iter().map(|(_, c)| c).sum();
        start..start + self.stages[k].1
    }

    fn total_columns(&self) -> usize {
        self.stages.iter().map(|(_, c)| c).sum()
    }
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
        if program.stages.len() != self.stages.len() {
            return Err(format!(
                "a pipeline of {} stages for a program of {}",
                self.stages.len(),
                program.stages.len()
            ));
        }
        for (k, (engine, _)) in self.stages.iter().enumerate() {
            let stage = program
                .stage(k)
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
        let (engine, _) = self.stages.get(k)?;
        let sub = TableShape {
            widths: shape.widths.get(self.columns(k))?.to_vec(),
            ..shape.clone()
        };
        engine.expects(from, Step(step.0 % STAGE_STEPS), &sub)
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
        let mut revealed: Option<Vec<Vec<i256>>> = None;
        for (k, (engine, _)) in self.stages.iter().enumerate() {
            let sub = SharedTable {
                keys: input.keys.clone(),
                columns: input.columns[self.columns(k)].to_vec(),
                rows: input.rows,
            };
            let shifted = Shifted {
                inner: transport,
                base: (k as u16) * STAGE_STEPS,
            };
            let out = engine.run(&shifted, &sub).await?;
            // Every stage reveals to the same party (the program's one
            // result party), so either all stages return totals here or
            // none does.
            match (k, out, &mut revealed) {
                (0, Some(cols), r) => *r = Some(cols),
                (0, None, _) => {}
                (_, Some(cols), Some(r)) => r.extend(cols),
                (_, None, None) => {}
                _ => {
                    return Err(ExecError::Encode(
                        "the stages of one program revealed to different parties".into(),
                    ))
                }
            }
        }
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
                },
                Stage {
                    ops: vec![Op::Sum, Op::Reveal],
                    columns: 1,
                    compute: parties.clone(),
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
}
