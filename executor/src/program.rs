//! What a query's secure part is, as an engine sees it: one or more
//! stages, each a list of operators over consecutive shared columns (a sum
//! then a reveal; a minimum then a reveal), and each party's roles. The
//! planner writes a [`Program`] into every plan (and its fingerprint) and
//! picks the operators of each stage, and so its engine; an engine says
//! whether it runs a stage ([`crate::Engine::supports`]) and which messages
//! each step of its protocol carries ([`crate::Engine::expects`]). A
//! program of several stages runs as a [`crate::Pipeline`].

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
    /// (the replicated engine: a comparison needs an honest majority of
    /// three compute parties). A largest value is the negated smallest of
    /// the negated values, so plans use only this.
    Min,
    /// The largest, as [`Op::Min`] (the engine runs it; plans do not emit it).
    Max,
    /// A gate ([`crate::gate`]): whether each group meets every one of the
    /// stage's [`Bound`]s (a minimum group size, HAVING over shared totals),
    /// one column each; only the AND of them, the pass bit, is revealed,
    /// to every party.
    Pass,
}

/// One condition of a gate: its column's total over the input parties is
/// at least `at_least`. A column is a party's own partial, or its negation
/// for an upper bound, so every condition of a gate has this one form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bound {
    pub at_least: i64,
    /// Whether the result party's rows count. Not for a minimum group
    /// size: the querying party knows its own rows, so counting them
    /// would let it learn one row of another party's (9 of its own and 1
    /// of theirs reaching 10), and it could inflate them. For HAVING, as
    /// SQL has it, every party's rows count.
    pub result_party: bool,
}

/// A run of operators over `columns` consecutive shared columns (after
/// those of the stages before it), run by one engine among its `compute`
/// parties (sorted): every input party for a sum, three chosen parties
/// for a comparison, to which the other input parties send their shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    pub ops: Vec<Op>,
    pub columns: usize,
    pub compute: Vec<String>,
    /// A gate's conditions, one per column (empty for every other stage,
    /// and then not serialised, so that other stages' fingerprints do not
    /// change).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bounds: Vec<Bound>,
}

impl Stage {
    /// Whether the stage compares, and so needs an honest majority among
    /// its three compute parties.
    pub fn compares(&self) -> bool {
        self.ops
            .iter()
            .any(|o| matches!(o, Op::Min | Op::Max | Op::Pass))
    }

    /// The conditions of a gate stage.
    pub fn gate(&self) -> Option<&[Bound]> {
        match self.ops[..] {
            [Op::Pass, Op::Reveal] => Some(&self.bounds),
            _ => None,
        }
    }

    /// The security model of the stage, for EXPLAIN and policies.
    pub fn model(&self) -> &'static str {
        if self.compares() {
            "honest majority among the three compute parties (semi-honest)"
        } else {
            "any coalition short of all parties (semi-honest)"
        }
    }
}

/// The secure part of one query: its stages in order, and every party's
/// roles (every party of the federation appears, in sorted order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Program {
    pub stages: Vec<Stage>,
    pub roles: BTreeMap<String, Roles>,
}

impl Program {
    /// Every party contributes input and computes on shares; `leader`
    /// alone receives the result. One stage, a sum then a reveal, over
    /// every shared column (an engine of a one-stage program takes every
    /// column it is given; `columns` counts them for a [`crate::Pipeline`]
    /// and EXPLAIN, and is 0 here where they are not known).
    pub fn sum_and_reveal(parties: &[String], leader: &str) -> Self {
        let mut compute = parties.to_vec();
        compute.sort();
        Self::with_stages(
            parties,
            &[],
            leader,
            vec![Stage {
                ops: vec![Op::Sum, Op::Reveal],
                columns: 0,
                compute,
                bounds: Vec::new(),
            }],
        )
    }

    /// Every party but the `helpers` contributes input, the parties of
    /// each stage's `compute` list compute, and `leader` receives.
    pub fn with_stages(
        parties: &[String],
        helpers: &[String],
        leader: &str,
        stages: Vec<Stage>,
    ) -> Self {
        let roles = parties
            .iter()
            .map(|p| {
                (
                    p.clone(),
                    Roles {
                        input: !helpers.contains(p),
                        compute: stages.iter().any(|s| s.compute.contains(p)),
                        result: p == leader,
                    },
                )
            })
            .collect();
        Program { stages, roles }
    }

    /// The one party that receives the result (empty if none or several).
    pub fn result_party(&self) -> String {
        match &self.with(|r| r.result)[..] {
            [p] => p.clone(),
            _ => String::new(),
        }
    }

    /// The program of one stage (same roles), for the engine that runs it.
    pub fn stage(&self, k: usize) -> Option<Program> {
        self.stages.get(k).map(|s| Program {
            stages: vec![s.clone()],
            roles: self.roles.clone(),
        })
    }

    /// The operators of a one-stage program (empty otherwise): what an
    /// engine checks in [`crate::Engine::supports`].
    pub fn single(&self) -> &[Op] {
        match &self.stages[..] {
            [s] => &s.ops,
            _ => &[],
        }
    }

    /// Whether any stage needs an honest majority.
    pub fn needs_honest_majority(&self) -> bool {
        self.stages.iter().any(Stage::compares)
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
        let stages: Vec<String> = self
            .stages
            .iter()
            .map(|s| {
                let ops: Vec<String> = s
                    .ops
                    .iter()
                    .map(|o| match o {
                        Op::Sum => "sum".to_string(),
                        Op::Reveal => "reveal".to_string(),
                        Op::Min => "min".to_string(),
                        Op::Max => "max".to_string(),
                        Op::Pass => {
                            let b: Vec<String> = s
                                .bounds
                                .iter()
                                .map(|b| {
                                    format!(
                                        "≥ {}{}",
                                        b.at_least,
                                        if b.result_party {
                                            ""
                                        } else {
                                            " (result party's rows not counted)"
                                        }
                                    )
                                })
                                .collect();
                            format!("pass [{}]", b.join(", "))
                        }
                    })
                    .collect();
                format!(
                    "{} over {} column(s) by {}",
                    ops.join(" → "),
                    s.columns,
                    s.compute.join(", ")
                )
            })
            .collect();
        let roles: Vec<String> = self.roles.iter().map(|(p, r)| format!("{p}={r}")).collect();
        format!("{}; roles {}", stages.join(", then "), roles.join(", "))
    }
}
