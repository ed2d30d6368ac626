//! Replicated secret sharing among three compute parties (honest
//! majority, **semi-honest**: a party that follows the protocol learns
//! nothing from its messages; one that deviates can change what a circuit
//! reveals, e.g. flip a comparison bit, so every privacy claim here holds
//! only while all three follow it): the protocol layer the comparison
//! engine is built on (issue 13). Written here because no maintained Rust crate
//! provides it; the design follows Araki et al. (CCS'16) and ABY3 (CCS'18),
//! read for ideas only.
//!
//! A value x in Z_2^64 is split as x = x0 + x1 + x2; party i holds the pair
//! (x_i, x_{i+1}) (indices mod 3), so any two parties can reconstruct and
//! any one sees two uniformly random ring elements. Boolean shares are the
//! same with XOR over u64 words: the 64 bits of one value travel in one
//! word, so an AND of two shared words is 64 ANDs at once.
//!
//! Invariants:
//! - Every operator works on whole columns: one network round per circuit
//!   layer for the whole batch, never per value.
//! - Rounds are the transport's numbered [`Step`]s, taken in the same order
//!   at all three parties (the circuits are fixed by the public shapes, not
//!   by the data), so the pairwise PRG streams stay in step and every
//!   message has one known sender, receiver and length.
//! - In every multiplication round a party sends only to the previous
//!   party and receives only from the next, one ring element per product;
//!   the element it sends is masked by a fresh zero-sharing, so it is
//!   uniformly random to its receiver.
//! - A message of the wrong length, type or shape is refused naming the
//!   peer; nothing here panics on what a peer sends.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, UInt64Array};
use rand::{RngCore, SeedableRng, TryRngCore};
use rand_chacha::ChaCha20Rng;

use crate::transport::{Outbound, Step, Transport, BATCH_ROWS};
use crate::ExecError;

/// Arithmetic shares of a column over Z_2^64: this party's pair
/// (x_i, x_{i+1}) for every row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arith {
    pub a: Vec<u64>,
    pub b: Vec<u64>,
}

/// Boolean (XOR) shares of a column of 64-bit words: this party's pair
/// (x_i, x_{i+1}) for every row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bool {
    pub a: Vec<u64>,
    pub b: Vec<u64>,
}

impl Arith {
    pub fn len(&self) -> usize {
        self.a.len()
    }
    pub fn is_empty(&self) -> bool {
        self.a.is_empty()
    }
    pub fn add(&self, o: &Arith) -> Arith {
        Arith {
            a: zip(&self.a, &o.a, u64::wrapping_add),
            b: zip(&self.b, &o.b, u64::wrapping_add),
        }
    }
    pub fn sub(&self, o: &Arith) -> Arith {
        Arith {
            a: zip(&self.a, &o.a, u64::wrapping_sub),
            b: zip(&self.b, &o.b, u64::wrapping_sub),
        }
    }
    /// Times a public constant.
    pub fn scale(&self, k: u64) -> Arith {
        Arith {
            a: self.a.iter().map(|x| x.wrapping_mul(k)).collect(),
            b: self.b.iter().map(|x| x.wrapping_mul(k)).collect(),
        }
    }
}

impl Bool {
    pub fn len(&self) -> usize {
        self.a.len()
    }
    /// The words in `r` (a column of a batch of several).
    pub fn slice(&self, r: std::ops::Range<usize>) -> Bool {
        Bool {
            a: self.a[r.clone()].to_vec(),
            b: self.b[r].to_vec(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.a.is_empty()
    }
    pub fn xor(&self, o: &Bool) -> Bool {
        Bool {
            a: zip(&self.a, &o.a, |x, y| x ^ y),
            b: zip(&self.b, &o.b, |x, y| x ^ y),
        }
    }
    pub fn shl(&self, d: u32) -> Bool {
        self.map(|x| x << d)
    }
    pub fn shr(&self, d: u32) -> Bool {
        self.map(|x| x >> d)
    }
    /// AND with a public mask.
    pub fn mask(&self, m: u64) -> Bool {
        self.map(|x| x & m)
    }
    fn map(&self, f: impl Fn(u64) -> u64) -> Bool {
        Bool {
            a: self.a.iter().map(|&x| f(x)).collect(),
            b: self.b.iter().map(|&x| f(x)).collect(),
        }
    }
}

fn zip(x: &[u64], y: &[u64], f: impl Fn(u64, u64) -> u64) -> Vec<u64> {
    x.iter().zip(y).map(|(&p, &q)| f(p, q)).collect()
}

/// One party's end of a three-party computation for one query.
pub struct Rep3<'t> {
    transport: &'t dyn Transport,
    /// The three compute parties, in the agreed order.
    parties: [String; 3],
    me: usize,
    step: u16,
    /// The PRG stream this party shares with the previous party (its own
    /// seed, which it sent there) and the one it shares with the next
    /// (the next party's seed).
    own: ChaCha20Rng,
    next: ChaCha20Rng,
    /// This party's private randomness (input sharing).
    local: ChaCha20Rng,
    /// What every message of set-up and input carries to bind it to one
    /// plan ([`Bind`]).
    bind: Bind,
}

/// Four words every party derives from the plan it runs (its fingerprint):
/// carried by the set-up round, every input sent to the compute parties
/// and every result forwarded to a party outside them, and checked on
/// arrival, so that parties a dishonest leader started on different plans
/// (say, different minimum group sizes) stop instead of computing
/// together. The set-up goes round the three (each to the previous), so
/// if every receiver's check passes, all three run the same plan.
pub type Bind = [u64; 4];

/// The words of a plan's fingerprint (hex SHA-256), for [`Bind`].
pub fn bind_of(fingerprint: &str) -> Bind {
    let mut out = [0u64; 4];
    for (i, w) in out.iter_mut().enumerate() {
        *w = fingerprint
            .get(16 * i..16 * i + 16)
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    out
}

impl<'t> Rep3<'t> {
    /// Sets up the pairwise PRG streams: each party sends a fresh 256-bit
    /// seed to the previous party at step `first` (the one round of
    /// set-up); later rounds take the steps after it.
    pub async fn setup(
        transport: &'t dyn Transport,
        parties: [String; 3],
        me: &str,
        first: Step,
    ) -> Result<Rep3<'t>, ExecError> {
        Self::setup_bound(transport, parties, me, first, [0; 4]).await
    }

    /// [`Rep3::setup`] for the plan `bind` stands for: the seed's round
    /// carries it, and a party whose next party runs another plan stops.
    pub async fn setup_bound(
        transport: &'t dyn Transport,
        parties: [String; 3],
        me: &str,
        first: Step,
        bind: Bind,
    ) -> Result<Rep3<'t>, ExecError> {
        let me = parties
            .iter()
            .position(|p| p == me)
            .ok_or_else(|| ExecError::Encode(format!("{me} is not a compute party")))?;
        let mut seed = [0u8; 32];
        let mut local_seed = [0u8; 32];
        for s in [&mut seed, &mut local_seed] {
            rand::rngs::OsRng
                .try_fill_bytes(s)
                .map_err(|e| ExecError::Encode(format!("OS randomness failed: {e}")))?;
        }
        let mut r = Rep3 {
            transport,
            parties,
            me,
            step: first.0,
            own: ChaCha20Rng::from_seed(seed),
            next: ChaCha20Rng::from_seed([0; 32]),
            local: ChaCha20Rng::from_seed(local_seed),
            bind,
        };
        let mut seed_words: Vec<u64> = seed
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        seed_words.extend_from_slice(&bind);
        let got = r.exchange(seed_words).await?;
        if got[4..] != bind {
            return Err(ExecError::Malformed {
                peer: r.next_party().to_string(),
                reason: "it runs a different plan (its fingerprint differs from this party's)"
                    .into(),
            });
        }
        let mut next_seed = [0u8; 32];
        for (i, w) in got.iter().take(4).enumerate() {
            next_seed[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
        }
        r.next = ChaCha20Rng::from_seed(next_seed);
        Ok(r)
    }

    fn prev_party(&self) -> &str {
        &self.parties[(self.me + 2) % 3]
    }
    fn next_party(&self) -> &str {
        &self.parties[(self.me + 1) % 3]
    }

    fn take_step(&mut self) -> Result<Step, ExecError> {
        let s = Step(self.step);
        self.step = self
            .step
            .checked_add(1)
            .ok_or_else(|| ExecError::Encode("the circuit has more rounds than steps".into()))?;
        Ok(s)
    }

    /// The steps used so far end before this one.
    pub fn next_step(&self) -> Step {
        Step(self.step)
    }

    /// One round: sends `words` to the previous party and returns as many
    /// from the next.
    async fn exchange(&mut self, words: Vec<u64>) -> Result<Vec<u64>, ExecError> {
        let step = self.take_step()?;
        let n = words.len();
        let (prev, next) = (self.prev_party().to_string(), self.next_party().to_string());
        let t = self.transport;
        let send = async {
            t.send(&prev, step, words_message(words))
                .await
                .map_err(ExecError::from)
        };
        let recv = recv_words(t, &next, step, n);
        let (_, got) = futures::future::try_join(send, recv).await?;
        Ok(got)
    }

    /// Fresh arithmetic shares of zero: the three parties' draws add up to
    /// 0, and each is uniformly random to the other two.
    fn zero_arith(&mut self, n: usize) -> Vec<u64> {
        (0..n)
            .map(|_| self.own.next_u64().wrapping_sub(self.next.next_u64()))
            .collect()
    }

    /// Fresh XOR shares of zero.
    fn zero_bool(&mut self, n: usize) -> Vec<u64> {
        (0..n)
            .map(|_| self.own.next_u64() ^ self.next.next_u64())
            .collect()
    }

    /// Shares `owner`'s column of `n` values among the three (one round:
    /// the owner sends each other party its pair). `values` is `Some` at
    /// the owner only.
    pub async fn input(
        &mut self,
        owner: usize,
        values: Option<&[u64]>,
        n: usize,
    ) -> Result<Arith, ExecError> {
        let step = self.take_step()?;
        let owner_name = self
            .parties
            .get(owner)
            .cloned()
            .ok_or_else(|| ExecError::Encode(format!("no compute party {owner}")))?;
        if self.me != owner {
            let w = recv_words(self.transport, &owner_name, step, 2 * n).await?;
            let (a, b) = w.split_at(n);
            return Ok(Arith {
                a: a.to_vec(),
                b: b.to_vec(),
            });
        }
        let values = values
            .filter(|v| v.len() == n)
            .ok_or_else(|| ExecError::Encode(format!("the owner's input is not {n} values")))?;
        let x0: Vec<u64> = (0..n).map(|_| self.local.next_u64()).collect();
        let x1: Vec<u64> = (0..n).map(|_| self.local.next_u64()).collect();
        let x2: Vec<u64> = (0..n)
            .map(|k| values[k].wrapping_sub(x0[k]).wrapping_sub(x1[k]))
            .collect();
        let parts = [x0, x1, x2];
        let pair = |j: usize| (parts[j].clone(), parts[(j + 1) % 3].clone());
        let t = self.transport;
        let sends = (1..3).map(|d| {
            let j = (owner + d) % 3;
            let (a, b) = pair(j);
            let to = self.parties[j].clone();
            async move {
                let mut w = a;
                w.extend(b);
                t.send(&to, step, words_message(w))
                    .await
                    .map_err(ExecError::from)
            }
        });
        futures::future::try_join_all(sends).await?;
        let (a, b) = pair(owner);
        Ok(Arith { a, b })
    }

    /// Reveals `x` to compute party `to` only (one round: the party after
    /// it sends the component it lacks). `Some` at `to`, `None` elsewhere.
    pub async fn reveal_to(&mut self, x: &Arith, to: usize) -> Result<Option<Vec<u64>>, ExecError> {
        if to >= 3 {
            return Err(ExecError::Encode(format!("no compute party {to}")));
        }
        let step = self.take_step()?;
        let n = x.len();
        if self.me == (to + 1) % 3 {
            let dest = self.parties[to % 3].clone();
            self.transport
                .send(&dest, step, words_message(x.b.clone()))
                .await?;
            return Ok(None);
        }
        if self.me != to {
            return Ok(None);
        }
        let next = self.next_party().to_string();
        let third = recv_words(self.transport, &next, step, n).await?;
        Ok(Some(
            (0..n)
                .map(|k| x.a[k].wrapping_add(x.b[k]).wrapping_add(third[k]))
                .collect(),
        ))
    }

    /// Reveals `x` to `to`, a party that does not compute (one round: each
    /// compute party sends its first component plus a fresh zero-sharing,
    /// so the three words `to` receives per value are uniformly random but
    /// for their sum, x). The outsider reads them with [`recv_revealed`].
    pub async fn reveal_to_outsider(&mut self, x: &Arith, to: &str) -> Result<(), ExecError> {
        if self.parties.iter().any(|p| p == to) {
            return Err(ExecError::Encode(format!("{to} is a compute party")));
        }
        let step = self.take_step()?;
        let zero = self.zero_arith(x.len());
        let words: Vec<u64> =
            x.a.iter()
                .zip(&zero)
                .map(|(v, z)| v.wrapping_add(*z))
                .collect();
        self.transport.send(to, step, words_message(words)).await?;
        Ok(())
    }

    /// A step of the schedule with no message for this circuit (an input
    /// step of a party that has no input): every party skips it alike.
    pub fn skip_step(&mut self) -> Result<(), ExecError> {
        self.take_step().map(|_| ())
    }

    /// Reveals `x` to all three (one round).
    pub async fn reveal_all(&mut self, x: &Arith) -> Result<Vec<u64>, ExecError> {
        let third = self.exchange(x.b.clone()).await?;
        Ok((0..x.len())
            .map(|k| x.a[k].wrapping_add(x.b[k]).wrapping_add(third[k]))
            .collect())
    }

    /// Reveals boolean shares to all three (one round).
    pub async fn reveal_bool_all(&mut self, x: &Bool) -> Result<Vec<u64>, ExecError> {
        let third = self.exchange(x.b.clone()).await?;
        Ok((0..x.len()).map(|k| x.a[k] ^ x.b[k] ^ third[k]).collect())
    }

    /// Products of pairs of columns, all in one round.
    pub async fn mul_many(&mut self, pairs: &[(&Arith, &Arith)]) -> Result<Vec<Arith>, ExecError> {
        let pairs: Vec<_> = pairs
            .iter()
            .map(|(x, y)| ([&x.a[..], &x.b[..]], [&y.a[..], &y.b[..]]))
            .collect();
        let out = self.product_round(&pairs, false).await?;
        Ok(out.into_iter().map(|(a, b)| Arith { a, b }).collect())
    }

    /// One round of products (over Z_2^64, or ANDs of words with
    /// `boolean`): each party's cross terms x_i·y_i + x_i·y_{i+1} +
    /// x_{i+1}·y_i, masked by a fresh zero-sharing, go to the previous
    /// party; the next party's come back as the second half of each pair.
    async fn product_round(
        &mut self,
        pairs: &[([&[u64]; 2], [&[u64]; 2])],
        boolean: bool,
    ) -> Result<Vec<(Vec<u64>, Vec<u64>)>, ExecError> {
        let mut lens = Vec::with_capacity(pairs.len());
        for ([xa, xb], [ya, yb]) in pairs {
            check_len(xa.len(), ya.len())?;
            check_len(xb.len(), yb.len())?;
            check_len(xa.len(), xb.len())?;
            lens.push(xa.len());
        }
        let total: usize = lens.iter().sum();
        let mut z = if boolean {
            self.zero_bool(total)
        } else {
            self.zero_arith(total)
        };
        let mut at = 0;
        for ([xa, xb], [ya, yb]) in pairs {
            for k in 0..xa.len() {
                let v = &mut z[at + k];
                *v = if boolean {
                    *v ^ (xa[k] & ya[k]) ^ (xa[k] & yb[k]) ^ (xb[k] & ya[k])
                } else {
                    v.wrapping_add(
                        xa[k]
                            .wrapping_mul(ya[k])
                            .wrapping_add(xa[k].wrapping_mul(yb[k]))
                            .wrapping_add(xb[k].wrapping_mul(ya[k])),
                    )
                };
            }
            at += xa.len();
        }
        let got = self.exchange(z.clone()).await?;
        Ok(split(&z, &got, &lens).collect())
    }

    pub async fn mul(&mut self, x: &Arith, y: &Arith) -> Result<Arith, ExecError> {
        let mut v = self.mul_many(&[(x, y)]).await?;
        v.pop()
            .ok_or_else(|| ExecError::Encode("a product went missing".into()))
    }

    /// ANDs of pairs of word columns, all in one round.
    pub async fn and_many(&mut self, pairs: &[(&Bool, &Bool)]) -> Result<Vec<Bool>, ExecError> {
        let pairs: Vec<_> = pairs
            .iter()
            .map(|(x, y)| ([&x.a[..], &x.b[..]], [&y.a[..], &y.b[..]]))
            .collect();
        let out = self.product_round(&pairs, true).await?;
        Ok(out.into_iter().map(|(a, b)| Bool { a, b }).collect())
    }

    pub async fn and(&mut self, x: &Bool, y: &Bool) -> Result<Bool, ExecError> {
        let mut v = self.and_many(&[(x, y)]).await?;
        v.pop()
            .ok_or_else(|| ExecError::Encode("an AND went missing".into()))
    }

    /// The additive component `j` of `x` as boolean shares that only its
    /// two holders fill in (no round).
    fn component(&self, x: &[u64], xb: &[u64], j: usize) -> Bool {
        let n = x.len();
        let zero = || vec![0u64; n];
        if j == self.me {
            Bool {
                a: x.to_vec(),
                b: zero(),
            }
        } else if j == (self.me + 1) % 3 {
            Bool {
                a: zero(),
                b: xb.to_vec(),
            }
        } else {
            Bool {
                a: zero(),
                b: zero(),
            }
        }
    }

    /// Arithmetic to boolean: the bits of each x, as XOR shares of its
    /// word. The three components are added as binary numbers: a
    /// carry-save layer (one round), then a Kogge–Stone parallel-prefix
    /// adder over the 64 bits (seven rounds): eight rounds for any number
    /// of rows.
    pub async fn a2b(&mut self, x: &Arith) -> Result<Bool, ExecError> {
        let [c0, c1, c2] = [0, 1, 2].map(|j| self.component(&x.a, &x.b, j));
        // Full adder: sum s = c0 ^ c1 ^ c2; carry = maj(c0, c1, c2)
        // = ((c0 ^ c2) & (c1 ^ c2)) ^ c2, moved up one bit.
        let s = c0.xor(&c1).xor(&c2);
        let maj = self.and(&c0.xor(&c2), &c1.xor(&c2)).await?.xor(&c2);
        let carry = maj.shl(1);
        self.add_bits(&s, &carry).await
    }

    /// s + t as binary numbers over XOR-shared words (the Kogge–Stone
    /// adder: generate and propagate, six prefix levels).
    async fn add_bits(&mut self, s: &Bool, t: &Bool) -> Result<Bool, ExecError> {
        let p0 = s.xor(t);
        let mut g = self.and(s, t).await?;
        let mut p = p0.clone();
        for level in 0..6 {
            let d = 1u32 << level;
            let (gs, ps) = (g.shl(d), p.shl(d));
            if level < 5 {
                let mut v = self.and_many(&[(&p, &gs), (&p, &ps)]).await?;
                let np = v.pop().ok_or_else(|| ExecError::Encode("missing".into()))?;
                let pg = v.pop().ok_or_else(|| ExecError::Encode("missing".into()))?;
                g = g.xor(&pg);
                p = np;
            } else {
                g = g.xor(&self.and(&p, &gs).await?);
            }
        }
        // g holds the carry out of every bit; the carry into bit i is the
        // carry out of bit i - 1.
        Ok(p0.xor(&g.shl(1)))
    }

    /// x < y for signed values whose difference does not wrap (|x|, |y| <
    /// 2^62): the sign bit of x − y, as XOR shares of 0 or 1 in the lowest
    /// bit of each word.
    pub async fn less_than(&mut self, x: &Arith, y: &Arith) -> Result<Bool, ExecError> {
        check_len(x.len(), y.len())?;
        Ok(self.a2b(&x.sub(y)).await?.shr(63))
    }

    /// A shared bit (the lowest bit of each word) as an arithmetic 0 or 1:
    /// b = b0 ^ b1 ^ b2, each component arithmetically shared by its two
    /// holders, combined by u ^ v = u + v − 2uv (two rounds).
    pub async fn bit_to_arith(&mut self, b: &Bool) -> Result<Arith, ExecError> {
        let bit = b.mask(1);
        let [c0, c1, c2] = [0, 1, 2].map(|j| {
            let c = self.component(&bit.a, &bit.b, j);
            Arith { a: c.a, b: c.b }
        });
        let uv = self.mul(&c0, &c1).await?;
        let d = c0.add(&c1).sub(&uv.scale(2));
        let dw = self.mul(&d, &c2).await?;
        Ok(d.add(&c2).sub(&dw.scale(2)))
    }

    /// c ? x : y for an arithmetic bit c (one round).
    pub async fn select(&mut self, c: &Arith, x: &Arith, y: &Arith) -> Result<Arith, ExecError> {
        let diff = x.sub(y);
        Ok(y.add(&self.mul(c, &diff).await?))
    }
}

impl Rep3<'_> {
    /// The smallest (or with `max`, the largest) of several columns, row
    /// by row: a tournament of ⌈log2 k⌉ levels, every comparison of a level
    /// in one batch (eleven rounds a level: compare, the bit as a ring
    /// element, select). Which column held the extreme is never revealed.
    /// Values as for [`Rep3::less_than`].
    pub async fn extreme(&mut self, cols: Vec<Arith>, max: bool) -> Result<Arith, ExecError> {
        let n = cols.first().map(Arith::len).unwrap_or(0);
        if cols.is_empty() || cols.iter().any(|c| c.len() != n || c.b.len() != n) {
            return Err(ExecError::Encode(
                "extreme of no columns, or of columns of different lengths".into(),
            ));
        }
        let mut cols = cols;
        while cols.len() > 1 {
            let odd = if cols.len() % 2 == 1 {
                cols.pop()
            } else {
                None
            };
            let right = cols.split_off(cols.len() / 2);
            let (l, r) = (concat(&cols), concat(&right));
            let lt = self.less_than(&l, &r).await?;
            let c = self.bit_to_arith(&lt).await?;
            let pick = if max {
                self.select(&c, &r, &l).await?
            } else {
                self.select(&c, &l, &r).await?
            };
            cols = (0..right.len())
                .map(|k| Arith {
                    a: pick.a[k * n..(k + 1) * n].to_vec(),
                    b: pick.b[k * n..(k + 1) * n].to_vec(),
                })
                .collect();
            cols.extend(odd);
        }
        cols.pop()
            .ok_or_else(|| ExecError::Encode("no column left".into()))
    }
}

impl Rep3<'_> {
    /// A public column as shares (component 0 holds it; no round).
    pub fn constant(&self, values: &[u64]) -> Arith {
        let c = self.component(values, values, 0);
        Arith { a: c.a, b: c.b }
    }

    /// Whether each x is at least the public `k` (x, k as for
    /// [`Rep3::less_than`]): XOR shares of 1 or 0 in the lowest bit. A
    /// minimum group size compares the shared counts so; only the bits
    /// are revealed, and then only the passing groups' totals.
    pub async fn at_least(&mut self, x: &Arith, k: i64) -> Result<Bool, ExecError> {
        self.at_least_each(x, &vec![k; x.len()]).await
    }

    /// Whether each x is at least its own public bound (as
    /// [`Rep3::at_least`], one bound per value, all in one comparison).
    pub async fn at_least_each(&mut self, x: &Arith, k: &[i64]) -> Result<Bool, ExecError> {
        check_len(x.len(), k.len())?;
        if let Some(k) = k
            .iter()
            .find(|k| k.unsigned_abs() > crate::replicated::COMPARE_BOUND as u64)
        {
            return Err(ExecError::Encode(format!(
                "a threshold of {k} is beyond ±(2^62 − 1)"
            )));
        }
        let k: Vec<u64> = k.iter().map(|&k| k as u64).collect();
        let k = self.constant(&k);
        let below = self.less_than(x, &k).await?;
        Ok(self.not_bit(&below))
    }

    /// The lowest bit flipped (a public XOR with 1 on component 0).
    pub fn not_bit(&self, b: &Bool) -> Bool {
        let one = self.component(&vec![1; b.len()], &vec![1; b.len()], 0);
        b.xor(&one).mask(1)
    }

    /// The inputs of data parties that do not compute, all at one step:
    /// each sends every compute party its pair ([`send_input`]).
    pub async fn inputs_from(
        &mut self,
        owners: &[String],
        n: usize,
    ) -> Result<Vec<Arith>, ExecError> {
        let step = self.take_step()?;
        let t = self.transport;
        let bind = self.bind;
        let got = futures::future::try_join_all(owners.iter().map(|o| async move {
            let w = recv_words(t, o, step, 2 * n + 4).await?;
            if w[2 * n..] != bind {
                return Err(ExecError::Malformed {
                    peer: o.clone(),
                    reason: "it runs a different plan (its fingerprint differs from this party's)"
                        .into(),
                });
            }
            Ok(w)
        }))
        .await?;
        Ok(got
            .into_iter()
            .map(|w| Arith {
                a: w[..n].to_vec(),
                b: w[n..2 * n].to_vec(),
            })
            .collect())
    }
}

/// What a party that does not compute receives of a reveal at `step`
/// ([`Rep3::reveal_to_outsider`]): the sum of the three compute parties'
/// words, `n` from each.
pub async fn recv_revealed(
    transport: &dyn Transport,
    parties: &[String; 3],
    step: Step,
    n: usize,
) -> Result<Vec<u64>, ExecError> {
    let parts =
        futures::future::try_join_all(parties.iter().map(|p| recv_words(transport, p, step, n)))
            .await?;
    Ok((0..n)
        .map(|k| parts.iter().fold(0u64, |acc, w| acc.wrapping_add(w[k])))
        .collect())
}

/// A data party that does not compute shares `values` among the three
/// compute parties at `step` (the step at which they call
/// [`Rep3::inputs_from`]).
pub async fn send_input(
    transport: &dyn Transport,
    parties: &[String; 3],
    step: Step,
    values: &[u64],
    bind: &Bind,
) -> Result<(), ExecError> {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut seed)
        .map_err(|e| ExecError::Encode(format!("OS randomness failed: {e}")))?;
    let mut rng = ChaCha20Rng::from_seed(seed);
    let n = values.len();
    let x0: Vec<u64> = (0..n).map(|_| rng.next_u64()).collect();
    let x1: Vec<u64> = (0..n).map(|_| rng.next_u64()).collect();
    let x2: Vec<u64> = (0..n)
        .map(|k| values[k].wrapping_sub(x0[k]).wrapping_sub(x1[k]))
        .collect();
    let parts = [x0, x1, x2];
    futures::future::try_join_all((0..3).map(|j| {
        let mut w = parts[j].clone();
        w.extend_from_slice(&parts[(j + 1) % 3]);
        w.extend_from_slice(bind);
        async move {
            transport
                .send(&parties[j], step, words_message(w))
                .await
                .map_err(ExecError::from)
        }
    }))
    .await?;
    Ok(())
}

fn concat(cols: &[Arith]) -> Arith {
    Arith {
        a: cols.iter().flat_map(|c| c.a.iter().copied()).collect(),
        b: cols.iter().flat_map(|c| c.b.iter().copied()).collect(),
    }
}

fn check_len(x: usize, y: usize) -> Result<(), ExecError> {
    if x == y {
        Ok(())
    } else {
        Err(ExecError::Encode(format!("columns of {x} and {y} rows")))
    }
}

/// Pairs (mine, received) cut back into the columns of `lens` rows.
fn split<'a>(
    mine: &'a [u64],
    got: &'a [u64],
    lens: &'a [usize],
) -> impl Iterator<Item = (Vec<u64>, Vec<u64>)> + 'a {
    let mut at = 0;
    lens.iter().map(move |&n| {
        let r = (mine[at..at + n].to_vec(), got[at..at + n].to_vec());
        at += n;
        r
    })
}

/// Words as a message (`words_message`), for protocols built on this one.
pub fn words_outbound(words: Vec<u64>) -> Outbound {
    words_message(words)
}

/// Reads exactly `n` words from `from` at `step` (`recv_words`).
pub async fn recv_words_from(
    t: &dyn Transport,
    from: &str,
    step: Step,
    n: usize,
) -> Result<Vec<u64>, ExecError> {
    recv_words(t, from, step, n).await
}

/// A round's words as a message: one UInt64 column `w`, in batches.
fn words_message(words: Vec<u64>) -> Outbound {
    let n = words.len();
    let words = Arc::new(words);
    let starts = (0..n.max(1)).step_by(BATCH_ROWS);
    Outbound::new(
        n,
        starts.map(move |s| {
            let part = words.get(s..(s + BATCH_ROWS).min(n)).unwrap_or(&[]);
            let col: ArrayRef = Arc::new(UInt64Array::from(part.to_vec()));
            RecordBatch::try_from_iter([("w", col)])
        }),
    )
}

/// Reads exactly `n` words from `from` at `step`.
async fn recv_words(
    t: &dyn Transport,
    from: &str,
    step: Step,
    n: usize,
) -> Result<Vec<u64>, ExecError> {
    let bad = |reason: String| ExecError::Malformed {
        peer: from.to_string(),
        reason,
    };
    let mut inbound = t.recv(from, step).await?;
    let mut out = Vec::with_capacity(n);
    while let Some(b) = inbound.next().await? {
        if b.num_columns() != 1 || b.schema().field(0).name() != "w" {
            return Err(bad("expected one UInt64 column `w`".into()));
        }
        let a = b
            .column(0)
            .as_any()
            .downcast_ref::<UInt64Array>()
            .filter(|a| a.null_count() == 0)
            .ok_or_else(|| bad("the column `w` is not UInt64 without nulls".into()))?;
        if out.len() + a.len() > n {
            return Err(bad(format!("more than the {n} words of {step}")));
        }
        out.extend_from_slice(a.values());
    }
    if out.len() != n {
        return Err(bad(format!(
            "{} words where {n} belong at {step}",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::InMemoryNetwork;
    use rand::Rng;
    use std::time::Duration;

    fn names() -> [String; 3] {
        ["p0", "p1", "p2"].map(String::from)
    }

    /// Runs `f` at all three parties and returns their outputs.
    async fn run3<F, Fut, T>(f: F) -> Vec<T>
    where
        F: Fn(usize, Rep3<'static>) -> Fut + Send + Sync + 'static + Clone,
        Fut: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let net = InMemoryNetwork::connect(&names(), Duration::from_secs(20));
        let mut tasks = Vec::new();
        for (i, t) in net.into_iter().enumerate() {
            let f = f.clone();
            // Leaked for the test's lifetime: each party's transport.
            let t: &'static crate::transport::InMemoryTransport = Box::leak(Box::new(t));
            tasks.push(tokio::spawn(async move {
                let r = Rep3::setup(t, names(), &names()[i], Step(0)).await.unwrap();
                f(i, r).await
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    fn sample(n: usize, seed: u64, bound: Option<i64>) -> Vec<u64> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let edges: Vec<i64> = match bound {
            None => vec![0, -1, 1, i64::MAX, i64::MIN],
            Some(b) => vec![0, -1, 1, b, -b],
        };
        (0..n)
            .map(|k| {
                let v = match (edges.get(k), bound) {
                    (Some(&e), _) => e,
                    (None, None) => rng.random::<i64>(),
                    (None, Some(b)) => rng.random_range(-b..=b),
                };
                v as u64
            })
            .collect()
    }

    #[tokio::test]
    async fn products_ands_and_reveals_match_plaintext() {
        let n = 300;
        let (x, y) = (sample(n, 1, None), sample(n, 2, None));
        let (xc, yc) = (x.clone(), y.clone());
        let out = run3(move |i, mut r| {
            let (x, y) = (xc.clone(), yc.clone());
            async move {
                let sx = r.input(0, (i == 0).then_some(&x[..]), n).await.unwrap();
                let sy = r.input(2, (i == 2).then_some(&y[..]), n).await.unwrap();
                let prod = r.mul(&sx, &sy).await.unwrap();
                let sum = sx.add(&sy);
                let to1 = r.reveal_to(&prod, 1).await.unwrap();
                let all = r.reveal_all(&sum).await.unwrap();
                let bx = Bool {
                    a: sx.a.clone(),
                    b: sx.b.clone(),
                };
                let by = Bool {
                    a: sy.a.clone(),
                    b: sy.b.clone(),
                };
                // Arithmetic shares read as XOR shares are shares of some
                // other word; AND them and compare with the plaintext AND of
                // those words.
                let and = r.and(&bx, &by).await.unwrap();
                let bxw = r.reveal_bool_all(&bx).await.unwrap();
                let byw = r.reveal_bool_all(&by).await.unwrap();
                let andw = r.reveal_bool_all(&and).await.unwrap();
                (to1, all, bxw, byw, andw)
            }
        })
        .await;
        let expect_prod: Vec<u64> = (0..n).map(|k| x[k].wrapping_mul(y[k])).collect();
        let expect_sum: Vec<u64> = (0..n).map(|k| x[k].wrapping_add(y[k])).collect();
        assert_eq!(out[1].0.as_ref(), Some(&expect_prod));
        assert!(out[0].0.is_none() && out[2].0.is_none());
        for o in &out {
            assert_eq!(o.1, expect_sum);
            let and: Vec<u64> = (0..n).map(|k| o.2[k] & o.3[k]).collect();
            assert_eq!(o.4, and);
        }
    }

    #[tokio::test]
    async fn bits_comparisons_and_selects_match_plaintext() {
        let n = 200;
        let bound = (1i64 << 62) - 1;
        let (x, y) = (sample(n, 3, Some(bound)), sample(n, 4, Some(bound)));
        // Ties too.
        let y: Vec<u64> = y
            .iter()
            .enumerate()
            .map(|(k, &v)| if k % 7 == 0 { x[k] } else { v })
            .collect();
        let (xc, yc) = (x.clone(), y.clone());
        let full = sample(n, 5, None);
        let fc = full.clone();
        let out = run3(move |i, mut r| {
            let (x, y, full) = (xc.clone(), yc.clone(), fc.clone());
            async move {
                let sx = r.input(1, (i == 1).then_some(&x[..]), n).await.unwrap();
                let sy = r.input(2, (i == 2).then_some(&y[..]), n).await.unwrap();
                let sf = r.input(0, (i == 0).then_some(&full[..]), n).await.unwrap();
                let bits = r.a2b(&sf).await.unwrap();
                let lt = r.less_than(&sx, &sy).await.unwrap();
                let lt_a = r.bit_to_arith(&lt).await.unwrap();
                let min = r.select(&lt_a, &sx, &sy).await.unwrap();
                (
                    r.reveal_bool_all(&bits).await.unwrap(),
                    r.reveal_bool_all(&lt).await.unwrap(),
                    r.reveal_all(&lt_a).await.unwrap(),
                    r.reveal_all(&min).await.unwrap(),
                )
            }
        })
        .await;
        let lt: Vec<u64> = (0..n)
            .map(|k| ((x[k] as i64) < (y[k] as i64)) as u64)
            .collect();
        let min: Vec<u64> = (0..n)
            .map(|k| (x[k] as i64).min(y[k] as i64) as u64)
            .collect();
        for o in &out {
            assert_eq!(o.0, full, "bit decomposition");
            assert_eq!(o.1, lt, "comparison bits");
            assert_eq!(o.2, lt, "the bits as ring elements");
            assert_eq!(o.3, min, "select");
        }
    }

    #[tokio::test]
    async fn a_short_or_mistyped_round_is_refused_naming_the_peer() {
        let net = InMemoryNetwork::connect(&names(), Duration::from_secs(5));
        let mut net = net.into_iter();
        let (t0, t1) = (net.next().unwrap(), net.next().unwrap());
        // p1 plays honest set-up towards p0, then sends 2 words where 3
        // belong. p0 receives from p1 (its next party).
        let seed = words_message(vec![1, 2, 3, 4, 0, 0, 0, 0]);
        t1.send("p0", Step(0), seed).await.unwrap();
        t1.send("p0", Step(1), words_message(vec![7, 7]))
            .await
            .unwrap();
        let t0: &'static _ = Box::leak(Box::new(t0));
        let mut r = Rep3::setup(t0, names(), "p0", Step(0)).await;
        // p0's own seed goes to p2, which is not listening: the in-memory
        // network queues it.
        let r = r.as_mut().unwrap();
        let x = Arith {
            a: vec![1, 2, 3],
            b: vec![4, 5, 6],
        };
        let e = r.mul(&x, &x).await.unwrap_err().to_string();
        assert!(
            e.contains("peer p1") && e.contains("2 words where 3 belong"),
            "{e}"
        );
        // A next party bound to another plan stops the set-up.
        let net = InMemoryNetwork::connect(&names(), Duration::from_secs(5));
        let mut net = net.into_iter();
        let (t0, t1) = (net.next().unwrap(), net.next().unwrap());
        t1.send("p0", Step(0), words_message(vec![1, 2, 3, 4, 9, 9, 9, 9]))
            .await
            .unwrap();
        let t0: &'static _ = Box::leak(Box::new(t0));
        let e = Rep3::setup_bound(t0, names(), "p0", Step(0), bind_of(&"ab".repeat(32)))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("peer p1") && e.contains("different plan"), "{e}");
        assert_eq!(
            bind_of(&"0".repeat(63))[3],
            0,
            "a short fingerprint still binds"
        );
    }

    /// What a party receives in a multiplication round (the `b` half of its
    /// product shares is exactly the next party's message) looks uniform
    /// whatever the inputs: every bit position is balanced within six
    /// standard deviations, for all-zero inputs and for all-ones inputs.
    #[tokio::test]
    async fn a_partys_view_of_a_product_is_uniform_whatever_the_inputs() {
        let n = 4096;
        for word in [0u64, u64::MAX] {
            let out = run3(move |i, mut r| async move {
                let v = vec![word; n];
                let sx = r.input(0, (i == 0).then_some(&v[..]), n).await.unwrap();
                let prod = r.mul(&sx, &sx).await.unwrap();
                let bx = Bool {
                    a: sx.a.clone(),
                    b: sx.b.clone(),
                };
                let and = r.and(&bx, &bx).await.unwrap();
                (prod.b, and.b)
            })
            .await;
            let sigma = (n as f64).sqrt() / 2.0;
            for (party, (prod, and)) in out.iter().enumerate() {
                for (what, view) in [("product", prod), ("and", and)] {
                    for bit in 0..64 {
                        let ones = view.iter().filter(|w| (*w >> bit) & 1 == 1).count() as f64;
                        let z = (ones - n as f64 / 2.0) / sigma;
                        assert!(
                            z.abs() < 6.0,
                            "party {party}, {what}, input {word:#x}, bit {bit}: {ones} ones of {n}"
                        );
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn the_extreme_of_many_columns_matches_plaintext() {
        let n = 50;
        let bound = (1i64 << 62) - 1;
        for k in [1usize, 2, 3, 5] {
            let cols: Vec<Vec<u64>> = (0..k)
                .map(|c| sample(n, 10 + c as u64, Some(bound)))
                .collect();
            // Ties across columns in some rows.
            let cols: Vec<Vec<u64>> = cols
                .iter()
                .map(|c| {
                    c.iter()
                        .enumerate()
                        .map(|(r, &v)| if r % 5 == 4 { 42 } else { v })
                        .collect()
                })
                .collect();
            let cc = cols.clone();
            let out = run3(move |i, mut r| {
                let cols = cc.clone();
                async move {
                    let mut shared = Vec::new();
                    for (c, v) in cols.iter().enumerate() {
                        let owner = c % 3;
                        shared.push(
                            r.input(owner, (i == owner).then_some(&v[..]), n)
                                .await
                                .unwrap(),
                        );
                    }
                    let lo = r.extreme(shared.clone(), false).await.unwrap();
                    let hi = r.extreme(shared, true).await.unwrap();
                    (
                        r.reveal_all(&lo).await.unwrap(),
                        r.reveal_all(&hi).await.unwrap(),
                    )
                }
            })
            .await;
            let signed = |r: usize| cols.iter().map(move |c| c[r] as i64);
            let lo: Vec<u64> = (0..n).map(|r| signed(r).min().unwrap() as u64).collect();
            let hi: Vec<u64> = (0..n).map(|r| signed(r).max().unwrap() as u64).collect();
            for o in &out {
                assert_eq!((&o.0, &o.1), (&lo, &hi), "{k} columns");
            }
        }
    }

    /// Five data parties, three of which compute: the other two share their
    /// counts in; a minimum group size of 10 keeps only the groups whose
    /// summed count reaches it, and only their totals are revealed.
    #[tokio::test]
    async fn outside_inputs_and_a_minimum_group_size() {
        let all: Vec<String> = ["p0", "p1", "p2", "d3", "d4"].map(String::from).to_vec();
        let n = 6;
        let counts: Vec<Vec<u64>> = vec![
            vec![0, 1, 5, 3, 0, 9],
            vec![0, 2, 5, 3, 0, 0],
            vec![0, 3, 0, 3, 10, 0],
            vec![0, 0, 0, 0, 0, 1],
            vec![0, 3, 0, 1, 0, 0],
        ];
        let net = InMemoryNetwork::connect(&all, Duration::from_secs(20));
        let mut tasks = Vec::new();
        for (i, t) in net.into_iter().enumerate() {
            let t: &'static crate::transport::InMemoryTransport = Box::leak(Box::new(t));
            let (counts, all) = (counts.clone(), all.clone());
            tasks.push(tokio::spawn(async move {
                if i >= 3 {
                    // After the compute parties' set-up step.
                    send_input(t, &names(), Step(1), &counts[i], &[0; 4])
                        .await
                        .unwrap();
                    return None;
                }
                let mut r = Rep3::setup(t, names(), &names()[i], Step(0)).await.unwrap();
                let outside = r.inputs_from(&all[3..], n).await.unwrap();
                let mut total = outside[0].add(&outside[1]);
                for c in 0..3 {
                    let x = r
                        .input(c, (i == c).then_some(&counts[c][..]), n)
                        .await
                        .unwrap();
                    total = total.add(&x);
                }
                let keep = r.at_least(&total, 10).await.unwrap();
                let keep = r.reveal_bool_all(&keep).await.unwrap();
                let rows: Vec<usize> = (0..n).filter(|&g| keep[g] == 1).collect();
                let kept = Arith {
                    a: rows.iter().map(|&g| total.a[g]).collect(),
                    b: rows.iter().map(|&g| total.b[g]).collect(),
                };
                Some((keep, r.reveal_to(&kept, 0).await.unwrap()))
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        let sums: Vec<u64> = (0..n).map(|g| counts.iter().map(|c| c[g]).sum()).collect();
        assert_eq!(sums, [0, 9, 10, 10, 10, 10]);
        let (keep, revealed) = out[0].clone().unwrap();
        assert_eq!(keep, [0, 0, 1, 1, 1, 1]);
        assert_eq!(revealed, Some(vec![10, 10, 10, 10]));
        assert_eq!(out[1].as_ref().unwrap().1, None);
        assert!(out[3].is_none() && out[4].is_none());
    }
}
