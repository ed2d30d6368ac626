//! Council's planner: SQL text → [`FederatedPlan`].
//!
//! Invariants:
//! - **No I/O.** The planner reads only the SQL text, the federated catalog and
//!   the query options it is given. Tables are planned against empty stand-ins
//!   that carry the catalog's schema.
//! - **Deterministic.** The same SQL, catalog, options and leader give the
//!   same plan and the same fingerprint on every gateway; that is how
//!   gateways agree without trusting each other's plans. The plan's secure
//!   part (`FederatedPlan::program`: operators and every party's roles) is
//!   in the fingerprint; a plan only runs once `led_by` named its leader.
//! - **No data-dependent outcome.** The local part contains only expressions
//!   that return a value for every row (`total`), so whether a query
//!   succeeds depends on no party's rows. A column's use is classed by what
//!   the analyst can learn through it (`plan::ColumnUses`).
//! - **Bounded.** SQL length, expression depth and list sizes are limited,
//!   and planning runs on its own large stack (`limits`).
//! - **Fails closed.** Anything that is not positively understood (a construct,
//!   an aggregate, a group column without a public domain) is refused with an
//!   error that names it and its position.
#![forbid(unsafe_code)]

pub mod ast_check;
pub mod catalog;
pub mod finalize;
pub mod having;
pub mod limits;
pub mod plan;
pub mod privacy;
pub mod total;

pub use catalog::{Catalog, ColumnDef, ColumnType, Domain, DomainValue, TableDef};
pub use plan::{
    plan_query, AggKind, AggregateOutput, ColumnUse, ColumnUses, FederatedPlan, GroupColumn,
    GroupSpace, LocalPart, Partial, PartialKind, QueryOptions,
};

/// Why a query could not be planned. Every message names the cause and, where
/// there is one, the fix.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum PlanError {
    #[error("SQL syntax error: {0}")]
    Syntax(String),
    #[error("not supported yet: {construct} at {position}; {hint}")]
    NotSupported {
        construct: String,
        position: String,
        hint: String,
    },
    #[error("not permitted: {construct} at {position}; {hint}")]
    NotPermitted {
        construct: String,
        position: String,
        hint: String,
    },
    #[error("catalog error: {0}")]
    Catalog(String),
    #[error("{0}")]
    Invalid(String),
    #[error("internal planner error: {0}; please report this")]
    Internal(String),
}

impl PlanError {
    pub(crate) fn not_supported(
        construct: impl Into<String>,
        position: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        PlanError::NotSupported {
            construct: construct.into(),
            position: position.into(),
            hint: hint.into(),
        }
    }
    pub(crate) fn not_permitted(
        construct: impl Into<String>,
        position: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        PlanError::NotPermitted {
            construct: construct.into(),
            position: position.into(),
            hint: hint.into(),
        }
    }
}

/// Splits a leading `EXPLAIN` off `sql`: `(true, rest)` for `EXPLAIN SELECT
/// ...`, `(false, sql)` otherwise. `EXPLAIN ANALYZE` is kept whole, so the
/// planner refuses it (it would run the query).
pub fn split_explain(sql: &str) -> (bool, &str) {
    let t = sql.trim_start();
    let Some(head) = t.get(..8) else {
        return (false, sql);
    };
    if head.eq_ignore_ascii_case("explain ") || head.eq_ignore_ascii_case("explain\n") {
        let rest = t[8..].trim_start();
        let analyze = rest
            .get(..7)
            .is_some_and(|w| w.eq_ignore_ascii_case("analyze"));
        if !analyze {
            return (true, rest);
        }
    }
    (false, sql)
}

#[cfg(test)]
mod tests {
    use super::split_explain;

    #[test]
    fn explain_prefix() {
        assert_eq!(split_explain("  explain SELECT 1"), (true, "SELECT 1"));
        assert_eq!(
            split_explain("EXPLAIN ANALYZE SELECT 1"),
            (false, "EXPLAIN ANALYZE SELECT 1")
        );
        assert_eq!(
            split_explain("SELECT explain FROM t"),
            (false, "SELECT explain FROM t")
        );
        assert_eq!(split_explain("ex"), (false, "ex"));
    }
}
