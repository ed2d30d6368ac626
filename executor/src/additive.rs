//! Engine 1: additive N-party secret sharing over Z_2^64.
//!
//! Each party splits its encoded partials into N shares and gives share j to
//! party j (step [`SEEDS`], as a PRG seed: see below). Each party adds the shares it holds into its
//! share of the total, and sends that to the querying party (step
//! [`RESULT_SHARES`]), which alone adds them up and learns the totals. Secure against
//! any semi-honest coalition of up to N-1 parties: every message a coalition
//! sees from an honest party is uniformly random, save the final total.

use std::sync::Arc;

use arrow::array::{Array, FixedSizeBinaryArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use std::sync::atomic::{AtomicBool, Ordering};

use rand::rngs::OsRng;
use rand::TryRngCore;

use crate::encode::{to_ring, OutOfRange};
use crate::program::{Op, Program};
use crate::shares::{ShareColumn, SharedTable, Width};
use crate::transport::{Outbound, Step, Transport, BATCH_ROWS};
use crate::{Engine, ExecError, MessageShape, TableShape};
use futures::StreamExt;

/// Step 0: a party's 256-bit seed for each other party's input share.
pub const SEEDS: Step = Step(0);
/// Step 1: a compute party's share of the sums, to the result party.
pub const RESULT_SHARES: Step = Step(1);

pub struct AdditiveEngine {
    /// All parties, in the agreed (sorted) order.
    pub parties: Vec<String>,
    pub me: String,
    /// The querying party: the only one that learns the result.
    pub leader: String,
    /// Differential privacy: the noise this party adds to its share of each
    /// column (one draw per row) before anything leaves it for the reveal
    /// (`None`: none). Drawn beforehand ([`crate::noise::draw_all`]), so
    /// that the time the draws take, which depends on their values, does
    /// not show in when this party's messages leave.
    pub noise: Vec<Option<Vec<i128>>>,
    /// Set once this party's part can lead to a reveal: just before a
    /// party sends its result share, and at the leader once it holds every
    /// share. A budget charge is refunded only if this was never set.
    pub reveal_point: Option<Arc<AtomicBool>>,
}

impl AdditiveEngine {
    /// For `program` at party `me`: every compute party of its stage
    /// shares its input among them all; the one result party is the
    /// leader. A party of the program outside the stage (a data-less
    /// helper) takes no part.
    pub fn for_program(program: &Program, me: &str) -> Result<Self, String> {
        let parties = match &program.stages[..] {
            [s] => s.compute.clone(),
            _ => return Err("the additive engine runs one stage".into()),
        };
        let e = AdditiveEngine::new(parties, me.to_string(), program.result_party());
        e.supports(program)?;
        Ok(e)
    }

    /// Without noise.
    pub fn new(parties: Vec<String>, me: String, leader: String) -> Self {
        AdditiveEngine {
            parties,
            me,
            leader,
            noise: Vec::new(),
            reveal_point: None,
        }
    }

    /// Adds this party's noise share to its share of the totals: the
    /// revealed sum carries every party's noise, and no party knows any
    /// draw but its own.
    fn add_noise(&self, acc: &mut SharedTable) -> Result<(), ExecError> {
        for (col, draws) in self.noise.iter().enumerate() {
            let Some(draws) = draws else { continue };
            if draws.len() != acc.rows {
                return Err(ExecError::Encode(format!(
                    "{} noise draws for {} groups",
                    draws.len(),
                    acc.rows
                )));
            }
            for (row, &x) in draws.iter().enumerate() {
                acc.add_value(col, row, x);
            }
        }
        Ok(())
    }

    fn mark_reveal_point(&self) {
        if let Some(f) = &self.reveal_point {
            f.store(true, Ordering::SeqCst);
        }
    }
}

#[async_trait::async_trait]
impl Engine for AdditiveEngine {
    fn name(&self) -> &'static str {
        "additive"
    }

    /// A sum then a reveal, every party contributing input and computing
    /// on shares, exactly one party receiving the result.
    fn supports(&self, program: &Program) -> Result<(), String> {
        if program.single() != [Op::Sum, Op::Reveal] {
            return Err(format!(
                "the additive engine runs a sum and then a reveal, not {}",
                program.describe()
            ));
        }
        let compute = &program.stages[0].compute;
        if let Some(p) = compute.iter().find(|p| !program.roles_of(p).input) {
            return Err(format!(
                "the additive engine needs every party it computes among to contribute input; {p} does not"
            ));
        }
        if compute.is_empty() {
            return Err("the additive engine needs at least one party".into());
        }
        let result = program.with(|r| r.result);
        if result.len() != 1 {
            return Err(format!(
                "the additive engine reveals to exactly one party, not {}",
                result.len()
            ));
        }
        if !compute.contains(&result[0]) {
            return Err(format!(
                "the additive engine reveals to one of its parties, and {} is not one",
                result[0]
            ));
        }
        Ok(())
    }

    /// Each value within ±(2^r−1)/N, N the number of input parties: their
    /// sum cannot wrap the ring.
    fn encode(
        &self,
        values: &[Vec<arrow::datatypes::i256>],
        widths: &[Width],
    ) -> Result<Vec<ShareColumn>, OutOfRange> {
        to_ring(values, widths, self.parties.len())
    }

    fn expects(&self, from: &str, step: Step, shape: &TableShape) -> Option<MessageShape> {
        if from == self.me || !self.parties.iter().any(|p| p == from) {
            return None;
        }
        match step {
            // A peer that started sends its seeds at once.
            SEEDS => Some(MessageShape {
                rows: 1,
                max_cols: 1,
                key_bytes: 0,
                before_start: true,
            }),
            RESULT_SHARES if self.me == self.leader => Some(MessageShape {
                rows: shape.rows,
                max_cols: shape.widths.iter().map(|w| w.limbs()).sum::<usize>() + shape.key_columns,
                key_bytes: shape.key_bytes,
                before_start: false,
            }),
            _ => None,
        }
    }

    /// Runs the protocol on this party's encoded `input` (its partials for
    /// every group, with the public keys). Returns the decoded totals at the
    /// leader, `None` at every other party.
    async fn run(
        &self,
        transport: &dyn Transport,
        input: &SharedTable,
    ) -> Result<Option<Vec<Vec<arrow::datatypes::i256>>>, ExecError> {
        let rows = input.rows;
        if !self.parties.contains(&self.me) {
            return Err(ExecError::Encode(format!(
                "{} is not among the parties",
                self.me
            )));
        }
        // Step SEEDS, seed-compressed: party i sends party j a fresh 256-bit
        // seed s_ij instead of a share vector; both expand it with ChaCha20
        // into the same uniformly random share r_ij, and i keeps
        // x_i - sum_j r_ij. 32 bytes per peer, whatever the number of groups;
        // each seed is expanded into the running share in place.
        let mut acc = input.clone();
        let mut seeds = Vec::new();
        for p in self.others() {
            let mut seed = [0u8; 32];
            OsRng
                .try_fill_bytes(&mut seed)
                .map_err(|e| ExecError::Encode(format!("OS randomness failed: {e}")))?;
            acc.add_seed(seed, true);
            seeds.push((p.clone(), seed));
        }
        let send_all = futures::future::try_join_all(seeds.iter().map(|(p, seed)| async move {
            let b = seed_batch(seed).map_err(|e| ExecError::Encode(e.to_string()))?;
            transport
                .send(p, SEEDS, Outbound::one(b))
                .await
                .map_err(ExecError::from)
        }));
        let recv_all = futures::future::try_join_all(self.others().map(|p| async move {
            let b = transport.recv(p, SEEDS).await?.one().await?;
            read_seed(&b).map_err(|reason| ExecError::Malformed {
                peer: p.to_string(),
                reason,
            })
        }));
        let (_, received) = futures::future::try_join(send_all, recv_all).await?;
        for seed in received {
            acc.add_seed(seed, false);
        }
        self.add_noise(&mut acc)?;

        if self.me != self.leader {
            self.mark_reveal_point();
            let message = acc.into_message(BATCH_ROWS);
            transport.send(&self.leader, RESULT_SHARES, message).await?;
            return Ok(None);
        }
        // Every peer's result share streams in at once, each read as soon as
        // it opens (a peer's stream never waits for another's, which would
        // hold its HTTP/2 window); each batch is added where it belongs as
        // it arrives, so that no peer's share is held whole beside the total.
        enum Reading<'a> {
            Waiting(&'a str),
            Open(&'a str, crate::transport::Inbound),
        }
        let mut read: std::collections::HashMap<&str, usize> =
            self.others().map(|p| (p.as_str(), 0)).collect();
        let streams = self.others().map(|p| {
            futures::stream::unfold(
                Some(Reading::Waiting(p.as_str())),
                move |state| async move {
                    let (p, mut ib) = match state? {
                        Reading::Waiting(p) => match transport.recv(p, RESULT_SHARES).await {
                            Ok(ib) => (p, ib),
                            Err(e) => return Some((Err(e), None)),
                        },
                        Reading::Open(p, ib) => (p, ib),
                    };
                    match ib.next().await {
                        Ok(Some(b)) => Some((Ok((p, b)), Some(Reading::Open(p, ib)))),
                        Ok(None) => None,
                        Err(e) => Some((Err(e), None)),
                    }
                },
            )
            .boxed()
        });
        let mut all = futures::stream::select_all(streams);
        while let Some(item) = all.next().await {
            let (p, b) = item?;
            let at = read.get(p).copied().unwrap_or(0);
            let n = acc
                .add_batch(&b, at)
                .map_err(|reason| ExecError::Malformed {
                    peer: p.to_string(),
                    reason,
                })?;
            read.insert(p, at + n);
        }
        if let Some((p, n)) = read.iter().find(|(_, n)| **n != rows) {
            return Err(ExecError::Malformed {
                peer: p.to_string(),
                reason: format!("{n} rows, expected {rows}"),
            });
        }
        self.mark_reveal_point();
        Ok(Some(acc.columns.iter().map(|c| c.decode()).collect()))
    }
}

/// One party's seed for another, as a one-row Arrow batch.
fn seed_batch(seed: &[u8; 32]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let col = FixedSizeBinaryArray::try_from_iter(std::iter::once(seed.as_slice()))?;
    let schema = Arc::new(Schema::new(vec![Field::new(
        "seed",
        DataType::FixedSizeBinary(32),
        false,
    )]));
    RecordBatch::try_new(schema, vec![Arc::new(col)])
}

fn read_seed(b: &RecordBatch) -> Result<[u8; 32], String> {
    if b.num_columns() != 1 || b.num_rows() != 1 || b.schema().field(0).name() != "seed" {
        return Err("expected one seed, a one-row batch with a `seed` column".into());
    }
    let a = b
        .column(0)
        .as_any()
        .downcast_ref::<FixedSizeBinaryArray>()
        .ok_or("the seed column is not FixedSizeBinary(32)")?;
    if a.is_null(0) {
        return Err("the seed is null".into());
    }
    a.value(0)
        .try_into()
        .map_err(|_| "the seed is not 32 bytes".to_string())
}

impl AdditiveEngine {
    fn others(&self) -> impl Iterator<Item = &String> {
        self.parties.iter().filter(move |p| **p != self.me)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shares::Width;
    use crate::transport::InMemoryNetwork;
    use std::time::Duration;

    fn parties(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("p{i}")).collect()
    }

    #[tokio::test]
    async fn leader_learns_exactly_the_sum() {
        for n in [2, 3, 5] {
            let ps = parties(n);
            let net = InMemoryNetwork::connect(&ps, Duration::from_secs(5));
            let inputs: Vec<Vec<i128>> = (0..n)
                .map(|i| vec![i as i128 * 10 - 7, -(i as i128), 1 << 40])
                .collect();
            let mut tasks = Vec::new();
            for (i, t) in net.into_iter().enumerate() {
                let ps = ps.clone();
                let wide: Vec<arrow::datatypes::i256> = inputs[i]
                    .iter()
                    .map(|&v| arrow::datatypes::i256::from_i128(v))
                    .collect();
                // The same values in Z_2^64, Z_2^128, and in Z_2^256 times
                // 2^140 (past 128 bits).
                let shifted: Vec<arrow::datatypes::i256> = wide
                    .iter()
                    .map(|v| {
                        v.wrapping_mul(
                            arrow::datatypes::i256::from_i128(1 << 70)
                                .wrapping_mul(arrow::datatypes::i256::from_i128(1 << 70)),
                        )
                    })
                    .collect();
                let enc = crate::encode::to_ring(
                    &[wide.clone(), wide, shifted],
                    &[Width::Z64, Width::Z128, Width::Z256],
                    n,
                )
                .unwrap();
                tasks.push(tokio::spawn(async move {
                    let e = AdditiveEngine::new(ps.clone(), ps[i].clone(), ps[1].clone());
                    let input = SharedTable {
                        keys: vec![],
                        columns: enc,
                        rows: 3,
                    };
                    e.run(&t, &input).await.unwrap()
                }));
            }
            let mut outs = Vec::new();
            for t in tasks {
                outs.push(t.await.unwrap());
            }
            for (i, o) in outs.iter().enumerate() {
                assert_eq!(o.is_some(), i == 1, "only the leader learns the result");
            }
            let w = arrow::datatypes::i256::from_i128;
            let expect: Vec<arrow::datatypes::i256> = (0..3)
                .map(|g| w(inputs.iter().map(|v| v[g]).sum::<i128>()))
                .collect();
            assert_eq!(outs[1].as_ref().unwrap()[0], expect);
            assert_eq!(outs[1].as_ref().unwrap()[1], expect);
            let shifted: Vec<arrow::datatypes::i256> = expect
                .iter()
                .map(|v| v.wrapping_mul(w(1 << 70)).wrapping_mul(w(1 << 70)))
                .collect();
            assert_eq!(outs[1].as_ref().unwrap()[2], shifted);
        }
    }

    /// More groups than a batch holds: each result share streams as
    /// several batches, with the group keys, and adds up where it belongs.
    #[tokio::test]
    async fn a_share_of_many_batches_adds_up_group_by_group() {
        let ps = parties(3);
        let rows = 2 * crate::transport::BATCH_ROWS + 5;
        let keys: Vec<arrow::array::ArrayRef> = vec![std::sync::Arc::new(
            arrow::array::Int64Array::from_iter_values(0..rows as i64),
        )];
        let value = |party: usize, g: usize| (g as i128 * 7 - 3) * (party as i128 + 1);
        let net = InMemoryNetwork::connect(&ps, Duration::from_secs(20));
        let mut tasks = Vec::new();
        for (i, t) in net.into_iter().enumerate() {
            let (ps, keys) = (ps.clone(), keys.clone());
            tasks.push(tokio::spawn(async move {
                let v: Vec<arrow::datatypes::i256> = (0..rows)
                    .map(|g| arrow::datatypes::i256::from_i128(value(i, g)))
                    .collect();
                let columns = crate::encode::to_ring(&[v], &[Width::Z128], 3).unwrap();
                let e = AdditiveEngine::new(ps.clone(), ps[i].clone(), ps[2].clone());
                e.run(
                    &t,
                    &SharedTable {
                        keys,
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
        let totals = outs[2].as_ref().unwrap();
        for g in [0, 1, crate::transport::BATCH_ROWS, rows - 1] {
            let expect: i128 = (0..3).map(|i| value(i, g)).sum();
            assert_eq!(
                totals[0][g],
                arrow::datatypes::i256::from_i128(expect),
                "group {g}"
            );
        }
        assert_eq!(totals[0].len(), rows);
    }

    #[tokio::test]
    async fn a_silent_peer_times_out_and_nothing_is_revealed() {
        let ps = parties(3);
        let mut net = InMemoryNetwork::connect(&ps, Duration::from_millis(200));
        let _silent = net.pop();
        let t1 = net.pop().unwrap();
        let enc = crate::encode::to_ring(
            &[vec![arrow::datatypes::i256::from_i128(5)]],
            &[Width::Z64],
            3,
        )
        .unwrap();
        let e = AdditiveEngine::new(ps.clone(), ps[1].clone(), ps[1].clone());
        let err = e
            .run(
                &t1,
                &SharedTable {
                    keys: vec![],
                    columns: enc,
                    rows: 1,
                },
            )
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("p0") || err.to_string().contains("p2"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod garbage {
    use super::*;
    use crate::shares::Width;
    use crate::transport::InMemoryNetwork;
    use std::time::Duration;

    #[tokio::test]
    async fn a_malformed_seed_is_refused_naming_the_peer() {
        let ps: Vec<String> = vec!["a".into(), "b".into()];
        let mut net = InMemoryNetwork::connect(&ps, Duration::from_secs(2));
        let b = net.pop().unwrap();
        let a = net.pop().unwrap();
        let junk = SharedTable::zeros(vec![], &[Width::Z64], 1)
            .to_batch()
            .unwrap();
        b.send("a", SEEDS, Outbound::one(junk)).await.unwrap();
        let e = AdditiveEngine::new(ps.clone(), "a".into(), "a".into());
        let input = SharedTable::zeros(vec![], &[Width::Z64], 1);
        let err = e.run(&a, &input).await.unwrap_err().to_string();
        assert!(err.contains("peer b sent a malformed share batch"), "{err}");
    }

    fn abc() -> Vec<String> {
        vec!["a".into(), "b".into(), "c".into()]
    }

    #[test]
    fn it_runs_a_sum_and_reveal_to_one_party_and_nothing_else() {
        let ps = abc();
        let e = AdditiveEngine::new(ps.clone(), "a".into(), "a".into());
        assert!(e.supports(&Program::sum_and_reveal(&ps, "a")).is_ok());
        // Planned without a leader: nobody would receive the result.
        let e2 = e.supports(&Program::sum_and_reveal(&ps, "")).unwrap_err();
        assert!(e2.contains("exactly one party"), "{e2}");
        let mut p = Program::sum_and_reveal(&ps, "a");
        p.stages[0].ops.reverse();
        assert!(e
            .supports(&p)
            .unwrap_err()
            .contains("a sum and then a reveal"));
        let mut p = Program::sum_and_reveal(&ps, "a");
        if let Some(r) = p.roles.get_mut("b") {
            r.input = false;
        }
        assert!(e.supports(&p).unwrap_err().contains("b does not"));
        assert!(AdditiveEngine::for_program(&Program::sum_and_reveal(&ps, "b"), "c").is_ok());
    }

    #[test]
    fn each_step_has_its_senders_receivers_and_shape() {
        let ps = abc();
        let shape = TableShape {
            rows: 7,
            widths: vec![Width::Z64, Width::Z128, Width::Z256],
            key_columns: 2,
            key_bytes: 99,
        };
        let leader = AdditiveEngine::new(ps.clone(), "a".into(), "a".into());
        let seeds = leader.expects("b", SEEDS, &shape).unwrap();
        assert_eq!((seeds.rows, seeds.max_cols, seeds.key_bytes), (1, 1, 0));
        assert!(seeds.before_start);
        let result = leader.expects("c", RESULT_SHARES, &shape).unwrap();
        assert_eq!(
            (result.rows, result.max_cols, result.key_bytes),
            (7, 1 + 2 + 4 + 2, 99)
        );
        assert!(!result.before_start);
        // Nothing from itself or from outside, no step it does not have.
        assert!(leader.expects("a", SEEDS, &shape).is_none());
        assert!(leader.expects("z", SEEDS, &shape).is_none());
        assert!(leader.expects("b", Step(2), &shape).is_none());
        // Result shares go to the leader only.
        let peer = AdditiveEngine::new(ps.clone(), "b".into(), "a".into());
        assert!(peer.expects("c", RESULT_SHARES, &shape).is_none());
        assert!(peer.expects("c", SEEDS, &shape).is_some());
    }
}
