//! Engine 2 (first operators): the smallest or largest of three compute
//! parties' values per group, revealed to one of them, over
//! [`crate::rep3`]. **Semi-honest, honest majority**: if all three follow
//! the protocol, no single party learns anything but the revealed extremes
//! (and what they imply with its own values; it does not learn which party
//! held them). A compute party that *deviates* (adds an error of its
//! choice to a product) can change what is revealed in ways that leak more
//! than the extremes, not only make them wrong: this engine must not be
//! offered against a malicious peer until its results are checked
//! (malicious security is future work, as for the additive engine's
//! correctness). No plan uses it yet (issue 13: the planner's MIN/MAX,
//! more than three parties and a helper party come next); it is here so
//! that the trait, the message shapes and the steps are exercised by a
//! second engine.
//!
//! Steps: 0 set-up (each party's PRG seed to the previous party, 4
//! words), 1 to 3 the inputs of parties 0, 1 and 2 (each sends the other
//! two their pairs), then the tournament's rounds (from the next party
//! only), then the reveal (from the party after the result party).

use arrow::datatypes::i256;

use crate::encode::OutOfRange;
use crate::program::{Op, Program};
use crate::rep3::{Arith, Rep3};
use crate::shares::{ShareColumn, SharedTable, Width};
use crate::transport::{Step, Transport};
use crate::{Engine, ExecError, MessageShape, TableShape};

/// The largest magnitude a compared value may have (comparisons read the
/// sign of a difference in Z_2^64).
pub const COMPARE_BOUND: i64 = (1 << 62) - 1;

/// What a party inputs to a minimum for a group where it has no value:
/// above every value a plan lets through (the planner keeps them below
/// 10^18 in magnitude), so it wins only where no party has a value, and
/// then stands for NULL.
pub const NO_VALUE: i64 = COMPARE_BOUND;

/// A party's input to [`crate::Op::Min`] from its dense extremes
/// ([`crate::encode::Fold::Min`], or with `max` [`crate::encode::Fold::Max`],
/// whose values are negated: the largest value is the negated least of the
/// negated values). A group without a value becomes [`NO_VALUE`]; a value
/// beyond ±(2^62 − 1) stays as it is, for [`ReplicatedEngine::encode`] to
/// refuse.
pub fn min_input(dense: &[i128], max: bool) -> Vec<i256> {
    dense
        .iter()
        .map(|&v| match (v, max) {
            (i128::MAX, false) | (i128::MIN, true) => i256::from_i128(NO_VALUE as i128),
            (v, false) => i256::from_i128(v),
            (v, true) => i256::from_i128(v).wrapping_neg(),
        })
        .collect()
}

/// The revealed minimum back to the value it stands for: `None` where no
/// party had a value (SQL's NULL).
pub fn min_output(revealed: i256, max: bool) -> Option<i128> {
    let v = revealed.to_i128()?;
    if v == NO_VALUE as i128 {
        None
    } else if max {
        Some(-v)
    } else {
        Some(v)
    }
}

#[derive(Debug)]
pub struct ReplicatedEngine {
    /// The three compute parties, in the agreed (sorted) order.
    pub parties: [String; 3],
    pub me: String,
    pub leader: String,
    /// Largest rather than smallest.
    pub max: bool,
}

/// The words each round of a two-way comparison-and-select layer of `m`
/// rows carries, in order: `a2b` (the carry-save AND, the generate AND,
/// five prefix levels of two ANDs, the last level's one), `bit_to_arith`
/// (two products), `select` (one product). Mirrors `Rep3::extreme`; a test
/// checks every message of a run against it.
fn layer_rounds(m: usize) -> [usize; 11] {
    [m, m, 2 * m, 2 * m, 2 * m, 2 * m, 2 * m, m, m, m, m]
}

impl ReplicatedEngine {
    pub fn for_program(program: &Program, me: &str) -> Result<Self, String> {
        let parties: Vec<String> = program.roles.keys().cloned().collect();
        let parties: [String; 3] = parties.try_into().map_err(|p: Vec<String>| {
            format!(
                "the replicated engine runs on exactly three parties, not {}",
                p.len()
            )
        })?;
        let e = ReplicatedEngine {
            parties,
            me: me.to_string(),
            leader: program
                .with(|r| r.result)
                .first()
                .cloned()
                .unwrap_or_default(),
            max: program.single().first() == Some(&Op::Max),
        };
        e.supports(program)?;
        Ok(e)
    }

    fn index(&self, p: &str) -> Option<usize> {
        self.parties.iter().position(|q| q == p)
    }

    /// The steps of the tournament and of the reveal, for `n` shared
    /// values: (first tournament step, words per tournament step, reveal
    /// step).
    fn schedule(n: usize) -> (u16, Vec<usize>, u16) {
        // Three columns: a layer of one pair, then a layer of one pair
        // (the winner against the third).
        let rounds: Vec<usize> = (0..2).flat_map(|_| layer_rounds(n)).collect();
        let first = 4;
        let reveal = first + rounds.len() as u16;
        (first, rounds, reveal)
    }
}

#[async_trait::async_trait]
impl Engine for ReplicatedEngine {
    fn name(&self) -> &'static str {
        "replicated"
    }

    fn supports(&self, program: &Program) -> Result<(), String> {
        if program.single() != [Op::Min, Op::Reveal] && program.single() != [Op::Max, Op::Reveal] {
            return Err(format!(
                "the replicated engine runs a min or a max and then a reveal, not {}",
                program.describe()
            ));
        }
        if program.roles.len() != 3 {
            return Err(format!(
                "the replicated engine runs on exactly three parties, not {}",
                program.roles.len()
            ));
        }
        if let Some((p, _)) = program.roles.iter().find(|(_, r)| !(r.input && r.compute)) {
            return Err(format!(
                "the replicated engine needs each of its three parties to contribute input and compute; {p} does not"
            ));
        }
        if program.with(|r| r.result).len() != 1 {
            return Err("the replicated engine reveals to exactly one party".into());
        }
        Ok(())
    }

    /// Each value within ±(2^62 − 1), as Z_2^64 words.
    fn encode(
        &self,
        values: &[Vec<i256>],
        _widths: &[Width],
    ) -> Result<Vec<ShareColumn>, OutOfRange> {
        let bound = i256::from_i128(COMPARE_BOUND as i128);
        values
            .iter()
            .enumerate()
            .map(|(k, col)| {
                col.iter()
                    .enumerate()
                    .map(|(g, v)| match v.to_i128() {
                        Some(x) if x.unsigned_abs() <= COMPARE_BOUND as u128 => Ok(x as i64 as u64),
                        _ => Err(OutOfRange {
                            partial: k,
                            group: g,
                            value: *v,
                            bound,
                        }),
                    })
                    .collect::<Result<Vec<u64>, _>>()
                    .map(ShareColumn::Z64)
            })
            .collect()
    }

    fn expects(&self, from: &str, step: Step, shape: &TableShape) -> Option<MessageShape> {
        let (me, sender) = (self.index(&self.me)?, self.index(from)?);
        if me == sender {
            return None;
        }
        let n = shape.rows.checked_mul(shape.widths.len())?;
        if n == 0 || n > usize::MAX / 4 {
            return None;
        }
        let words = |rows: usize, before_start: bool| MessageShape {
            rows,
            max_cols: 1,
            key_bytes: 0,
            before_start,
        };
        let next = (me + 1) % 3;
        let (first, rounds, reveal) = Self::schedule(n);
        match step.0 {
            0 if sender == next => Some(words(4, true)),
            // Party 0's input may reach a party that has not started yet;
            // parties 1 and 2 send theirs only after hearing from both
            // receivers, which had started by then.
            1..=3 if sender == usize::from(step.0 - 1) => Some(words(2 * n, step.0 == 1)),
            s if (first..reveal).contains(&s) && sender == next => {
                Some(words(rounds[usize::from(s - first)], false))
            }
            s if s == reveal && self.me == self.leader && sender == next => Some(words(n, false)),
            _ => None,
        }
    }

    async fn run(
        &self,
        transport: &dyn Transport,
        input: &SharedTable,
    ) -> Result<Option<Vec<Vec<i256>>>, ExecError> {
        let me = self
            .index(&self.me)
            .ok_or_else(|| ExecError::Encode(format!("{} is not a compute party", self.me)))?;
        let leader = self
            .index(&self.leader)
            .ok_or_else(|| ExecError::Encode(format!("{} is not a compute party", self.leader)))?;
        let (rows, cols) = (input.rows, input.columns.len());
        let n = rows * cols;
        if n == 0 {
            return Err(ExecError::Encode(
                "the replicated engine needs at least one group and one column".into(),
            ));
        }
        // This party's columns, one after another.
        let mut mine = Vec::with_capacity(n);
        for c in &input.columns {
            match c {
                ShareColumn::Z64(v) if v.len() == rows => mine.extend_from_slice(v),
                _ => {
                    return Err(ExecError::Encode(
                        "the replicated engine takes Z_2^64 columns".into(),
                    ))
                }
            }
        }
        let mut r = Rep3::setup(transport, self.parties.clone(), &self.me, Step(0)).await?;
        let mut shared: Vec<Arith> = Vec::with_capacity(3);
        for owner in 0..3 {
            shared.push(
                r.input(owner, (owner == me).then_some(&mine[..]), n)
                    .await?,
            );
        }
        let extreme = r.extreme(shared, self.max).await?;
        let Some(words) = r.reveal_to(&extreme, leader).await? else {
            return Ok(None);
        };
        Ok(Some(
            words
                .chunks(rows.max(1))
                .take(cols)
                .map(|c| {
                    c.iter()
                        .map(|&w| i256::from_i128(w as i64 as i128))
                        .collect()
                })
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{InMemoryNetwork, InMemoryTransport, Outbound};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// Records every message sent: (from, to, step, rows).
    struct Recording {
        inner: InMemoryTransport,
        me: String,
        log: Arc<Mutex<Vec<(String, String, Step, usize)>>>,
    }

    #[async_trait::async_trait]
    impl Transport for Recording {
        async fn send(
            &self,
            to: &str,
            step: Step,
            message: Outbound,
        ) -> Result<(), crate::TransportError> {
            self.log
                .lock()
                .unwrap()
                .push((self.me.clone(), to.to_string(), step, message.rows));
            self.inner.send(to, step, message).await
        }
        async fn recv(
            &self,
            from: &str,
            step: Step,
        ) -> Result<crate::Inbound, crate::TransportError> {
            self.inner.recv(from, step).await
        }
    }

    fn program(op: Op, leader: &str) -> Program {
        let ps: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let mut p = Program::sum_and_reveal(&ps, leader);
        p.stages[0].ops = vec![op, Op::Reveal];
        p
    }

    /// The extremes of three parties' columns equal plaintext, only the
    /// result party learns them, and every message sent is one the
    /// receiver's engine expects at that step, with exactly those rows.
    #[tokio::test]
    async fn min_and_max_of_three_parties_match_plaintext_and_the_schedule() {
        for rows in [1usize, 9] {
            let values = |party: usize, col: usize, g: usize| -> i64 {
                match (party, g) {
                    (_, 0) => 0,
                    (0, 1) => COMPARE_BOUND,
                    (1, 1) => -COMPARE_BOUND,
                    (_, 2) => 7, // a tie everywhere
                    _ => ((g * 31 + party * 17 + col * 5) as i64 % 23) - 11,
                }
            };
            for op in [Op::Min, Op::Max] {
                let prog = program(op, "b");
                let ps: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
                let log = Arc::new(Mutex::new(Vec::new()));
                let net = InMemoryNetwork::connect(&ps, Duration::from_secs(20));
                let mut tasks = Vec::new();
                for (i, t) in net.into_iter().enumerate() {
                    let (prog, log, me) = (prog.clone(), log.clone(), ps[i].clone());
                    tasks.push(tokio::spawn(async move {
                        let e = ReplicatedEngine::for_program(&prog, &me).unwrap();
                        let cols: Vec<Vec<i256>> = (0..2)
                            .map(|c| {
                                (0..rows)
                                    .map(|g| i256::from_i128(values(i, c, g) as i128))
                                    .collect()
                            })
                            .collect();
                        let columns = e.encode(&cols, &[Width::Z64, Width::Z64]).unwrap();
                        let t = Recording {
                            inner: t,
                            me: me.clone(),
                            log,
                        };
                        e.run(
                            &t,
                            &SharedTable {
                                keys: vec![],
                                columns,
                                rows,
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
                assert!(outs[0].is_none() && outs[2].is_none());
                let got = outs[1].as_ref().unwrap();
                for c in 0..2 {
                    for g in 0..rows {
                        let vs = (0..3).map(|p| values(p, c, g));
                        let want = if op == Op::Max { vs.max() } else { vs.min() }.unwrap();
                        assert_eq!(
                            got[c][g],
                            i256::from_i128(want as i128),
                            "{op:?} col {c} group {g}"
                        );
                    }
                }
                let shape = TableShape {
                    rows,
                    widths: vec![Width::Z64; 2],
                    key_columns: 0,
                    key_bytes: 0,
                };
                let log = log.lock().unwrap().clone();
                assert!(log.len() > 20);
                for (from, to, step, n) in &log {
                    let receiver = ReplicatedEngine::for_program(&prog, to).unwrap();
                    let expected = receiver.expects(from, *step, &shape);
                    assert_eq!(
                        expected.map(|s| s.rows),
                        Some(*n),
                        "{from} → {to} at {step}"
                    );
                }
                // And every message an engine expects was sent.
                for to in &ps {
                    let receiver = ReplicatedEngine::for_program(&prog, to).unwrap();
                    for from in &ps {
                        for step in (0..40).map(Step) {
                            if receiver.expects(from, step, &shape).is_some() {
                                assert!(
                                    log.iter()
                                        .any(|(f, t, s, _)| f == from && t == to && *s == step),
                                    "{to} expects {from}'s {step}, never sent"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn it_refuses_what_it_does_not_run_and_values_it_cannot_compare() {
        let e = ReplicatedEngine::for_program(&program(Op::Min, "a"), "a").unwrap();
        let sum = program(Op::Sum, "a");
        assert!(e.supports(&sum).unwrap_err().contains("min or a max"));
        let four: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let mut p = Program::sum_and_reveal(&four, "a");
        p.stages[0].ops = vec![Op::Min, Op::Reveal];
        assert!(ReplicatedEngine::for_program(&p, "a")
            .unwrap_err()
            .contains("exactly three"));
        let e2 = e
            .encode(&[vec![i256::from_i128(1 << 62)]], &[Width::Z64])
            .unwrap_err();
        assert_eq!(e2.group, 0);
        // Nothing from itself, from outside, or at a step it does not have.
        let shape = TableShape {
            rows: 1,
            widths: vec![Width::Z64],
            key_columns: 0,
            key_bytes: 0,
        };
        assert!(e.expects("a", Step(0), &shape).is_none());
        assert!(e.expects("z", Step(0), &shape).is_none());
        assert!(e.expects("b", Step(0), &shape).is_some());
        assert!(
            e.expects("c", Step(0), &shape).is_none(),
            "set-up comes from the next party"
        );
        assert!(e.expects("b", Step(200), &shape).is_none());
    }
}
