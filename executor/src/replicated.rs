//! Engine 2 (first operators): the smallest or largest of the input
//! parties' values per group, computed by three compute parties and
//! revealed to the result party, over [`crate::rep3`]. The plans' MIN and
//! MAX run here. **Semi-honest, honest majority**: if all three follow the
//! protocol, no single party learns anything but the revealed extremes
//! (and what they imply with its own values; it does not learn which party
//! held them). A compute party that *deviates* (adds an error of its
//! choice to a product) can change what is revealed in ways that leak more
//! than the extremes, not only make them wrong (with −1 added before the
//! select's product, the revealed value is min + 2·(l − r), from which the
//! leader, knowing one side, solves for the other): so a policy accepts
//! this engine only if it opts in (`engines.honest_majority`), and
//! malicious security is future work.
//!
//! Steps: 0 set-up (each compute party's PRG seed to the previous one, 4
//! words), 1 to 3 the inputs of compute parties 0, 1 and 2 that hold data
//! (each sends the other two their pairs), 4 the inputs of every other
//! input party (its pairs to each compute party), then the tournament's
//! rounds (from the next compute party only), then the reveal (from the
//! compute party after the result party, or from all three to a result
//! party outside them).

use arrow::datatypes::i256;

use crate::encode::OutOfRange;
use crate::program::{Op, Program};
use crate::rep3::{recv_revealed, send_input, Arith, Rep3};
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

/// Values within ±(2^62 − 1) as Z_2^64 words, one column each: what the
/// replicated engine and the gate compare. `Err` names the first that is
/// not.
pub fn encode_words(values: &[Vec<i256>]) -> Result<Vec<ShareColumn>, OutOfRange> {
    encode_words_within(values, COMPARE_BOUND as u64)
}

/// As [`encode_words`], each value within ±`limit` (a gate's bound).
pub fn encode_words_within(
    values: &[Vec<i256>],
    limit: u64,
) -> Result<Vec<ShareColumn>, OutOfRange> {
    let bound = i256::from_i128(limit as i128);
    values
        .iter()
        .enumerate()
        .map(|(k, col)| {
            col.iter()
                .enumerate()
                .map(|(g, v)| match v.to_i128() {
                    Some(x) if x.unsigned_abs() <= u128::from(limit) => Ok(x as i64 as u64),
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
    /// The three compute parties, in the stage's (sorted) order.
    pub parties: [String; 3],
    /// Every input party, compute parties first (in their order), then the
    /// others in sorted order: the tournament's columns.
    pub inputs: Vec<String>,
    pub me: String,
    /// The result party: a compute party, or an input party outside them.
    pub leader: String,
    /// Largest rather than smallest.
    pub max: bool,
    /// The plan this run is bound to ([`crate::rep3::Bind`]).
    pub bind: crate::rep3::Bind,
}

/// The words each round of a two-way comparison-and-select layer of `m`
/// rows carries, in order: `a2b` (the carry-save AND, the generate AND,
/// five prefix levels of two ANDs, the last level's one), `bit_to_arith`
/// (two products), `select` (one product). Mirrors `Rep3::extreme`; a test
/// checks every message of a run against it.
fn layer_rounds(m: usize) -> [usize; 11] {
    [m, m, 2 * m, 2 * m, 2 * m, 2 * m, 2 * m, m, m, m, m]
}

/// Step 0 is the set-up, 1 to 3 the compute parties' own inputs (a step
/// without a message where that party has none), 4 every other input
/// party's, and the tournament starts at 5.
pub(crate) const OTHERS_STEP: u16 = 4;
pub(crate) const FIRST_ROUND: u16 = 5;

/// What compute party `me` may receive at the set-up and input steps (0
/// to 4) of the replicated engine and the gate, which share them: `None`
/// for a later step. The set-up carries a seed and the plan's binding (8
/// words), an input pair 2n words, an outside party's pairs and binding
/// 2n + 4. Inputs may reach a compute party before it started: their
/// senders start on the leader's word alone.
pub(crate) fn intake_expects(
    parties: &[String; 3],
    inputs: &[String],
    me: usize,
    from: &str,
    step: Step,
    n: usize,
) -> Option<Option<MessageShape>> {
    if step.0 >= FIRST_ROUND {
        return None;
    }
    let words = |rows: usize| MessageShape {
        rows,
        max_cols: 1,
        key_bytes: 0,
        before_start: true,
    };
    let sender = parties.iter().position(|p| p == from);
    Some(match (step.0, sender) {
        (OTHERS_STEP, None) if inputs.iter().any(|p| p == from) => Some(words(2 * n + 4)),
        (0, Some(s)) if s == (me + 1) % 3 => Some(words(8)),
        (1..=3, Some(s)) if s == usize::from(step.0 - 1) && inputs.contains(&parties[s]) => {
            Some(words(2 * n))
        }
        _ => None,
    })
}

impl ReplicatedEngine {
    pub fn for_program(program: &Program, me: &str) -> Result<Self, String> {
        let stage = match &program.stages[..] {
            [s] => s,
            _ => return Err("the replicated engine runs one stage".into()),
        };
        let parties: [String; 3] = stage.compute.clone().try_into().map_err(|p: Vec<String>| {
            format!(
                "the replicated engine runs on exactly three compute parties, not {}",
                p.len()
            )
        })?;
        let data = program.with(|r| r.input);
        let mut inputs: Vec<String> = parties
            .iter()
            .filter(|p| data.contains(p))
            .cloned()
            .collect();
        inputs.extend(data.iter().filter(|p| !parties.contains(p)).cloned());
        let e = ReplicatedEngine {
            parties,
            inputs,
            me: me.to_string(),
            leader: program.result_party(),
            max: program.single().first() == Some(&Op::Max),
            bind: [0; 4],
        };
        e.supports(program)?;
        Ok(e)
    }

    fn index(&self, p: &str) -> Option<usize> {
        self.parties.iter().position(|q| q == p)
    }

    /// The tournament's words per step, and the step of the reveal, for
    /// `n` shared values per input party.
    fn schedule(&self, n: usize) -> (Vec<usize>, u16) {
        let mut rounds = Vec::new();
        let mut cols = self.inputs.len();
        while cols > 1 {
            rounds.extend(layer_rounds((cols / 2) * n));
            cols = cols / 2 + cols % 2;
        }
        let reveal = FIRST_ROUND + rounds.len() as u16;
        (rounds, reveal)
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
        let compute = &program.stages[0].compute;
        let mut distinct = compute.clone();
        distinct.sort();
        distinct.dedup();
        if compute.len() != 3 || distinct.len() != 3 {
            return Err(format!(
                "the replicated engine runs on exactly three distinct compute parties, not {}",
                compute.join(", ")
            ));
        }
        if let Some(p) = compute.iter().find(|p| !program.roles.contains_key(*p)) {
            return Err(format!("compute party {p} is not a party of the program"));
        }
        let inputs = program.with(|r| r.input);
        if inputs.len() < 2 {
            return Err("a comparison across parties needs at least two input parties".into());
        }
        // Every tournament layer's steps fit in a stage's.
        if inputs.len() > 64 {
            return Err(format!("{} input parties, above 64", inputs.len()));
        }
        let result = program.with(|r| r.result);
        match &result[..] {
            [p] if compute.contains(p) || inputs.contains(p) => Ok(()),
            _ => Err("the replicated engine reveals to exactly one compute or input party".into()),
        }
    }

    /// A group left out inputs no value.
    fn neutral(&self) -> u64 {
        NO_VALUE as u64
    }

    /// Each value within ±(2^62 − 1), as Z_2^64 words.
    fn encode(
        &self,
        values: &[Vec<i256>],
        _widths: &[Width],
    ) -> Result<Vec<ShareColumn>, OutOfRange> {
        encode_words(values)
    }

    fn expects(&self, from: &str, step: Step, shape: &TableShape) -> Option<MessageShape> {
        if from == self.me {
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
        let (rounds, reveal) = self.schedule(n);
        let Some(me) = self.index(&self.me) else {
            // An input party that does not compute hears only the reveal,
            // from each compute party, if it is the result party.
            return (step.0 == reveal && self.me == self.leader && self.index(from).is_some())
                .then(|| words(n, false));
        };
        if let Some(m) = intake_expects(&self.parties, &self.inputs, me, from, step, n) {
            return m;
        }
        let sender = self.index(from)?;
        let next = (me + 1) % 3;
        match step.0 {
            s if (FIRST_ROUND..reveal).contains(&s) && sender == next => {
                Some(words(rounds[usize::from(s - FIRST_ROUND)], false))
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
        let (rows, cols) = (input.rows, input.columns.len());
        let n = rows * cols;
        if n == 0 {
            return Err(ExecError::Encode(
                "the replicated engine needs at least one group and one column".into(),
            ));
        }
        let has_input = self.inputs.contains(&self.me);
        // This party's columns, one after another (none at a helper).
        let mut mine = Vec::with_capacity(if has_input { n } else { 0 });
        if has_input {
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
        }
        let (_, reveal) = self.schedule(n);
        let decode = |words: Vec<u64>| -> Vec<Vec<i256>> {
            words
                .chunks(rows.max(1))
                .take(cols)
                .map(|c| {
                    c.iter()
                        .map(|&w| i256::from_i128(w as i64 as i128))
                        .collect()
                })
                .collect()
        };
        let Some(me) = self.index(&self.me) else {
            // An input party that does not compute: its shares to the
            // three, then, at the result party, the reveal.
            if !has_input {
                return Err(ExecError::Encode(format!(
                    "{} neither computes nor inputs",
                    self.me
                )));
            }
            send_input(
                transport,
                &self.parties,
                Step(OTHERS_STEP),
                &mine,
                &self.bind,
            )
            .await?;
            if self.me != self.leader {
                return Ok(None);
            }
            let words = recv_revealed(transport, &self.parties, Step(reveal), n).await?;
            return Ok(Some(decode(words)));
        };
        let mut r = Rep3::setup_bound(
            transport,
            self.parties.clone(),
            &self.me,
            Step(0),
            self.bind,
        )
        .await?;
        let mut shared: Vec<Arith> = Vec::with_capacity(self.inputs.len());
        for owner in 0..3 {
            if self.inputs.contains(&self.parties[owner]) {
                shared.push(
                    r.input(owner, (owner == me).then_some(&mine[..]), n)
                        .await?,
                );
            } else {
                r.skip_step()?;
            }
        }
        let others: Vec<String> = self
            .inputs
            .iter()
            .filter(|p| self.index(p).is_none())
            .cloned()
            .collect();
        if others.is_empty() {
            r.skip_step()?;
        } else {
            shared.extend(r.inputs_from(&others, n).await?);
        }
        let extreme = r.extreme(shared, self.max).await?;
        if r.next_step() != Step(reveal) {
            return Err(ExecError::Encode(format!(
                "the tournament ended at {}, not at {reveal}",
                r.next_step()
            )));
        }
        match self.index(&self.leader) {
            Some(leader) => match r.reveal_to(&extreme, leader).await? {
                Some(words) => Ok(Some(decode(words))),
                None => Ok(None),
            },
            None => {
                r.reveal_to_outsider(&extreme, &self.leader).await?;
                Ok(None)
            }
        }
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

    /// A federation: its parties, helpers (no input), the three compute
    /// parties and the result party.
    fn federation(
        parties: &[&str],
        helpers: &[&str],
        compute: [&str; 3],
        leader: &str,
        op: Op,
    ) -> Program {
        let s = |v: &[&str]| v.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        Program::with_stages(
            &s(parties),
            &s(helpers),
            leader,
            vec![crate::program::Stage {
                ops: vec![op, Op::Reveal],
                columns: 2,
                compute: s(&compute),
                bounds: Vec::new(),
            }],
        )
    }

    /// The extremes of the input parties' columns equal plaintext, only the
    /// result party learns them, and every message sent is one the
    /// receiver's engine expects at that step, with exactly those rows; and
    /// every message an engine expects is sent. Three parties; two and a
    /// data-less helper; five (the leader a compute party, or not).
    #[tokio::test]
    async fn min_and_max_match_plaintext_and_the_schedule() {
        let cases: [(&[&str], &[&str], [&str; 3], &str); 4] = [
            (&["a", "b", "c"], &[], ["a", "b", "c"], "b"),
            (&["a", "b", "h"], &["h"], ["a", "b", "h"], "a"),
            (&["a", "b", "c", "d", "e"], &[], ["a", "b", "c"], "c"),
            (&["a", "b", "c", "d", "e"], &[], ["a", "b", "c"], "e"),
        ];
        for (parties, helpers, compute, leader) in cases {
            for rows in [1usize, 9] {
                for op in [Op::Min, Op::Max] {
                    run_case(parties, helpers, compute, leader, rows, op).await;
                }
            }
        }
    }

    async fn run_case(
        parties: &[&str],
        helpers: &[&str],
        compute: [&str; 3],
        leader: &str,
        rows: usize,
        op: Op,
    ) {
        let values = |party: usize, col: usize, g: usize| -> i64 {
            match (party, g) {
                (_, 0) => 0,
                (0, 1) => COMPARE_BOUND,
                (1, 1) => -COMPARE_BOUND,
                (_, 2) => 7, // a tie everywhere
                (_, 3) => -1,
                _ => ((g * 31 + party * 17 + col * 5) as i64 % 23) - 11,
            }
        };
        let prog = federation(parties, helpers, compute, leader, op);
        let ps: Vec<String> = parties.iter().map(|p| p.to_string()).collect();
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
        let at = ps.iter().position(|p| p == leader).unwrap();
        for (i, o) in outs.iter().enumerate() {
            assert_eq!(o.is_some(), i == at, "{parties:?}: only {leader} learns");
        }
        let got = outs[at].as_ref().unwrap();
        let data: Vec<usize> = (0..ps.len())
            .filter(|&i| !helpers.contains(&parties[i]))
            .collect();
        for c in 0..2 {
            for g in 0..rows {
                let vs = data.iter().map(|&p| values(p, c, g));
                let want = if op == Op::Max { vs.max() } else { vs.min() }.unwrap();
                assert_eq!(
                    got[c][g],
                    i256::from_i128(want as i128),
                    "{parties:?} {op:?} col {c} group {g}"
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
                "{parties:?}: {from} → {to} at {step}"
            );
        }
        for to in &ps {
            let receiver = ReplicatedEngine::for_program(&prog, to).unwrap();
            for from in &ps {
                for step in (0..80).map(Step) {
                    if receiver.expects(from, step, &shape).is_some() {
                        assert!(
                            log.iter()
                                .any(|(f, t, s, _)| f == from && t == to && *s == step),
                            "{parties:?}: {to} expects {from}'s {step}, never sent"
                        );
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
        // A helper cannot be the only input party's partner in a tournament
        // of one column, and no party outside the program computes.
        let one = federation(&["a", "h", "k"], &["h", "k"], ["a", "h", "k"], "a", Op::Min);
        assert!(ReplicatedEngine::for_program(&one, "a")
            .unwrap_err()
            .contains("at least two input parties"));
        let stranger = federation(&["a", "b", "c"], &[], ["a", "b", "z"], "a", Op::Min);
        assert!(ReplicatedEngine::for_program(&stranger, "a").is_err());
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
