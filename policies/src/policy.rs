//! The policy model (TOML) and the checker.

use std::collections::BTreeMap;

use planner::{Catalog, FederatedPlan};
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// Aggregate names a policy may list for a column.
pub const AGGREGATES: &[&str] = &["count", "sum", "avg", "var", "stddev"];

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
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnalysts {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
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
}

/// One party's policy, validated.
#[derive(Debug, Clone)]
pub struct Policy {
    pub party: Option<String>,
    pub allow: Vec<String>,
    pub min_group_size: u64,
    pub tables: BTreeMap<String, TablePolicy>,
}

#[derive(Debug, Clone, Default)]
pub struct TablePolicy {
    pub count_star: bool,
    pub columns: BTreeMap<String, ColumnPolicy>,
}

#[derive(Debug, Clone, Default)]
pub struct ColumnPolicy {
    pub group_by: bool,
    pub filter: bool,
    pub aggregate: Vec<String>,
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
        for a in &raw.analysts.allow {
            let v = a.get_ref();
            let ok = match v.split_once(':') {
                Some(("role", r)) => !r.is_empty() && r != "*",
                Some((p, n)) => !p.is_empty() && !n.is_empty(),
                None => false,
            };
            if !ok {
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
                tp.columns.insert(
                    cname.clone(),
                    ColumnPolicy {
                        group_by: c.group_by,
                        filter: c.filter,
                        aggregate: aggs,
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
            min_group_size: raw
                .results
                .min_group_size
                .map(|m| m.into_inner())
                .unwrap_or(0),
            tables,
        })
    }

    /// Whether `analysts.allow` admits `analyst` at all.
    pub fn admits(&self, analyst: &Analyst) -> bool {
        self.allow.iter().any(|a| match a.split_once(':') {
            Some(("role", r)) => analyst.roles.iter().any(|x| x == r),
            Some((p, "*")) => p == analyst.party,
            Some((p, n)) => p == analyst.party && n == analyst.name,
            None => false,
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
        if plan.uses.count_star && !tp.count_star {
            return deny(
                format!("tables.{t}.count_star"),
                "COUNT(*) over this table is not allowed".into(),
            );
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
                return deny(
                    format!("tables.{t}.columns.{c}"),
                    format!("column {c} may not be used in WHERE"),
                );
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
            }
        }
        if self.min_group_size > 0 {
            return deny(
                "results.min_group_size".into(),
                format!(
                    "this party requires groups of at least {} rows, and Council cannot yet enforce a threshold \
                     without revealing small counts, so it fails closed",
                    self.min_group_size
                ),
            );
        }
        Decision::Allow
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
aggregate = ["sum", "avg"]
"#;

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
        assert_eq!(
            decide("SELECT COUNT(*) FROM patients", &auditor).await,
            Decision::Allow
        );
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
    async fn a_minimum_group_size_fails_closed() {
        let cat = Catalog::from_toml(
            "[tables.t]\ncolumns = [{ name = \"g\", type = \"text\", domain = [\"a\"] }]",
            "c",
        )
        .unwrap();
        let pol = Policy::parse(
            "[analysts]\nallow = [\"a:*\"]\n[results]\nmin_group_size = 5\n[tables.t]\ncount_star = true\n[tables.t.columns.g]\ngroup_by = true\n",
            Some(&cat),
        )
        .unwrap();
        let plan = planner::plan_query(
            "SELECT g, COUNT(*) FROM t GROUP BY g",
            &cat,
            &["a".into()],
            &QueryOptions::default(),
        )
        .await
        .unwrap();
        let who = Analyst {
            party: "a".into(),
            name: "x".into(),
            roles: vec![],
        };
        match pol.check(&plan, &who) {
            Decision::Deny { rule, reason } => {
                assert_eq!(rule, "results.min_group_size");
                assert!(reason.contains("at least 5 rows"), "{reason}");
            }
            d => panic!("{d:?}"),
        }
        let bad = Policy::parse("[results]\nrecipients = \"everyone\"\n", None).unwrap_err();
        assert!(bad[0].message.contains("querying_party"), "{bad:?}");
    }
}
