//! A minimum group size decided in shares (issue 13): whether each group's
//! row count, summed over every input party, reaches a public `k`, computed
//! by the three compute parties of the replicated engine without any of
//! them learning a count. Only the pass bits are revealed, to every party
//! of the query (which groups pass is part of the answer, and every party
//! needs it to withhold what it would otherwise contribute for a group that
//! fails). A [`crate::Pipeline`] with a gate runs it before its stages and
//! then replaces each party's input for a failing group by the neutral
//! value of its stage (zero for a sum, [`crate::replicated::NO_VALUE`] for
//! a minimum), so that nothing computed from a failing group's rows is
//! ever revealed: not its count, not its sums, not its extremes.
//!
//! Steps (as the replicated engine's): 0 set-up; 1 to 3 the compute
//! parties' own counts (no message where a compute party has no data); 4
//! every other input party's counts, its pairs to each compute party; then
//! the comparison's eight rounds; then the reveal to the three (one round);
//! then the pass bits from each compute party to every input party outside
//! them, which takes them only if all three agree.
//!
//! Semi-honest, honest majority, like the replicated engine: a deviating
//! compute party can flip a pass bit.

use arrow::datatypes::i256;

use crate::encode::OutOfRange;
use crate::program::{Op, Program};
use crate::rep3::{self, Arith, Rep3};
use crate::shares::{ShareColumn, SharedTable, Width};
use crate::transport::{Step, Transport};
use crate::{Engine, ExecError, MessageShape, TableShape};

/// The words of the comparison's rounds for `n` groups (`a2b` of the
/// difference: the carry-save AND, the generate AND, five prefix levels of
/// two ANDs, the last level's one).
fn compare_rounds(n: usize) -> [usize; 8] {
    [n, n, 2 * n, 2 * n, 2 * n, 2 * n, 2 * n, n]
}

use crate::replicated::{FIRST_ROUND, OTHERS_STEP};
/// The step of the reveal to the three, and of the pass bits to the others.
const REVEAL_STEP: u16 = FIRST_ROUND + 8;
const FORWARD_STEP: u16 = REVEAL_STEP + 1;

/// The gate of a program (`Op::AtLeast(k)` over one column: the row count).
#[derive(Debug, Clone)]
pub struct Gate {
    pub k: u64,
    /// The three compute parties, in order.
    pub parties: [String; 3],
    /// Every input party but the result party, compute parties first,
    /// then the others sorted. Decided: the result party's rows do not
    /// count towards the minimum (it knows them, so counting them would let
    /// it learn a single row of another party's, as 9 of its own and 1 of
    /// theirs reaching 10), and it sends no count (so it cannot inflate
    /// one). A group passes if the other parties' rows reach `k`.
    pub inputs: Vec<String>,
    /// The parties outside the three that need the pass bits: the input
    /// parties and the result party.
    pub receivers: Vec<String>,
    pub leader: String,
    pub me: String,
    /// The plan this run is bound to ([`rep3::Bind`]): the fingerprint
    /// covers `k`, so parties started with different thresholds stop.
    pub bind: rep3::Bind,
}

impl Gate {
    /// The gate of a one-stage program `[AtLeast(k), Reveal]`.
    pub fn for_program(program: &Program, me: &str) -> Result<Self, String> {
        let (stage, k) = match &program.stages[..] {
            [s] => match s.ops[..] {
                [Op::AtLeast(k), Op::Reveal] => (s, k),
                _ => {
                    return Err(format!(
                        "a gate runs at_least then reveal, not {}",
                        program.describe()
                    ))
                }
            },
            _ => return Err("a gate is one stage".into()),
        };
        if k > crate::replicated::COMPARE_BOUND as u64 {
            return Err(format!("a minimum group size of {k} is beyond 2^62 − 1"));
        }
        let parties: [String; 3] = stage.compute.clone().try_into().map_err(|p: Vec<String>| {
            format!(
                "a gate runs on exactly three compute parties, not {}",
                p.len()
            )
        })?;
        let mut distinct = parties.to_vec();
        distinct.sort();
        distinct.dedup();
        if distinct.len() != 3 {
            return Err("a gate's three compute parties must differ".into());
        }
        let leader = program.result_party();
        if leader.is_empty() {
            return Err("a gate needs its result party".into());
        }
        let data: Vec<String> = program
            .with(|r| r.input)
            .into_iter()
            .filter(|p| *p != leader)
            .collect();
        if data.is_empty() {
            return Err("a gate needs an input party besides the result party".into());
        }
        let mut inputs: Vec<String> = parties
            .iter()
            .filter(|p| data.contains(p))
            .cloned()
            .collect();
        inputs.extend(data.iter().filter(|p| !parties.contains(p)).cloned());
        let mut receivers: Vec<String> = data
            .iter()
            .filter(|p| !parties.contains(p))
            .cloned()
            .collect();
        if !parties.contains(&leader) {
            receivers.push(leader.clone());
        }
        Ok(Gate {
            k,
            parties,
            inputs,
            receivers,
            leader,
            me: me.to_string(),
            bind: [0; 4],
        })
    }

    fn index(&self, p: &str) -> Option<usize> {
        self.parties.iter().position(|q| q == p)
    }

    /// The message `from` may send this party at `step`, for `n` groups.
    pub fn expects(&self, from: &str, step: Step, n: usize) -> Option<MessageShape> {
        if from == self.me || n == 0 || n > usize::MAX / 4 {
            return None;
        }
        let words = |rows: usize, before_start: bool| MessageShape {
            rows,
            max_cols: 1,
            key_bytes: 0,
            before_start,
        };
        let Some(me) = self.index(&self.me) else {
            // A party outside the three hears only the pass bits.
            return (step.0 == FORWARD_STEP
                && self.receivers.contains(&self.me)
                && self.index(from).is_some())
            .then(|| words(n + 4, false));
        };
        if let Some(m) =
            crate::replicated::intake_expects(&self.parties, &self.inputs, me, from, step, n)
        {
            return m;
        }
        let sender = self.index(from)?;
        let next = (me + 1) % 3;
        match step.0 {
            s if (FIRST_ROUND..REVEAL_STEP).contains(&s) && sender == next => Some(words(
                compare_rounds(n)[usize::from(s - FIRST_ROUND)],
                false,
            )),
            REVEAL_STEP if sender == next => Some(words(n, false)),
            _ => None,
        }
    }

    /// The pass bit of each of `n` groups, at every party of the gate.
    /// `counts`: this party's row counts (`None` at a compute party without
    /// data).
    pub async fn run(
        &self,
        transport: &dyn Transport,
        counts: Option<&[u64]>,
        n: usize,
    ) -> Result<Vec<bool>, ExecError> {
        if n == 0 {
            return Err(ExecError::Encode("a gate over no group".into()));
        }
        let bits = |words: Vec<u64>| words.iter().map(|w| w & 1 == 1).collect::<Vec<bool>>();
        let Some(me) = self.index(&self.me) else {
            if !self.receivers.contains(&self.me) {
                return Err(ExecError::Encode(format!(
                    "{} takes no part in the gate",
                    self.me
                )));
            }
            if self.inputs.contains(&self.me) {
                let mine = counts.filter(|c| c.len() == n).ok_or_else(|| {
                    ExecError::Encode(format!("{} has no counts to give", self.me))
                })?;
                rep3::send_input(
                    transport,
                    &self.parties,
                    Step(OTHERS_STEP),
                    mine,
                    &self.bind,
                )
                .await?;
            }
            // The three must agree on every bit: one compute party alone
            // cannot make this party withhold or release a group.
            let got = futures::future::try_join_all(
                self.parties
                    .iter()
                    .map(|p| rep3::recv_words_from(transport, p, Step(FORWARD_STEP), n + 4)),
            )
            .await?;
            if got.iter().any(|w| w != &got[0]) {
                return Err(ExecError::Malformed {
                    peer: self.parties.join(", "),
                    reason: "the compute parties sent different pass bits".into(),
                });
            }
            if got[0][n..] != self.bind {
                return Err(ExecError::Malformed {
                    peer: self.parties.join(", "),
                    reason: "they run a different plan (its fingerprint differs from this party's)"
                        .into(),
                });
            }
            let mut words = got[0].clone();
            words.truncate(n);
            return Ok(bits(words));
        };
        let mut r = Rep3::setup_bound(
            transport,
            self.parties.clone(),
            &self.me,
            Step(0),
            self.bind,
        )
        .await?;
        let mut total = Arith {
            a: vec![0; n],
            b: vec![0; n],
        };
        for owner in 0..3 {
            if self.inputs.contains(&self.parties[owner]) {
                let mine = if owner == me { counts } else { None };
                total = total.add(&r.input(owner, mine, n).await?);
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
            for x in r.inputs_from(&others, n).await? {
                total = total.add(&x);
            }
        }
        let pass = r.at_least(&total, self.k as i64).await?;
        if r.next_step() != Step(REVEAL_STEP) {
            return Err(ExecError::Encode(format!(
                "the gate's comparison ended at {}, not at step {REVEAL_STEP}",
                r.next_step()
            )));
        }
        let words = r.reveal_bool_all(&pass).await?;
        let words: Vec<u64> = words.iter().map(|w| w & 1).collect();
        futures::future::try_join_all(self.receivers.iter().map(|o| {
            let mut w = words.clone();
            w.extend_from_slice(&self.bind);
            async move {
                transport
                    .send(o, Step(FORWARD_STEP), rep3::words_outbound(w))
                    .await
                    .map_err(ExecError::from)
            }
        }))
        .await?;
        Ok(bits(words))
    }
}

/// The gate as an engine of its own (for its schedule test and EXPLAIN):
/// its result is the pass bits, as 0 or 1, at the result party.
pub struct GateEngine {
    pub gate: Gate,
    pub leader: String,
}

#[async_trait::async_trait]
impl Engine for GateEngine {
    fn name(&self) -> &'static str {
        "gate"
    }
    fn supports(&self, program: &Program) -> Result<(), String> {
        Gate::for_program(program, &self.gate.me).map(|_| ())
    }
    fn encode(
        &self,
        values: &[Vec<i256>],
        _widths: &[Width],
    ) -> Result<Vec<ShareColumn>, OutOfRange> {
        crate::replicated::encode_words(values)
    }
    fn expects(&self, from: &str, step: Step, shape: &TableShape) -> Option<MessageShape> {
        self.gate.expects(from, step, shape.rows)
    }
    async fn run(
        &self,
        transport: &dyn Transport,
        input: &SharedTable,
    ) -> Result<Option<Vec<Vec<i256>>>, ExecError> {
        let counts = match input.columns.first() {
            Some(ShareColumn::Z64(v)) if self.gate.inputs.contains(&self.gate.me) => Some(&v[..]),
            _ => None,
        };
        let pass = self.gate.run(transport, counts, input.rows).await?;
        Ok((self.gate.me == self.leader)
            .then(|| vec![pass.iter().map(|&p| i256::from_i128(p as i128)).collect()]))
    }
}
