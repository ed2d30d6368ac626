//! What a query's secure part is, as an engine sees it: the operators over
//! the shared columns (today a sum, then a reveal) and each party's roles.
//! The planner writes a [`Program`] into every plan (and its fingerprint);
//! an engine says whether it runs it ([`crate::Engine::supports`]) and
//! which messages each step of its protocol carries
//! ([`crate::Engine::expects`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A party's part in one query's secure computation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roles {
    /// Contributes its rows' partials as input.
    pub input: bool,
    /// Holds shares and computes on them.
    pub compute: bool,
    /// Receives the revealed result.
    pub result: bool,
}

impl std::fmt::Display for Roles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.input {
            parts.push("input");
        }
        if self.compute {
            parts.push("compute");
        }
        if self.result {
            parts.push("result");
        }
        if parts.is_empty() {
            parts.push("none");
        }
        f.write_str(&parts.join("+"))
    }
}

/// One operator of the secure part, over the shared columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// The input parties' values, per group and column, summed as shares.
    Sum,
    /// The sums, revealed to the result parties only.
    Reveal,
    /// The smallest of the input parties' values, per group and column
    /// (engine 2; no plan uses it yet).
    Min,
    /// The largest, as [`Op::Min`].
    Max,
}

/// The secure part of one query: its operators in order, and every party's
/// roles (every party of the federation appears, in sorted order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Program {
    pub ops: Vec<Op>,
    pub roles: BTreeMap<String, Roles>,
}

impl Program {
    /// Every party contributes input and computes on shares; `leader`
    /// alone receives the result: today's only shape of a query.
    pub fn sum_and_reveal(parties: &[String], leader: &str) -> Self {
        Program {
            ops: vec![Op::Sum, Op::Reveal],
            roles: parties
                .iter()
                .map(|p| {
                    (
                        p.clone(),
                        Roles {
                            input: true,
                            compute: true,
                            result: p == leader,
                        },
                    )
                })
                .collect(),
        }
    }

    /// The parties with a role, in order.
    pub fn with(&self, role: impl Fn(&Roles) -> bool) -> Vec<String> {
        self.roles
            .iter()
            .filter(|(_, r)| role(r))
            .map(|(p, _)| p.clone())
            .collect()
    }

    pub fn roles_of(&self, party: &str) -> Roles {
        self.roles.get(party).copied().unwrap_or_default()
    }

    /// One line, for EXPLAIN and the fingerprint.
    pub fn describe(&self) -> String {
        let ops: Vec<&str> = self
            .ops
            .iter()
            .map(|o| match o {
                Op::Sum => "sum",
                Op::Reveal => "reveal",
                Op::Min => "min",
                Op::Max => "max",
            })
            .collect();
        let roles: Vec<String> = self.roles.iter().map(|(p, r)| format!("{p}={r}")).collect();
        format!("{}; roles {}", ops.join(" → "), roles.join(", "))
    }
}
