//! The syntactic gate: one pass over the SQL's syntax tree that refuses what
//! Council does not compute yet, with the construct and its line and column.
//!
//! DataFusion's logical plan no longer knows where a construct was written,
//! so everything we can name by position is refused here, before planning.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    Expr, GroupByExpr, Query, SelectItem, SetExpr, Spanned, Statement, TableFactor,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::Span;

use crate::PlanError;

const AGG_HINT: &str =
    "Council computes COUNT, SUM, AVG, VAR_SAMP, VAR_POP, STDDEV_SAMP, STDDEV_POP, MIN and MAX so far";

/// Aggregates Council does not compute yet (most need more of the
/// replicated engine's comparisons).
const LATER_AGGREGATES: &[&str] = &[
    "median",
    "approx_median",
    "approx_percentile_cont",
    "approx_percentile_cont_with_weight",
    "percentile_cont",
    "percentile_disc",
    "approx_distinct",
    "mode",
    "first_value",
    "last_value",
    "nth_value",
    "array_agg",
    "string_agg",
    "bit_and",
    "bit_or",
    "bit_xor",
    "bool_and",
    "bool_or",
    "corr",
    "covar",
    "covar_samp",
    "covar_pop",
    "regr_slope",
    "regr_intercept",
    "regr_count",
    "regr_r2",
    "regr_avgx",
    "regr_avgy",
    "regr_sxx",
    "regr_syy",
    "regr_sxy",
    "grouping",
    "any_value",
    "listagg",
];

pub fn position(span: Span) -> String {
    if span.start.line == 0 {
        "position unknown".to_string()
    } else {
        format!("line {}, column {}", span.start.line, span.start.column)
    }
}

/// Parses `sql` and refuses unsupported constructs. Returns the one statement.
/// Call it on the planning thread ([`crate::limits::on_planning_thread`]):
/// a deep syntax tree needs its stack.
pub fn parse_and_check(sql: &str) -> Result<Statement, PlanError> {
    crate::limits::check_text(sql)?;
    let mut stmts =
        Parser::parse_sql(&GenericDialect {}, sql).map_err(|e| PlanError::Syntax(e.to_string()))?;
    if stmts.len() != 1 {
        return Err(PlanError::Invalid(format!(
            "expected exactly one SQL statement, found {}; send one SELECT at a time",
            stmts.len()
        )));
    }
    let stmt = stmts.remove(0);
    crate::limits::check_statement(&stmt)?;
    let Statement::Query(query) = &stmt else {
        return Err(PlanError::not_permitted(
            first_word(&stmt),
            position(stmt.span()),
            "Council answers SELECT queries only; it never changes a party's data",
        ));
    };
    check_query(query)?;
    check_expressions(&stmt)?;
    Ok(stmt)
}

fn first_word(stmt: &Statement) -> String {
    let s = stmt.to_string();
    s.split_whitespace()
        .next()
        .unwrap_or("statement")
        .to_uppercase()
        + " statement"
}

fn check_query(q: &Query) -> Result<(), PlanError> {
    if let Some(with) = &q.with {
        return Err(PlanError::not_supported(
            "WITH (common table expression)",
            position(with.span()),
            "write the query as one SELECT over a federated table",
        ));
    }
    if q.fetch.is_some()
        || !q.locks.is_empty()
        || q.for_clause.is_some()
        || !q.pipe_operators.is_empty()
    {
        return Err(PlanError::not_supported(
            "this query clause",
            position(q.span()),
            "use LIMIT instead of FETCH",
        ));
    }
    let select = match q.body.as_ref() {
        SetExpr::Select(s) => s,
        SetExpr::Query(inner) => {
            return Err(PlanError::not_supported(
                "a parenthesised subquery",
                position(inner.span()),
                "remove the parentheses",
            ))
        }
        SetExpr::SetOperation { op, .. } => {
            return Err(PlanError::not_supported(
                format!("{op}"),
                position(q.body.span()),
                "run each SELECT on its own",
            ))
        }
        other => {
            return Err(PlanError::not_supported(
                "this kind of query body",
                position(other.span()),
                "Council answers one SELECT ... FROM a federated table",
            ))
        }
    };
    if select.distinct.is_some() {
        return Err(PlanError::not_permitted(
            "SELECT DISTINCT",
            position(select.span()),
            "it would reveal which raw values exist; GROUP BY a column with a public domain instead",
        ));
    }
    if select.top.is_some()
        || select.into.is_some()
        || !select.lateral_views.is_empty()
        || select.prewhere.is_some()
        || !select.connect_by.is_empty()
        || !select.cluster_by.is_empty()
        || !select.distribute_by.is_empty()
        || !select.sort_by.is_empty()
        || select.qualify.is_some()
        || !select.named_window.is_empty()
    {
        return Err(PlanError::not_supported(
            "a dialect-specific SELECT clause",
            position(select.span()),
            "use standard SELECT ... FROM ... WHERE ... GROUP BY ... HAVING ... ORDER BY ... LIMIT",
        ));
    }
    for item in &select.projection {
        match item {
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {
                return Err(PlanError::not_permitted(
                    "SELECT *",
                    position(item.span()),
                    "it would return a party's raw rows; select aggregates such as COUNT(*) or SUM(col)",
                ))
            }
            _ => {}
        }
    }
    match select.from.len() {
        0 => {
            return Err(PlanError::Invalid(
                "the query has no FROM clause; name a federated table, as in SELECT COUNT(*) FROM patients".into(),
            ))
        }
        1 => {}
        _ => {
            return Err(PlanError::not_supported(
                "a join across tables",
                position(select.from[1].span()),
                "joins across parties need private set intersection, which is not built yet",
            ))
        }
    }
    let from = &select.from[0];
    if let Some(j) = from.joins.first() {
        return Err(PlanError::not_supported(
            "JOIN",
            position(j.span()),
            "joins across parties need private set intersection, which is not built yet",
        ));
    }
    match &from.relation {
        TableFactor::Table {
            args: None,
            with_hints,
            version: None,
            partitions,
            ..
        } if with_hints.is_empty() && partitions.is_empty() => {}
        TableFactor::Derived { .. } => {
            return Err(PlanError::not_supported(
                "a subquery in FROM",
                position(from.relation.span()),
                "query a federated table directly",
            ))
        }
        other => {
            return Err(PlanError::not_supported(
                "this kind of FROM item",
                position(other.span()),
                "query a federated table directly",
            ))
        }
    }
    match &select.group_by {
        GroupByExpr::All(_) => {
            return Err(PlanError::not_supported(
                "GROUP BY ALL",
                position(select.group_by.span()),
                "list the group columns",
            ))
        }
        GroupByExpr::Expressions(exprs, modifiers) => {
            if !modifiers.is_empty() {
                return Err(PlanError::not_supported(
                    "GROUP BY modifiers (ROLLUP, CUBE, TOTALS)",
                    position(select.group_by.span()),
                    "list the group columns",
                ));
            }
            for e in exprs {
                match e {
                    Expr::Identifier(_) | Expr::CompoundIdentifier(_) => {}
                    Expr::Value(_) => {
                        return Err(PlanError::not_supported(
                            "GROUP BY by position",
                            position(e.span()),
                            "name the group column instead of its number",
                        ))
                    }
                    Expr::Rollup(_) | Expr::Cube(_) | Expr::GroupingSets(_) => {
                        return Err(PlanError::not_supported(
                            "ROLLUP, CUBE and GROUPING SETS",
                            position(e.span()),
                            "run one query per grouping",
                        ))
                    }
                    _ => {
                        return Err(PlanError::not_supported(
                            format!("GROUP BY expression `{e}`"),
                            position(e.span()),
                            "group by a column whose domain the catalog declares",
                        ))
                    }
                }
            }
        }
    }
    Ok(())
}

fn check_expressions(stmt: &Statement) -> Result<(), PlanError> {
    let mut found: Option<PlanError> = None;
    let _ = datafusion::sql::sqlparser::ast::visit_expressions(stmt, |e: &Expr| {
        let err = match e {
            Expr::Subquery(_) | Expr::InSubquery { .. } | Expr::Exists { .. } => {
                Some(PlanError::not_supported(
                    "a subquery",
                    position(e.span()),
                    "write the condition without a nested SELECT",
                ))
            }
            Expr::Function(f) => {
                let name = f.name.to_string().to_ascii_lowercase();
                if f.over.is_some() {
                    Some(PlanError::not_supported(
                        format!("window function {}", name.to_uppercase()),
                        position(e.span()),
                        "window functions would run over rows of several parties",
                    ))
                } else if LATER_AGGREGATES.contains(&name.as_str()) {
                    Some(PlanError::not_supported(
                        format!("aggregate {}", name.to_uppercase()),
                        position(e.span()),
                        format!(
                            "it needs secure comparison, which the next engine brings; {AGG_HINT}"
                        ),
                    ))
                } else {
                    None
                }
            }
            _ => None,
        };
        match err {
            Some(err) => {
                found = Some(err);
                ControlFlow::Break(())
            }
            None => ControlFlow::Continue(()),
        }
    });
    match found {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Where `column` is first used in the statement, for errors found after
/// planning (which has no positions).
pub fn column_position(stmt: &Statement, column: &str) -> Option<String> {
    let mut found = None;
    let _ = datafusion::sql::sqlparser::ast::visit_expressions(stmt, |e: &Expr| {
        let hit = match e {
            Expr::Identifier(i) => i.value.eq_ignore_ascii_case(column),
            Expr::CompoundIdentifier(parts) => parts
                .last()
                .is_some_and(|i| i.value.eq_ignore_ascii_case(column)),
            _ => false,
        };
        if hit {
            found = Some(position(e.span()));
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    found
}

/// Where a call of the function `name` first appears.
pub fn function_position(stmt: &Statement, name: &str) -> Option<String> {
    let mut found = None;
    let _ = datafusion::sql::sqlparser::ast::visit_expressions(stmt, |e: &Expr| {
        if let Expr::Function(f) = e {
            if f.name.to_string().eq_ignore_ascii_case(name) {
                found = Some(position(e.span()));
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    });
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(sql: &str) -> String {
        parse_and_check(sql).unwrap_err().to_string()
    }

    #[test]
    fn names_the_construct_and_its_position() {
        let e = err("SELECT MEDIAN(cost) FROM patients");
        assert!(
            e.contains("not supported yet: aggregate MEDIAN at line 1, column 8"),
            "{e}"
        );
        let e = err("SELECT COUNT(*) FROM patients p\n  JOIN visits v ON p.id = v.id");
        assert!(e.contains("JOIN at line 2"), "{e}");
        let e = err("SELECT * FROM patients");
        assert!(
            e.starts_with("not permitted: SELECT * at line 1, column 8"),
            "{e}"
        );
        let e = err("SELECT COUNT(*) OVER () FROM patients");
        assert!(e.contains("window function COUNT"), "{e}");
        let e = err("SELECT COUNT(*) FROM patients WHERE cost > (SELECT 1)");
        assert!(e.contains("a subquery at line 1"), "{e}");
        let e = err("DELETE FROM patients");
        assert!(e.contains("not permitted: DELETE statement"), "{e}");
        let e = err("SELECT COUNT(*) FROM patients GROUP BY 1");
        assert!(e.contains("GROUP BY by position"), "{e}");
        assert!(err("SELEC 1").starts_with("SQL syntax error"));
    }

    #[test]
    fn accepts_plain_aggregate_queries() {
        parse_and_check(
            "SELECT age_band, COUNT(*), AVG(cost) FROM patients WHERE diagnosis = 'E11' \
             GROUP BY age_band HAVING COUNT(*) > 3 ORDER BY age_band LIMIT 5",
        )
        .unwrap();
    }
}
