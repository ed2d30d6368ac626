//! The policy model (TOML) and the checker.

use std::collections::BTreeMap;

use planner::privacy::{Clamp, Dec, Mechanism, Requirement, MICRO};
use planner::{AggKind, Catalog, FederatedPlan};
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// Aggregate names a policy may list for a column.
pub const AGGREGATES: &[&str] = &["count", "sum", "avg", "var", "stddev", "min", "max"];

/// Who is asking: authenticated by their own party's gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Analyst {
    pub party: String,
    pub name: String,
    #[serde(default)]
    pub roles: Vec<String>,
}

impl std::fmt::Display for Analyst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.party, self.name)
    }
}

/// The checker's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    Allow,
    Deny { rule: String, reason: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    party: Option<Spanned<String>>,
    #[serde(default)]
    analysts: RawAnalysts,
    #[serde(default)]
    results: RawResults,
    #[serde(default)]
    tables: BTreeMap<String, Spanned<RawTable>>,
    privacy: Option<Spanned<RawPrivacy>>,
    #[serde(default)]
    engines: RawEngines,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngines {
    /// `true`: accept a secure part that relies on an honest majority
    /// among three compute parties (secure comparison: MIN, MAX); unset or
    /// `false`: refuse it.
    honest_majority: Option<bool>,
    /// Parties this party does not accept as compute parties of a secure
    /// comparison (whose security rests on them).
    refuse_compute: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrivacy {
    mechanism: Spanned<String>,
    epsilon_per_query: Spanned<f64>,
    delta_per_query: Option<Spanned<f64>>,
    colluders: Option<Spanned<toml::Value>>,
    budget: Option<Spanned<RawBudget>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    epsilon: f64,
    delta: Option<f64>,
    period_days: u32,
    /// What all analysts of one querying party may spend together.
    per_party_epsilon: Option<f64>,
    per_party_delta: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTablePrivacy {
    /// Analysts it applies to (`PARTY:NAME`, `PARTY:*`, `role:ROLE`, `*`);
    /// all of them if absent.
    analysts: Option<Vec<Spanned<String>>>,
    individual_id: Option<Spanned<String>>,
    max_rows_per_individual: Option<Spanned<u64>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnalysts {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    /// Parties whose gateways this party trusts to say which of their
    /// analysts is asking (name and roles).
    #[serde(default)]
    trust_identities_from: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResults {
    min_group_size: Option<Spanned<u64>>,
    recipients: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    #[serde(default)]
    count_star: bool,
    #[serde(default)]
    columns: BTreeMap<String, Spanned<RawColumn>>,
    privacy: Option<Spanned<RawTablePrivacy>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawColumn {
    #[serde(default)]
    group_by: bool,
    #[serde(default)]
    filter: bool,
    #[serde(default)]
    aggregate: Vec<Spanned<String>>,
    clamp: Option<Spanned<Vec<toml::Value>>>,
}

/// One party's policy, validated.
#[derive(Debug, Clone)]
pub struct Policy {
    pub party: Option<String>,
    pub allow: Vec<String>,
    /// Parties whose gateways are trusted to state their analysts' names
    /// and roles (`analysts.trust_identities_from`). This party's own
    /// analysts are always verified here.
    pub trust_identities_from: Vec<String>,
    pub min_group_size: u64,
    /// Whether this party accepts a secure part that relies on an honest
    /// majority among three compute parties (`engines.honest_majority`).
    /// Off unless the policy says so: the replicated engine is secure only
    /// while every compute party follows the protocol (one that deviates
    /// can learn another party's value), where the additive engine's sums
    /// keep every input private against any coalition short of all
    /// parties, deviating or not, and are always accepted.
    pub honest_majority: bool,
    /// Parties this party does not accept as one of the three compute
    /// parties of a secure comparison (`engines.refuse_compute`): a query
    /// whose comparison the federation would run on one of them is refused.
    /// The choice is deterministic (`FederatedPlan::comparison_parties`),
    /// so the refusal is too.
    pub refuse_compute: Vec<String>,
    pub tables: BTreeMap<String, TablePolicy>,
    /// The party's differential-privacy settings (mechanism, ε and δ per
    /// query, the budget), used by every table that requires DP.
    pub privacy: Option<PrivacyPolicy>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PrivacyPolicy {
    pub mechanism: Mechanism,
    pub epsilon_micro: u64,
    pub delta: f64,
    /// Colluding parties to calibrate against; `None`: all but one.
    pub colluders: Option<u32>,
    pub budget: Budget,
}

/// What one analyst may spend per period, at this party.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub epsilon_micro: u64,
    pub delta: f64,
    pub period_days: u32,
    /// What all analysts of one querying party may spend together in the
    /// period (`per_party_epsilon`, `per_party_delta`). Unset: the analyst
    /// budget for a party whose identities are not trusted, no cap for one
    /// that is.
    pub per_party: Option<(u64, f64)>,
}

#[derive(Debug, Clone, Default)]
pub struct TablePolicy {
    pub count_star: bool,
    pub columns: BTreeMap<String, ColumnPolicy>,
    /// Differential privacy is required for this table (for the analysts
    /// listed, or all).
    pub privacy: Option<TablePrivacy>,
}

#[derive(Debug, Clone, Default)]
pub struct TablePrivacy {
    /// Empty: every analyst.
    pub analysts: Vec<String>,
    pub individual_id: Option<String>,
    pub max_rows: u64,
}

#[derive(Debug, Clone, Default)]
pub struct ColumnPolicy {
    pub group_by: bool,
    pub filter: bool,
    pub aggregate: Vec<String>,
    /// The range values are clamped into under DP.
    pub clamp: Option<Clamp>,
}

/// Whether an `analysts.allow`-style pattern names `a`.
fn pattern_matches(pattern: &str, a: &Analyst) -> bool {
    match pattern.split_once(':') {
        _ if pattern == "*" => true,
        Some(("role", r)) => a.roles.iter().any(|x| x == r),
        Some((p, "*")) => p == a.party,
        Some((p, n)) => p == a.party && n == a.name,
        None => false,
    }
}

/// Whether a pattern that *grants* something names `a`: a role stated by a
/// gateway this party does not trust for identities grants nothing (a
/// dishonest gateway could claim any role).
fn grant_matches(pattern: &str, a: &Analyst, trusted: bool) -> bool {
    if pattern.starts_with("role:") && !trusted {
        return false;
    }
    pattern_matches(pattern, a)
}

/// Whether a pattern that *restricts* (requires DP) may name `a`: where the
/// identity cannot be verified, the restriction is assumed to apply (a
/// dishonest gateway could drop a role or name another of its analysts to
/// escape it).
fn restriction_may_match(pattern: &str, a: &Analyst, trusted: bool) -> bool {
    if trusted {
        return pattern_matches(pattern, a);
    }
    match pattern.split_once(':') {
        _ if pattern == "*" => true,
        Some(("role", _)) => true,
        Some((p, _)) => p == a.party,
        None => false,
    }
}

fn valid_pattern(v: &str) -> bool {
    match v.split_once(':') {
        Some(("role", r)) => !r.is_empty() && r != "*",
        Some((p, n)) => !p.is_empty() && !n.is_empty(),
        None => false,
    }
}

/// A TOML number or string as exact decimal text.
fn clamp_bound(v: &toml::Value) -> Result<String, String> {
    let t = match v {
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) if f.is_finite() => f.to_string(),
        toml::Value::String(s) => s.clone(),
        other => return Err(format!("`{other}` is not a number")),
    };
    Dec::parse(&t)?;
    Ok(t)
}

/// A problem in a policy file, with its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyProblem {
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

impl Policy {
    /// Parses and validates a policy. With a catalog, also checks that every
    /// table and column it names exists. Returns every problem found.
    pub fn parse(text: &str, catalog: Option<&Catalog>) -> Result<Policy, Vec<PolicyProblem>> {
        let raw: RawPolicy = match toml::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
                return Err(vec![PolicyProblem {
                    line,
                    message: e.message().to_string(),
                }]);
            }
        };
        let mut problems = Vec::new();
        let mut problem = |offset: usize, message: String| {
            problems.push(PolicyProblem {
                line: line_of(text, offset),
                message,
            })
        };
        for t in &raw.analysts.trust_identities_from {
            let v = t.get_ref();
            if v.is_empty() || v.contains(':') || v == "*" {
                problem(
                    t.span().start,
                    format!("analysts.trust_identities_from entry `{v}` must be a party id"),
                );
            }
        }
        for a in &raw.analysts.allow {
            let v = a.get_ref();
            if !valid_pattern(v) {
                problem(
                    a.span().start,
                    format!(
                        "analysts.allow entry `{v}` must be `PARTY:NAME`, `PARTY:*` or `role:ROLE`"
                    ),
                );
            }
        }
        if let Some(r) = &raw.results.recipients {
            if r.get_ref() != "querying_party" {
                problem(
                    r.span().start,
                    format!(
                        "results.recipients = `{}` is not supported; the only value is \"querying_party\"",
                        r.get_ref()
                    ),
                );
            }
        }
        let privacy = match &raw.privacy {
            None => None,
            Some(rp) => {
                let at = rp.span().start;
                let rp = rp.get_ref();
                let mechanism = match rp.mechanism.get_ref().as_str() {
                    "laplace" => Some(Mechanism::Laplace),
                    "gaussian" => Some(Mechanism::Gaussian),
                    other => {
                        problem(
                            rp.mechanism.span().start,
                            format!("privacy.mechanism `{other}` is unknown; use \"laplace\" (pure ε-DP) or \"gaussian\" ((ε, δ)-DP)"),
                        );
                        None
                    }
                };
                let eps = *rp.epsilon_per_query.get_ref();
                let epsilon_micro = (eps * MICRO as f64).floor();
                if !(eps.is_finite() && epsilon_micro >= 1.0 && eps <= 1000.0) {
                    problem(
                        rp.epsilon_per_query.span().start,
                        format!(
                            "privacy.epsilon_per_query = {eps} must be between 0.000001 and 1000"
                        ),
                    );
                }
                let delta = rp
                    .delta_per_query
                    .as_ref()
                    .map(|d| (*d.get_ref(), d.span().start));
                match (mechanism, delta) {
                    (Some(Mechanism::Gaussian), None) => problem(
                        at,
                        "privacy.mechanism = \"gaussian\" needs delta_per_query (e.g. 1e-6)".into(),
                    ),
                    (Some(Mechanism::Gaussian), Some((d, pos))) if !(d > 0.0 && d < 1.0) => {
                        problem(pos, format!("privacy.delta_per_query = {d} must be between 0 and 1"))
                    }
                    (Some(Mechanism::Laplace), Some((_, pos))) => problem(
                        pos,
                        "privacy.delta_per_query does not apply to the laplace mechanism (pure ε-DP); remove it".into(),
                    ),
                    _ => {}
                }
                let colluders = match rp.colluders.as_ref().map(|c| (c.get_ref(), c.span().start)) {
                    None => None,
                    Some((toml::Value::String(s), _)) if s == "all_but_one" => None,
                    Some((toml::Value::Integer(i), _)) if *i >= 1 && *i <= 1000 => Some(*i as u32),
                    Some((other, pos)) => {
                        problem(
                            pos,
                            format!("privacy.colluders = {other} must be \"all_but_one\" or a number of parties (at least 1)"),
                        );
                        None
                    }
                };
                let budget = match &rp.budget {
                    None => {
                        problem(
                            at,
                            "privacy.budget is missing: a per-query ε alone does not bound what an analyst learns \
                             over time; add budget = { epsilon = 10, period_days = 30 } (and delta for gaussian)"
                                .into(),
                        );
                        None
                    }
                    Some(b) => {
                        let pos = b.span().start;
                        let b = b.get_ref();
                        if !(b.epsilon.is_finite() && b.epsilon > 0.0 && b.epsilon <= 1e6) {
                            problem(
                                pos,
                                format!("privacy.budget.epsilon = {} must be positive", b.epsilon),
                            );
                        }
                        if b.period_days == 0 {
                            problem(pos, "privacy.budget.period_days must be at least 1".into());
                        }
                        let bd = b.delta.unwrap_or(0.0);
                        if mechanism == Some(Mechanism::Gaussian) && !(bd > 0.0 && bd < 1.0) {
                            problem(pos, "privacy.budget.delta (between 0 and 1) is needed for the gaussian mechanism".into());
                        }
                        let per_party = match b.per_party_epsilon {
                            None => None,
                            Some(e) if e.is_finite() && e > 0.0 && e <= 1e6 => Some((
                                (e * MICRO as f64).floor() as u64,
                                b.per_party_delta.unwrap_or(bd),
                            )),
                            Some(e) => {
                                problem(
                                    pos,
                                    format!(
                                        "privacy.budget.per_party_epsilon = {e} must be positive"
                                    ),
                                );
                                None
                            }
                        };
                        Some(Budget {
                            epsilon_micro: (b.epsilon * MICRO as f64).floor() as u64,
                            delta: bd,
                            period_days: b.period_days,
                            per_party,
                        })
                    }
                };
                match (mechanism, budget) {
                    (Some(mechanism), Some(budget)) => Some(PrivacyPolicy {
                        mechanism,
                        epsilon_micro: epsilon_micro as u64,
                        delta: delta.map(|d| d.0).unwrap_or(0.0),
                        colluders,
                        budget,
                    }),
                    _ => None,
                }
            }
        };
        let mut tables = BTreeMap::new();
        for (tname, rt) in &raw.tables {
            let tdef = catalog.map(|c| c.table(tname));
            if let Some(None) = tdef {
                problem(
                    rt.span().start,
                    format!("table `{tname}` is not in the federated catalog"),
                );
            }
            let mut tp = TablePolicy {
                count_star: rt.get_ref().count_star,
                ..Default::default()
            };
            if let Some(rp) = &rt.get_ref().privacy {
                let at = rp.span().start;
                let rp = rp.get_ref();
                if raw.privacy.is_none() {
                    problem(
                        at,
                        format!("tables.{tname}.privacy requires differential privacy, but the policy has no [privacy] section (mechanism, epsilon_per_query, budget)"),
                    );
                }
                let mut analysts = Vec::new();
                for a in rp.analysts.iter().flatten() {
                    if a.get_ref() != "*" && !valid_pattern(a.get_ref()) {
                        problem(
                            a.span().start,
                            format!("tables.{tname}.privacy.analysts entry `{}` must be `*`, `PARTY:NAME`, `PARTY:*` or `role:ROLE`", a.get_ref()),
                        );
                    }
                    analysts.push(a.get_ref().clone());
                }
                let individual_id = rp.individual_id.as_ref().map(|i| {
                    if let Some(Some(t)) = tdef {
                        if t.column(i.get_ref()).is_none() {
                            problem(
                                i.span().start,
                                format!("tables.{tname}.privacy.individual_id `{}` is not a column of the catalog's {tname}", i.get_ref()),
                            );
                        }
                    }
                    i.get_ref().clone()
                });
                let max_rows = match &rp.max_rows_per_individual {
                    Some(m) if *m.get_ref() == 0 => {
                        problem(
                            m.span().start,
                            "max_rows_per_individual must be at least 1".into(),
                        );
                        1
                    }
                    Some(m) => *m.get_ref(),
                    None => 1,
                };
                tp.privacy = Some(TablePrivacy {
                    analysts,
                    individual_id,
                    max_rows,
                });
            }
            for (cname, rc) in &rt.get_ref().columns {
                if let Some(Some(t)) = tdef {
                    match t.column(cname) {
                        None => problem(rc.span().start, format!("column `{cname}` is not in table `{tname}` of the catalog")),
                        Some(c) if rc.get_ref().group_by && c.domain.is_none() => problem(
                            rc.span().start,
                            format!(
                                "column `{tname}.{cname}` allows group_by but the catalog declares no domain for it; \
                                 queries grouping by it will be refused by the planner"
                            ),
                        ),
                        _ => {}
                    }
                }
                let mut aggs = Vec::new();
                for a in &rc.get_ref().aggregate {
                    let v = a.get_ref().to_ascii_lowercase();
                    if AGGREGATES.contains(&v.as_str()) {
                        aggs.push(v);
                    } else {
                        problem(
                            a.span().start,
                            format!(
                                "unknown aggregate `{}`; use any of {}",
                                a.get_ref(),
                                AGGREGATES.join(", ")
                            ),
                        );
                    }
                }
                let c = rc.get_ref();
                let clamp = c.clamp.as_ref().and_then(|cl| {
                    let bounds: Result<Vec<String>, String> =
                        cl.get_ref().iter().map(clamp_bound).collect();
                    let fail = |m: String| {
                        format!("tables.{tname}.columns.{cname}.clamp: {m}; write clamp = [LO, HI]")
                    };
                    match bounds {
                        Ok(b) if b.len() == 2 => {
                            let c = Clamp {
                                lo: b[0].clone(),
                                hi: b[1].clone(),
                            };
                            match c.bounds() {
                                Ok(_) => Some(c),
                                Err(e) => {
                                    problem(cl.span().start, fail(e));
                                    None
                                }
                            }
                        }
                        Ok(b) => {
                            problem(
                                cl.span().start,
                                fail(format!("{} values given, 2 needed", b.len())),
                            );
                            None
                        }
                        Err(e) => {
                            problem(cl.span().start, fail(e));
                            None
                        }
                    }
                });
                tp.columns.insert(
                    cname.clone(),
                    ColumnPolicy {
                        group_by: c.group_by,
                        filter: c.filter,
                        aggregate: aggs,
                        clamp,
                    },
                );
            }
            tables.insert(tname.clone(), tp);
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Policy {
            party: raw.party.map(|p| p.into_inner()),
            allow: raw
                .analysts
                .allow
                .into_iter()
                .map(|a| a.into_inner())
                .collect(),
            trust_identities_from: raw
                .analysts
                .trust_identities_from
                .into_iter()
                .map(|a| a.into_inner())
                .collect(),
            min_group_size: raw
                .results
                .min_group_size
                .map(|m| m.into_inner())
                .unwrap_or(0),
            honest_majority: raw.engines.honest_majority.unwrap_or(false),
            refuse_compute: raw
                .engines
                .refuse_compute
                .unwrap_or_default()
                .into_iter()
                .map(|p| p.into_inner())
                .collect(),
            tables,
            privacy,
        })
    }

    /// The check at a data-less helper party: it holds no data, so its
    /// policy decides only whom it serves (`analysts.allow`); it sees
    /// shares and never a result.
    pub fn check_as_helper(&self, analyst: &Analyst) -> Decision {
        if self.admits(analyst) {
            Decision::Allow
        } else {
            Decision::Deny {
                rule: "analysts.allow".into(),
                reason: format!("analyst {analyst} may not use this party as a helper"),
            }
        }
    }

    /// What this party demands of `plan` for `analyst` under differential
    /// privacy, or `None` if its policy does not require DP for them.
    pub fn requirement(&self, plan: &FederatedPlan, analyst: &Analyst) -> Option<Requirement> {
        let pp = self.privacy.as_ref()?;
        let tp = self.tables.get(&plan.table)?;
        let tprivacy = tp.privacy.as_ref()?;
        let trusted = self.trusts_identity_of(analyst);
        if !tprivacy.analysts.is_empty()
            && !tprivacy
                .analysts
                .iter()
                .any(|p| restriction_may_match(p, analyst, trusted))
        {
            return None;
        }
        let clamps = plan
            .uses
            .aggregate
            .keys()
            .filter_map(|c| Some((c.clone(), tp.columns.get(c)?.clamp.clone()?)))
            .collect();
        Some(Requirement {
            party: self.party.clone().unwrap_or_default(),
            mechanism: pp.mechanism,
            epsilon_micro: pp.epsilon_micro,
            delta: pp.delta,
            colluders: pp.colluders,
            clamps,
            individual_id: tprivacy.individual_id.clone(),
            max_rows: tprivacy.max_rows,
            min_group_size: self.min_group_size,
        })
    }

    /// Whether `analysts.allow` admits `analyst` at all.
    pub fn admits(&self, analyst: &Analyst) -> bool {
        let trusted = self.trusts_identity_of(analyst);
        self.allow
            .iter()
            .filter(|a| a.as_str() != "*")
            .any(|a| grant_matches(a, analyst, trusted))
    }

    /// Whether this party can rely on the name and roles the querying
    /// gateway states for `analyst`: its own analysts (authenticated here),
    /// or a party listed in `analysts.trust_identities_from`. A peer only
    /// verifies which *party* asks (its certificate).
    pub fn trusts_identity_of(&self, analyst: &Analyst) -> bool {
        self.party.as_deref() == Some(analyst.party.as_str())
            || self
                .trust_identities_from
                .iter()
                .any(|p| *p == analyst.party)
    }

    /// The budget cap shared by all analysts of `party`, if any: the policy's
    /// `per_party_epsilon`, or, for a party whose identities this party does
    /// not trust (it could invent analyst names to get fresh budgets), the
    /// analyst budget itself.
    pub fn party_budget(&self, party: &str) -> Option<Budget> {
        let pp = self.privacy.as_ref()?;
        let b = pp.budget;
        let probe = Analyst {
            party: party.to_string(),
            name: String::new(),
            roles: Vec::new(),
        };
        let (e, d) = match b.per_party {
            Some(cap) => cap,
            None if self.trusts_identity_of(&probe) => return None,
            None => (b.epsilon_micro, b.delta),
        };
        Some(Budget {
            epsilon_micro: e,
            delta: d,
            period_days: b.period_days,
            per_party: None,
        })
    }

    /// The columns of `table` that `analyst` may use in some way, or None
    /// if the table is not exposed to them: what catalog browsing shows.
    pub fn visible_columns(&self, analyst: &Analyst, table: &str) -> Option<Vec<String>> {
        if !self.admits(analyst) {
            return None;
        }
        let tp = self.tables.get(table)?;
        Some(
            tp.columns
                .iter()
                .filter(|(_, c)| c.group_by || c.filter || !c.aggregate.is_empty())
                .map(|(n, _)| n.clone())
                .collect(),
        )
    }

    /// Decides `plan` for `analyst`. Anything the policy does not list is denied.
    ///
    /// The decision is on the plan this party computed itself, never on
    /// the SQL text; a refusal names the rule that decided it.
    ///
    /// ```
    /// use planner::{plan_query, Catalog, QueryOptions};
    /// use policies::{Analyst, Decision, Policy};
    ///
    /// let catalog = Catalog::from_toml(
    ///     r#"
    /// [tables.patients]
    /// columns = [
    ///   { name = "age_band", type = "text", domain = ["0-17", "18-64", "65+"] },
    ///   { name = "cost", type = "int" },
    /// ]"#,
    ///     "catalog.toml",
    /// )
    /// .unwrap();
    /// let policy = Policy::parse(
    ///     r#"
    /// party = "hospital_a"
    /// [analysts]
    /// allow = ["hospital_a:*"]
    /// [tables.patients]
    /// count_star = true
    /// [tables.patients.columns.age_band]
    /// group_by = true
    /// [tables.patients.columns.cost]
    /// aggregate = ["count", "sum"]
    /// "#,
    ///     Some(&catalog),
    /// )
    /// .unwrap();
    /// let parties = ["hospital_a".to_string(), "hospital_b".to_string()];
    /// let alice = Analyst { party: "hospital_a".into(), name: "alice".into(), roles: vec![] };
    /// let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    /// let plan = |sql: &str| {
    ///     runtime
    ///         .block_on(plan_query(sql, &catalog, &parties, &QueryOptions::default()))
    ///         .unwrap()
    /// };
    ///
    /// let allowed = plan("SELECT age_band, COUNT(*), SUM(cost) FROM patients GROUP BY age_band");
    /// assert!(matches!(policy.check(&allowed, &alice), Decision::Allow));
    ///
    /// // A filter on `cost` is not granted: refused, naming the rule.
    /// let filtered = plan("SELECT COUNT(*) FROM patients WHERE cost > 10000");
    /// let Decision::Deny { rule, .. } = policy.check(&filtered, &alice) else {
    ///     panic!("a filter on cost is not allowed");
    /// };
    /// assert_eq!(rule, "tables.patients.columns.cost");
    ///
    /// // Another party's analyst is not admitted at all.
    /// let bob = Analyst { party: "bank_b".into(), ..alice.clone() };
    /// assert!(matches!(policy.check(&allowed, &bob), Decision::Deny { rule, .. } if rule == "analysts.allow"));
    /// ```
    pub fn check(&self, plan: &FederatedPlan, analyst: &Analyst) -> Decision {
        let deny = |rule: String, reason: String| Decision::Deny { rule, reason };
        if !self.admits(analyst) {
            return deny(
                "analysts.allow".into(),
                format!("analyst {analyst} may not query this party's data"),
            );
        }
        let t = &plan.table;
        let Some(tp) = self.tables.get(t) else {
            return deny(format!("tables.{t}"), format!("table {t} is not exposed"));
        };
        // Without differential privacy the querying gateway learns every
        // group's row count (that is how empty groups are dropped, as SQL
        // does), whatever the SELECT list says. Under this party's own DP
        // requirement, row counts are revealed (noised) only for COUNT(*)
        // or a minimum group size. Another party's DP cannot be counted on
        // here: this check comes before the parameters are merged.
        let own_dp = self.requirement(plan, analyst).is_some();
        if !tp.count_star {
            if plan.uses.count_star {
                return deny(
                    format!("tables.{t}.count_star"),
                    "COUNT(*) over this table is not allowed".into(),
                );
            }
            if !own_dp {
                return deny(
                    format!("tables.{t}.count_star"),
                    "row counts over this table are not allowed, and without differential privacy every query \
                     reveals each group's row count to the querying gateway"
                        .into(),
                );
            }
        }
        let col = |c: &str| tp.columns.get(c);
        for c in &plan.uses.group_by {
            if !col(c).is_some_and(|p| p.group_by) {
                return deny(
                    format!("tables.{t}.columns.{c}"),
                    format!("column {c} may not be used in GROUP BY"),
                );
            }
        }
        for c in &plan.uses.filter {
            if !col(c).is_some_and(|p| p.filter) {
                let place = plan.uses.place_of(c, "filter").unwrap_or("in WHERE");
                let reason = if place == "in WHERE" {
                    format!("column {c} may not be used in WHERE")
                } else {
                    format!(
                        "column {c} may not be used as a filter, and it is used {place}: a condition or \
                         expression there selects rows by {c} as WHERE would"
                    )
                };
                return deny(format!("tables.{t}.columns.{c}"), reason);
            }
        }
        for (c, funcs) in &plan.uses.aggregate {
            for f in funcs {
                if !col(c).is_some_and(|p| p.aggregate.iter().any(|a| a == f)) {
                    return deny(
                        format!("tables.{t}.columns.{c}"),
                        format!("column {c} may not be aggregated with {}", f.to_uppercase()),
                    );
                }
                // What the querying gateway sees is the totals an aggregate
                // is computed from: AVG reveals the exact SUM; VAR and
                // STDDEV reveal SUM and the sum of squares (so each other).
                // Every one of them also reveals how many rows had a
                // non-NULL value (the count that decides NULL against a
                // total, and divides for AVG): exact without this party's
                // own DP, so COUNT of the column must be allowed too; under
                // its DP a SUM reveals no count and every total is noised.
                let reveals: &[&str] = match *f {
                    "sum" => &["count"],
                    "avg" => &["sum", "count"],
                    "var" => &["sum", "stddev", "count"],
                    "stddev" => &["sum", "var", "count"],
                    // MIN(-x) is -MAX(x): either grants the other.
                    "min" => &["max"],
                    "max" => &["min"],
                    _ => &[],
                };
                for r in reveals.iter().filter(|r| **r != "count" || !own_dp) {
                    if !col(c).is_some_and(|p| p.aggregate.iter().any(|a| a == r)) {
                        return deny(
                            format!("tables.{t}.columns.{c}"),
                            format!(
                                "column {c} may not be aggregated with {}, and {} reveals it to the querying \
                                 gateway (an aggregate is computed from exact totals there); allow {r} too",
                                r.to_uppercase(),
                                f.to_uppercase()
                            ),
                        );
                    }
                }
            }
        }
        if self.requirement(plan, analyst).is_some() {
            for (c, funcs) in &plan.uses.aggregate {
                let needs_clamp = funcs.iter().any(|f| *f != "count");
                if needs_clamp && col(c).and_then(|p| p.clamp.as_ref()).is_none() {
                    return deny(
                        format!("tables.{t}.columns.{c}.clamp"),
                        format!(
                            "this party requires differential privacy for {t}, and column {c} has no clamp range \
                             to bound one individual's influence on its sums"
                        ),
                    );
                }
            }
        }
        if plan.program.needs_honest_majority() && !self.honest_majority {
            let mut what = Vec::new();
            if plan
                .aggregates
                .iter()
                .any(|a| matches!(a.kind, AggKind::Min | AggKind::Max))
            {
                what.push("its MIN or MAX");
            }
            if plan.gated() && !plan.having.is_empty() {
                what.push(
                    "its HAVING, which Council decides in shares so that the groups it removes reveal nothing \
                     (with three compute parties)",
                );
            }
            if what.is_empty() {
                what.push("a secure comparison");
            }
            return deny(
                "engines.honest_majority".into(),
                format!(
                    "this party does not accept a result that relies on an honest majority among three compute \
                     parties, and this query needs one for {} (secure comparison runs on the replicated \
                     engine, which is secure only while every compute party follows the protocol); ask for \
                     COUNT, SUM, AVG, VAR or STDDEV without HAVING on them, which the additive engine computes, \
                     or have the party's governance team set `[engines] honest_majority = true`",
                    what.join(" and ")
                ),
            );
        }
        // A minimum group size is not in the plan yet: every party states
        // its own in its verdict, and the plan that starts carries the
        // largest (`check_threshold`). Without its own DP, this party's
        // threshold is enforced in shares, which needs the honest-majority
        // model: refused now, before anything runs, if it does not accept it.
        if self.min_group_size > 0 && !own_dp && !self.honest_majority {
            return deny(
                "engines.honest_majority".into(),
                format!(
                    "this party requires groups of at least {} rows, which Council enforces without differential \
                     privacy by a secure comparison among three compute parties (honest majority), and its policy \
                     does not accept that model; set `[engines] honest_majority = true` or require differential \
                     privacy",
                    self.min_group_size
                ),
            );
        }
        self.check_compute_parties(plan)
    }

    /// The refusal of a plan whose secure comparison runs on a party this
    /// policy does not accept as a compute party, if it does.
    pub fn check_compute_parties(&self, plan: &FederatedPlan) -> Decision {
        let refused = plan
            .program
            .stages
            .iter()
            .filter(|s| s.compares())
            .flat_map(|s| s.compute.iter())
            .find(|p| self.refuse_compute.contains(p));
        match refused {
            Some(p) => Decision::Deny {
                rule: "engines.refuse_compute".into(),
                reason: format!(
                    "this query's secure comparison would run on {p} as one of its three compute parties \
                     (the helpers, then the parties with data, in sorted order, the first three), and this party \
                     does not accept {p} as one: its security rests on an honest majority of them; ask for \
                     COUNT, SUM, AVG, VAR or STDDEV without HAVING on them, or have the governance team change \
                     `[engines] refuse_compute`"
                ),
            },
            None => Decision::Allow,
        }
    }

    /// Whether the plan that starts (after every party's verdict) enforces
    /// this party's minimum group size: under DP on noised row counts,
    /// without DP in shares (a gate, which needs the honest-majority
    /// model).
    pub fn check_threshold(&self, plan: &FederatedPlan) -> Decision {
        let k = self.min_group_size;
        let enforced = match &plan.privacy {
            Some(p) => p.min_group_size,
            None => plan.threshold,
        };
        if enforced < k {
            return Decision::Deny {
                rule: "results.min_group_size".into(),
                reason: format!(
                    "this party requires groups of at least {k} rows, and the query was started with a \
                     minimum of {enforced}"
                ),
            };
        }
        if plan.program.needs_honest_majority() && !self.honest_majority {
            return Decision::Deny {
                rule: "engines.honest_majority".into(),
                reason: format!(
                    "a minimum group size of {enforced} rows without DP needs the honest-majority model, which \
                     this party does not accept"
                ),
            };
        }
        self.check_compute_parties(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use planner::QueryOptions;

    const CATALOG: &str = r#"
[tables.patients]
columns = [
  { name = "age_band", type = "text", domain = ["0-17", "18-39"] },
  { name = "diagnosis", type = "text" },
  { name = "cost", type = "decimal(12,2)" },
]
"#;

    const POLICY: &str = r#"
party = "b"
[analysts]
allow = ["a:*", "role:auditor"]

[tables.patients]
count_star = true

[tables.patients.columns.age_band]
group_by = true
filter = true

[tables.patients.columns.cost]
aggregate = ["count", "sum", "avg"]
"#;

    async fn plan_on(cat: &Catalog, sql: &str, parties: &[&str]) -> FederatedPlan {
        let parties: Vec<String> = parties.iter().map(|p| p.to_string()).collect();
        planner::plan_query(sql, cat, &parties, &QueryOptions::default())
            .await
            .unwrap()
    }

    async fn decide(sql: &str, analyst: &Analyst) -> Decision {
        let cat = Catalog::from_toml(CATALOG, "c").unwrap();
        let plan = planner::plan_query(
            sql,
            &cat,
            &["a".into(), "b".into()],
            &QueryOptions::default(),
        )
        .await
        .unwrap();
        Policy::parse(POLICY, Some(&cat))
            .unwrap()
            .check(&plan, analyst)
    }

    fn alice() -> Analyst {
        Analyst {
            party: "a".into(),
            name: "alice".into(),
            roles: vec![],
        }
    }

    #[tokio::test]
    async fn allows_what_is_listed_and_names_the_rule_otherwise() {
        assert_eq!(
            decide(
                "SELECT age_band, COUNT(*), AVG(cost) FROM patients GROUP BY age_band",
                &alice()
            )
            .await,
            Decision::Allow
        );
        let d = decide(
            "SELECT COUNT(*) FROM patients WHERE diagnosis = 'E11'",
            &alice(),
        )
        .await;
        assert_eq!(
            d,
            Decision::Deny {
                rule: "tables.patients.columns.diagnosis".into(),
                reason: "column diagnosis may not be used in WHERE".into()
            }
        );
        let d = decide("SELECT STDDEV(cost) FROM patients", &alice()).await;
        assert!(
            matches!(d, Decision::Deny { ref reason, .. } if reason.contains("STDDEV")),
            "{d:?}"
        );
        let mallory = Analyst {
            party: "c".into(),
            name: "m".into(),
            roles: vec![],
        };
        let d = decide("SELECT COUNT(*) FROM patients", &mallory).await;
        assert!(
            matches!(d, Decision::Deny { ref rule, .. } if rule == "analysts.allow"),
            "{d:?}"
        );
        let auditor = Analyst {
            party: "c".into(),
            name: "m".into(),
            roles: vec!["auditor".into()],
        };
        // A role stated by a gateway this party does not trust for
        // identities grants nothing: c's gateway could claim any role.
        assert!(matches!(
            decide("SELECT COUNT(*) FROM patients", &auditor).await,
            Decision::Deny { ref rule, .. } if rule == "analysts.allow"
        ));
        let cat = Catalog::from_toml(CATALOG, "c").unwrap();
        let trusting = Policy::parse(
            &POLICY.replace(
                "[analysts]\n",
                "[analysts]\ntrust_identities_from = [\"c\"]\n",
            ),
            Some(&cat),
        )
        .unwrap();
        assert_eq!(trusting.trust_identities_from, vec!["c".to_string()]);
        let plan = plan_on(&cat, "SELECT COUNT(*) FROM patients", &["a", "c"]).await;
        assert_eq!(trusting.check(&plan, &auditor), Decision::Allow);
    }

    #[tokio::test]
    async fn an_aggregate_needs_a_grant_for_every_total_it_reveals() {
        let cat = Catalog::from_toml(CATALOG, "c").unwrap();
        let only_avg = Policy::parse(
            &POLICY.replace(
                "aggregate = [\"count\", \"sum\", \"avg\"]",
                "aggregate = [\"count\", \"avg\"]",
            ),
            Some(&cat),
        )
        .unwrap();
        let plan = plan_on(&cat, "SELECT AVG(cost) FROM patients", &["a", "b"]).await;
        let d = only_avg.check(&plan, &alice());
        assert!(
            matches!(&d, Decision::Deny { reason, .. } if reason.contains("may not be aggregated with SUM, and AVG reveals it")),
            "{d:?}"
        );
        // A sum reveals how many rows had a value: without this party's DP
        // that count is exact, so COUNT(cost) must be allowed as well.
        let no_count = POLICY.replace(
            "aggregate = [\"count\", \"sum\", \"avg\"]",
            "aggregate = [\"sum\", \"avg\"]",
        );
        let p = Policy::parse(&no_count, Some(&cat)).unwrap();
        for sql in [
            "SELECT SUM(cost) FROM patients",
            "SELECT age_band, AVG(cost) FROM patients GROUP BY age_band",
        ] {
            let plan = plan_on(&cat, sql, &["a", "b"]).await;
            let d = p.check(&plan, &alice());
            assert!(
                matches!(&d, Decision::Deny { rule, reason } if rule == "tables.patients.columns.cost"
                    && reason.contains("may not be aggregated with COUNT") && reason.contains("allow count too")),
                "{sql}: {d:?}"
            );
        }
        // Under the party's own DP a SUM reveals no count at all.
        let dp = Policy::parse(
            &format!(
                "{}\n[privacy]\nmechanism = \"laplace\"\n\
                 epsilon_per_query = 1\nbudget = {{ epsilon = 10, period_days = 30 }}\n[tables.patients.privacy]\nanalysts = [\"a:*\"]\n",
                no_count.replace("\"avg\"]", "\"avg\"]\nclamp = [0, 1000]")
            ),
            Some(&cat),
        )
        .unwrap();
        let plan = plan_on(&cat, "SELECT SUM(cost) FROM patients", &["a", "b"]).await;
        assert_eq!(dp.check(&plan, &alice()), Decision::Allow);
    }

    #[tokio::test]
    async fn a_dp_requirement_by_role_or_name_holds_where_identities_cannot_be_checked() {
        let cat = Catalog::from_toml(CATALOG, "c").unwrap();
        let policy = Policy::parse(
            &format!(
                "{POLICY}\n[privacy]\nmechanism = \"laplace\"\nepsilon_per_query = 1\n\
                 budget = {{ epsilon = 10, period_days = 30 }}\n[tables.patients.privacy]\n\
                 analysts = [\"role:external\", \"c:bob\"]\n"
            ),
            Some(&cat),
        )
        .unwrap();
        let plan = plan_on(&cat, "SELECT COUNT(*) FROM patients", &["a", "c"]).await;
        // A leader that drops the role or names another of its analysts
        // still gets DP: the peer cannot check either.
        let plain = Analyst {
            party: "c".into(),
            name: "alice".into(),
            roles: vec![],
        };
        assert!(policy.requirement(&plan, &plain).is_some());
        let d_party = Analyst {
            party: "d".into(),
            name: "x".into(),
            roles: vec![],
        };
        assert!(
            policy.requirement(&plan, &d_party).is_some(),
            "role:external may hide at d"
        );
        // And untrusted parties share one budget.
        let pb = policy.party_budget("c").unwrap();
        assert_eq!(pb.epsilon_micro, 10_000_000);
    }

    #[test]
    fn reports_every_problem_with_its_line() {
        let cat = Catalog::from_toml(CATALOG, "c").unwrap();
        let bad = POLICY
            .replace("\"sum\", \"avg\"", "\"sum\", \"median\"")
            .replace(
                "[tables.patients.columns.cost]",
                "[tables.patients.columns.costs]",
            );
        let problems = Policy::parse(&bad, Some(&cat)).unwrap_err();
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 2, "{text:?}");
        assert!(
            text.iter()
                .any(|t| t.starts_with("line 13: column `costs`")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.starts_with("line 14: unknown aggregate `median`")),
            "{text:?}"
        );
        let syntax = Policy::parse("[analysts]\nallow = [\"a:*\"\nx", None).unwrap_err();
        assert_eq!(syntax.len(), 1);
        let typo = Policy::parse("[results]\nmin_group_sise = 5\n", None).unwrap_err();
        assert!(typo[0].message.contains("min_group_sise"), "{typo:?}");
        assert_eq!(typo[0].line, 2);
    }
}

#[cfg(test)]
mod fail_closed {
    use super::*;
    use planner::QueryOptions;

    #[tokio::test]
    async fn a_minimum_group_size_is_checked_on_the_plan_that_starts() {
        let cat = Catalog::from_toml(
            "[tables.t]\ncolumns = [{ name = \"g\", type = \"text\", domain = [\"a\"] }]",
            "c",
        )
        .unwrap();
        let text = "[analysts]\nallow = [\"a:*\"]\n[results]\nmin_group_size = 5\n[tables.t]\ncount_star = true\n[tables.t.columns.g]\ngroup_by = true\n";
        let pol = Policy::parse(text, Some(&cat)).unwrap();
        let parties: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let plan = planner::plan_query(
            "SELECT g, COUNT(*) FROM t GROUP BY g",
            &cat,
            &parties,
            &QueryOptions::default(),
        )
        .await
        .unwrap()
        .led_by("a")
        .unwrap();
        let who = Analyst {
            party: "a".into(),
            name: "x".into(),
            roles: vec![],
        };
        let rule = |d: Decision| match d {
            Decision::Deny { rule, reason } => (rule, reason),
            d => panic!("{d:?}"),
        };
        // Without DP the threshold needs the honest-majority model: refused
        // at once by a policy that does not accept it; allowed by one that
        // does, and the plan that starts must carry the threshold.
        assert_eq!(rule(pol.check(&plan, &who)).0, "engines.honest_majority");
        let opted = Policy::parse(
            &format!("{text}[engines]\nhonest_majority = true\n"),
            Some(&cat),
        )
        .unwrap();
        assert_eq!(opted.check(&plan, &who), Decision::Allow);
        let (r, reason) = rule(pol.check_threshold(&plan));
        assert_eq!(r, "results.min_group_size");
        assert!(
            reason.contains("at least 5 rows") && reason.contains("minimum of 0"),
            "{reason}"
        );
        let low = plan.clone().with_threshold(4).unwrap();
        assert_eq!(rule(pol.check_threshold(&low)).0, "results.min_group_size");
        // Enforced in shares, it needs the honest-majority model.
        let gated = plan.clone().with_threshold(7).unwrap();
        assert_eq!(
            rule(pol.check_threshold(&gated)).0,
            "engines.honest_majority"
        );
        assert_eq!(opted.check_threshold(&gated), Decision::Allow);
        let bad = Policy::parse("[results]\nrecipients = \"everyone\"\n", None).unwrap_err();
        assert!(bad[0].message.contains("querying_party"), "{bad:?}");
    }

    /// A party that refuses the honest-majority model refuses MIN and MAX
    /// (and only them), naming the rule; it accepts them only if its policy
    /// opts in. MIN and MAX are granted together (MIN(-x) = -MAX(x)).
    #[tokio::test]
    async fn a_party_can_refuse_the_honest_majority_model() {
        let cat = Catalog::from_toml(
            "[tables.t]\ncolumns = [{ name = \"g\", type = \"text\", domain = [\"a\"] }, { name = \"x\", type = \"int\" }]",
            "c",
        )
        .unwrap();
        let text = "[analysts]\nallow = [\"a:*\"]\n[tables.t]\ncount_star = true\n[tables.t.columns.g]\ngroup_by = true\n\
                    [tables.t.columns.x]\naggregate = [\"count\", \"sum\", \"min\", \"max\"]\n";
        // Off unless the policy opts in.
        let refusing = Policy::parse(text, Some(&cat)).unwrap();
        let accepting = Policy::parse(
            &format!("{text}[engines]\nhonest_majority = true\n"),
            Some(&cat),
        )
        .unwrap();
        let explicit = Policy::parse(
            &format!("{text}[engines]\nhonest_majority = false\n"),
            Some(&cat),
        )
        .unwrap();
        assert!(!explicit.honest_majority && !refusing.honest_majority);
        let parties: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let plan = |sql: &'static str| {
            let (cat, parties) = (cat.clone(), parties.clone());
            async move {
                planner::plan_query(sql, &cat, &parties, &QueryOptions::default())
                    .await
                    .unwrap()
                    .led_by("a")
                    .unwrap()
            }
        };
        let who = Analyst {
            party: "a".into(),
            name: "x".into(),
            roles: vec![],
        };
        let extremes = plan("SELECT g, MIN(x), MAX(x) FROM t GROUP BY g").await;
        let sums = plan("SELECT g, SUM(x) FROM t GROUP BY g").await;
        assert_eq!(accepting.check(&extremes, &who), Decision::Allow);
        assert_eq!(refusing.check(&sums, &who), Decision::Allow);
        match refusing.check(&extremes, &who) {
            Decision::Deny { rule, reason } => {
                assert_eq!(rule, "engines.honest_majority");
                assert!(reason.contains("MIN or MAX"), "{reason}");
            }
            d => panic!("{d:?}"),
        }
        // HAVING in shares needs the model too, and the refusal says so.
        let having = plan("SELECT g, SUM(x) FROM t GROUP BY g HAVING SUM(x) > 10").await;
        assert!(having.gated());
        match refusing.check(&having, &who) {
            Decision::Deny { rule, reason } => {
                assert_eq!(rule, "engines.honest_majority");
                assert!(reason.contains("its HAVING"), "{reason}");
            }
            d => panic!("{d:?}"),
        }
        assert_eq!(accepting.check(&having, &who), Decision::Allow);
        // A party it does not accept as a compute party: every comparison
        // that would run on it is refused, naming the rule; sums are not.
        let wary = Policy::parse(
            &format!("{text}[engines]\nhonest_majority = true\nrefuse_compute = [\"c\"]\n"),
            Some(&cat),
        )
        .unwrap();
        for p in [&extremes, &having] {
            match wary.check(p, &who) {
                Decision::Deny { rule, reason } => {
                    assert_eq!(rule, "engines.refuse_compute");
                    assert!(reason.contains("would run on c"), "{reason}");
                }
                d => panic!("{d:?}"),
            }
        }
        assert_eq!(wary.check(&sums, &who), Decision::Allow);
        let gated = sums.clone().with_threshold(3).unwrap();
        assert!(matches!(
            wary.check_threshold(&gated),
            Decision::Deny { rule, .. } if rule == "engines.refuse_compute"
        ));
        let only_min = Policy::parse(
            &format!(
                "{}[engines]\nhonest_majority = true\n",
                text.replace("\"min\", \"max\"", "\"min\"")
            ),
            Some(&cat),
        )
        .unwrap();
        match only_min.check(&plan("SELECT MIN(x) FROM t").await, &who) {
            Decision::Deny { rule, reason } => {
                assert_eq!(rule, "tables.t.columns.x");
                assert!(reason.contains("allow max too"), "{reason}");
            }
            d => panic!("{d:?}"),
        }
        let typo = Policy::parse("[engines]\nhonest_majorty = false\n", None).unwrap_err();
        assert!(typo[0].message.contains("honest_majorty"), "{typo:?}");
    }
}

#[cfg(test)]
mod privacy_settings {
    use super::*;
    use planner::QueryOptions;

    const CATALOG: &str = r#"
[tables.t]
columns = [
  { name = "pid", type = "int" },
  { name = "g", type = "text", domain = ["a", "b"] },
  { name = "cost", type = "decimal(10,2)" },
  { name = "los", type = "int" },
]
"#;

    const POLICY: &str = r#"
party = "h1"
[analysts]
allow = ["h1:*", "h2:*"]
[privacy]
mechanism = "gaussian"
epsilon_per_query = 0.5
delta_per_query = 1e-7
colluders = 1
budget = { epsilon = 5, delta = 1e-5, period_days = 7 }
[tables.t]
count_star = true
[tables.t.privacy]
analysts = ["h2:*"]
individual_id = "pid"
max_rows_per_individual = 4
[tables.t.columns.g]
group_by = true
[tables.t.columns.cost]
aggregate = ["count", "sum", "avg"]
clamp = [0, "2500.50"]
[tables.t.columns.los]
aggregate = ["count", "sum"]
"#;

    fn who(party: &str) -> Analyst {
        Analyst {
            party: party.into(),
            name: "x".into(),
            roles: vec![],
        }
    }

    async fn plan(sql: &str) -> FederatedPlan {
        let cat = Catalog::from_toml(CATALOG, "c").unwrap();
        planner::plan_query(
            sql,
            &cat,
            &["h1".into(), "h2".into()],
            &QueryOptions::default(),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_table_requires_dp_for_the_analysts_listed_with_clamps_and_bounds() {
        let cat = Catalog::from_toml(CATALOG, "c").unwrap();
        let pol = Policy::parse(POLICY, Some(&cat)).unwrap();
        let pp = pol.privacy.clone().unwrap();
        assert_eq!(pp.mechanism, Mechanism::Gaussian);
        assert_eq!(pp.epsilon_micro, 500_000);
        assert_eq!(pp.colluders, Some(1));
        assert_eq!(pp.budget.period_days, 7);
        let p = plan("SELECT g, SUM(cost), COUNT(*) FROM t GROUP BY g").await;
        // h1's own analysts are not under DP; h2's are.
        assert!(pol.requirement(&p, &who("h1")).is_none());
        let r = pol.requirement(&p, &who("h2")).unwrap();
        assert_eq!(r.individual_id.as_deref(), Some("pid"));
        assert_eq!(r.max_rows, 4);
        assert_eq!(
            r.clamps["cost"],
            Clamp {
                lo: "0".into(),
                hi: "2500.50".into()
            }
        );
        assert_eq!(pol.check(&p, &who("h2")), Decision::Allow);
        // A sum of a column without a clamp range is refused under DP only.
        let p = plan("SELECT SUM(los) FROM t").await;
        assert_eq!(pol.check(&p, &who("h1")), Decision::Allow);
        match pol.check(&p, &who("h2")) {
            Decision::Deny { rule, reason } => {
                assert_eq!(rule, "tables.t.columns.los.clamp");
                assert!(reason.contains("no clamp range"), "{reason}");
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn privacy_mistakes_are_reported_with_their_lines() {
        let cat = Catalog::from_toml(CATALOG, "c").unwrap();
        let bad = POLICY
            .replace("delta_per_query = 1e-7\n", "")
            .replace("clamp = [0, \"2500.50\"]", "clamp = [3000, 1]")
            .replace("individual_id = \"pid\"", "individual_id = \"patient\"");
        let problems = Policy::parse(&bad, Some(&cat)).unwrap_err();
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 3, "{text:?}");
        assert!(
            text.iter().any(|t| t.contains("needs delta_per_query")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("clamp range [3000, 1] is empty")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.contains("`patient` is not a column")),
            "{text:?}"
        );
        let no_section = "[tables.t.privacy]\nmax_rows_per_individual = 2\n";
        let p = Policy::parse(no_section, None).unwrap_err();
        assert!(p[0].message.contains("no [privacy] section"), "{p:?}");
        let no_budget = "[privacy]\nmechanism = \"laplace\"\nepsilon_per_query = 1\n";
        let p = Policy::parse(no_budget, None).unwrap_err();
        assert!(p[0].message.contains("privacy.budget is missing"), "{p:?}");
    }
}
