//! A gate: which groups meet a list of conditions, decided in shares by
//! the three compute parties of the replicated engine without any of them
//! learning a total (issue 13). Each condition ([`Bound`]) is one column,
//! "its total over the input parties is at least t": a minimum group size
//! (the row counts of every party but the result party, at least k),
//! that a group has rows at all, and HAVING's comparisons of a COUNT or
//! SUM with a constant (an upper bound is a lower bound on the negated
//! column). Only the AND of a group's conditions, its pass bit, is
//! revealed, to every party of the query (which groups pass is part of the
//! answer, and every party needs it to withhold what it would otherwise
//! contribute for a group that fails). A [`crate::Pipeline`] with a gate
//! runs it before its stages and then replaces each party's input for a
//! failing group by the neutral value of its stage (zero for a sum,
//! [`crate::replicated::NO_VALUE`] for a minimum), so that nothing computed
//! from a failing group's rows is ever revealed: not its count, not its
//! sums, not its extremes.
//!
//! Steps (as the replicated engine's): 0 set-up; 1 to 3 the compute
//! parties' own columns (no message where a compute party has no input);
//! 4 every other input party's columns, its pairs to each compute party;
//! then the comparison's eight rounds over every column at once; then one
//! round per level of the AND of the columns (none for one column); then
//! the reveal to the three (one round); then the pass bits from each
//! compute party to every party outside them, which takes them only if
//! all three agree.
//!
//! Semi-honest, honest majority, like the replicated engine: a deviating
//! compute party can flip a pass bit.

use arrow::datatypes::i256;

use crate::encode::OutOfRange;
use crate::program::{Bound, Program};
use crate::rep3::{self, Arith, Bool, Rep3};
use crate::shares::{ShareColumn, SharedTable, Width};
use crate::transport::{Step, Transport};
use crate::{Engine, ExecError, MessageShape, TableShape};

/// The largest value a party may put into a gate's column, and the largest
/// bound of a condition: with at most 16 input parties every total stays
/// within ±2^62, and its difference with a bound within the comparison's
/// ±2^63.
pub const GATE_INPUT_BOUND: u64 = 1 << 58;

/// The range in which a gate decides exactly: a party's value within
/// ±2^53, and so a total of at most 16 parties within ±2^57, whose bounds
/// the planner keeps within ±(2^57 + 1).
pub const EXACT_BOUND: u64 = 1 << 53;

/// What a party inputs instead of a HAVING value beyond [`EXACT_BOUND`]:
/// enough to make that condition pass whatever the other parties input
/// (2^58 − 15 · 2^53 > 2^57 + 1), so that such a group is decided on its
/// revealed totals by the post part, exactly, instead of failing the query
/// (a failure would tell the analyst that some party's value is large:
/// whether a query succeeds must depend on no row). The cost, stated in
/// the README: for such a group the leader learns its totals even where
/// HAVING then removes it.
pub const FORCED_PASS: u64 = 1 << 58;

/// The words of the comparison's rounds for `n` values (`a2b` of the
/// difference: the carry-save AND, the generate AND, five prefix levels of
/// two ANDs, the last level's one).
fn compare_rounds(n: usize) -> [usize; 8] {
    [n, n, 2 * n, 2 * n, 2 * n, 2 * n, 2 * n, n]
}

/// The ANDs of each level that combines `c` pass bits into one: half of
/// what is left, rounded down, per level.
fn and_levels(c: usize) -> Vec<usize> {
    let mut levels = Vec::new();
    let mut m = c;
    while m > 1 {
        levels.push(m / 2);
        m -= m / 2;
    }
    levels
}

use crate::replicated::{FIRST_ROUND, OTHERS_STEP};

/// The gate of a program (`Op::Pass` over one column per [`Bound`]).
#[derive(Debug, Clone)]
pub struct Gate {
    pub bounds: Vec<Bound>,
    /// The three compute parties, in order.
    pub parties: [String; 3],
    /// Every input party whose rows count towards some bound, compute
    /// parties first, then the others sorted: the result party only if a
    /// bound counts its rows (HAVING; never a minimum group size, see
    /// [`Bound::result_party`]). Its input to the other bounds is
    /// discarded by the compute parties, so it cannot inflate them.
    pub inputs: Vec<String>,
    /// The parties outside the three that need the pass bits: the input
    /// parties and the result party.
    pub receivers: Vec<String>,
    pub leader: String,
    pub me: String,
    /// The plan this run is bound to ([`rep3::Bind`]): the fingerprint
    /// covers the bounds, so parties started with different ones stop.
    pub bind: rep3::Bind,
}

impl Gate {
    /// The gate of a one-stage program `[Pass, Reveal]`.
    pub fn for_program(program: &Program, me: &str) -> Result<Self, String> {
        let stage = match &program.stages[..] {
            [s] => s,
            _ => return Err("a gate is one stage".into()),
        };
        let Some(bounds) = stage.gate() else {
            return Err(format!(
                "a gate runs pass then reveal, not {}",
                program.describe()
            ));
        };
        if bounds.is_empty() || bounds.len() != stage.columns {
            return Err(format!(
                "a gate of {} condition(s) over {} column(s)",
                bounds.len(),
                stage.columns
            ));
        }
        if let Some(b) = bounds
            .iter()
            .find(|b| b.at_least.unsigned_abs() > GATE_INPUT_BOUND)
        {
            return Err(format!("a gate's bound {} is beyond ±2^58", b.at_least));
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
        let leader_counts = bounds.iter().any(|b| b.result_party);
        let data: Vec<String> = program
            .with(|r| r.input)
            .into_iter()
            .filter(|p| *p != leader || leader_counts)
            .collect();
        if data.is_empty() || (data == [leader.clone()]) {
            return Err("a gate needs an input party besides the result party".into());
        }
        if data.len() > 16 {
            return Err(format!(
                "a gate of {} input parties (at most 16)",
                data.len()
            ));
        }
        let mut inputs: Vec<String> = parties
            .iter()
            .filter(|p| data.contains(p))
            .cloned()
            .collect();
        inputs.extend(data.iter().filter(|p| !parties.contains(p)).cloned());
        let mut receivers: Vec<String> = program
            .with(|r| r.input)
            .into_iter()
            .filter(|p| !parties.contains(p) && *p != leader)
            .collect();
        if !parties.contains(&leader) {
            receivers.push(leader.clone());
        }
        Ok(Gate {
            bounds: bounds.to_vec(),
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

    /// The step of the reveal to the three.
    fn reveal_step(&self) -> u16 {
        FIRST_ROUND + 8 + and_levels(self.bounds.len()).len() as u16
    }

    /// The step of the pass bits to the parties outside the three.
    fn forward_step(&self) -> u16 {
        self.reveal_step() + 1
    }

    /// The message `from` may send this party at `step`, for `n` groups.
    pub fn expects(&self, from: &str, step: Step, n: usize) -> Option<MessageShape> {
        let c = self.bounds.len();
        if from == self.me || n == 0 || n > usize::MAX / 4 / c.max(1) {
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
            return (step.0 == self.forward_step()
                && self.receivers.contains(&self.me)
                && self.index(from).is_some())
            .then(|| words(n + 4, false));
        };
        if let Some(m) =
            crate::replicated::intake_expects(&self.parties, &self.inputs, me, from, step, n * c)
        {
            return m;
        }
        let sender = self.index(from)?;
        if sender != (me + 1) % 3 {
            return None;
        }
        let and_from = FIRST_ROUND + 8;
        match step.0 {
            s if (FIRST_ROUND..and_from).contains(&s) => Some(words(
                compare_rounds(n * c)[usize::from(s - FIRST_ROUND)],
                false,
            )),
            s if (and_from..self.reveal_step()).contains(&s) => {
                Some(words(and_levels(c)[usize::from(s - and_from)] * n, false))
            }
            s if s == self.reveal_step() => Some(words(n, false)),
            _ => None,
        }
    }

    /// A party's columns, one after the other, as the words the gate
    /// takes: each value within ±[`GATE_INPUT_BOUND`].
    pub fn encode(&self, values: &[Vec<i256>]) -> Result<Vec<ShareColumn>, OutOfRange> {
        crate::replicated::encode_words_within(values, GATE_INPUT_BOUND)
    }

    /// The pass bit of each of `n` groups, at every party of the gate.
    /// `columns`: this party's values, one column per bound one after the
    /// other (`n` words each; `None` at a party without input).
    pub async fn run(
        &self,
        transport: &dyn Transport,
        columns: Option<&[u64]>,
        n: usize,
    ) -> Result<Vec<bool>, ExecError> {
        let c = self.bounds.len();
        if n == 0 || c == 0 {
            return Err(ExecError::Encode(
                "a gate over no group or no condition".into(),
            ));
        }
        let len = n * c;
        let bits = |words: Vec<u64>| words.iter().map(|w| w & 1 == 1).collect::<Vec<bool>>();
        let mine = || {
            columns.filter(|v| v.len() == len).ok_or_else(|| {
                ExecError::Encode(format!("{} has no gate input of {len} words", self.me))
            })
        };
        let Some(me) = self.index(&self.me) else {
            if !self.receivers.contains(&self.me) {
                return Err(ExecError::Encode(format!(
                    "{} takes no part in the gate",
                    self.me
                )));
            }
            if self.inputs.contains(&self.me) {
                rep3::send_input(
                    transport,
                    &self.parties,
                    Step(OTHERS_STEP),
                    mine()?,
                    &self.bind,
                )
                .await?;
            }
            // The three must agree on every bit: one compute party alone
            // cannot make this party withhold or release a group.
            let step = Step(self.forward_step());
            let got = futures::future::try_join_all(
                self.parties
                    .iter()
                    .map(|p| rep3::recv_words_from(transport, p, step, n + 4)),
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
            a: vec![0; len],
            b: vec![0; len],
        };
        for owner in 0..3 {
            if self.inputs.contains(&self.parties[owner]) {
                let x = if owner == me {
                    r.input(owner, Some(mine()?), len).await?
                } else {
                    r.input(owner, None, len).await?
                };
                total = total.add(&self.counted(&self.parties[owner], x, n));
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
            for (p, x) in others.iter().zip(r.inputs_from(&others, len).await?) {
                total = total.add(&self.counted(p, x, n));
            }
        }
        let at_least: Vec<i64> = self
            .bounds
            .iter()
            .flat_map(|b| std::iter::repeat_n(b.at_least, n))
            .collect();
        let pass = r.at_least_each(&total, &at_least).await?;
        let mut cols: Vec<Bool> = (0..c).map(|j| pass.slice(j * n..(j + 1) * n)).collect();
        while cols.len() > 1 {
            let pairs = cols.len() / 2;
            let rest = cols.split_off(2 * pairs);
            let and: Vec<(&Bool, &Bool)> = cols.chunks(2).map(|p| (&p[0], &p[1])).collect();
            let mut next = r.and_many(&and).await?;
            next.extend(rest);
            cols = next;
        }
        let pass = cols
            .pop()
            .ok_or_else(|| ExecError::Encode("the gate's pass bits went missing".into()))?;
        if r.next_step() != Step(self.reveal_step()) {
            return Err(ExecError::Encode(format!(
                "the gate's comparison ended at {}, not at step {}",
                r.next_step(),
                self.reveal_step()
            )));
        }
        let words = r.reveal_bool_all(&pass).await?;
        let words: Vec<u64> = words.iter().map(|w| w & 1).collect();
        let step = Step(self.forward_step());
        futures::future::try_join_all(self.receivers.iter().map(|o| {
            let mut w = words.clone();
            w.extend_from_slice(&self.bind);
            async move {
                transport
                    .send(o, step, rep3::words_outbound(w))
                    .await
                    .map_err(ExecError::from)
            }
        }))
        .await?;
        Ok(bits(words))
    }

    /// `owner`'s shared input with the columns whose bounds do not count
    /// its rows set to zero (the result party's, for a minimum group
    /// size): every compute party zeroes the same words of its pairs, so
    /// the shares stay consistent, and what it sent there has no effect.
    fn counted(&self, owner: &str, mut x: Arith, n: usize) -> Arith {
        if owner == self.leader {
            for (j, b) in self.bounds.iter().enumerate() {
                if !b.result_party {
                    x.a[j * n..(j + 1) * n].fill(0);
                    x.b[j * n..(j + 1) * n].fill(0);
                }
            }
        }
        x
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
        self.gate.encode(values)
    }
    fn expects(&self, from: &str, step: Step, shape: &TableShape) -> Option<MessageShape> {
        self.gate.expects(from, step, shape.rows)
    }
    async fn run(
        &self,
        transport: &dyn Transport,
        input: &SharedTable,
    ) -> Result<Option<Vec<Vec<i256>>>, ExecError> {
        let words = self
            .gate
            .inputs
            .contains(&self.gate.me)
            .then(|| gate_words(&input.columns));
        let pass = self
            .gate
            .run(transport, words.as_deref(), input.rows)
            .await?;
        Ok((self.gate.me == self.leader)
            .then(|| vec![pass.iter().map(|&p| i256::from_i128(p as i128)).collect()]))
    }
}

/// A gate's input columns one after the other (words of `Z64` columns;
/// anything else is left out, and the gate then refuses the length).
pub(crate) fn gate_words(columns: &[ShareColumn]) -> Vec<u64> {
    columns
        .iter()
        .flat_map(|c| match c {
            ShareColumn::Z64(v) => v.clone(),
            _ => Vec::new(),
        })
        .collect()
}
