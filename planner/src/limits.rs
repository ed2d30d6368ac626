//! Limits on what one SQL text may ask of a gateway, and the thread that
//! plans it.
//!
//! SQL comes from an analyst and, at a peer, from another party's gateway:
//! neither may take a gateway down. Parsing, the syntactic gate, DataFusion's
//! planner and the checks that follow all recurse over the expression tree,
//! and a left-deep chain such as `a <> 0 AND a <> 1 AND …` (what a BI tool
//! writes for a long filter list) is as deep as it is long. So:
//!
//! - the text is at most [`MAX_SQL_BYTES`] long, which bounds every tree;
//! - planning runs on a thread of its own with a [`PLAN_STACK_BYTES`] stack,
//!   enough for the deepest tree that text can hold (DataFusion's
//!   `recursive_protection` grows its own recursions on the heap as well);
//! - after parsing, expressions nested deeper than [`MAX_EXPR_DEPTH`] and
//!   IN lists longer than [`MAX_IN_LIST`] are refused with a message that
//!   says how to write the query instead, because the local part is
//!   evaluated by DataFusion on ordinary worker threads, whose stacks are
//!   small.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{Expr, Spanned, Statement, Visit, Visitor};

use crate::PlanError;

/// The longest SQL text a gateway plans (256 KiB).
pub const MAX_SQL_BYTES: usize = 256 * 1024;
/// The deepest nesting of expressions (a chain of N ANDs is N deep).
pub const MAX_EXPR_DEPTH: usize = 500;
/// The most values in one `IN (…)` list.
pub const MAX_IN_LIST: usize = 10_000;
/// Queries planned at once (each on its own thread).
pub const MAX_PLANNING: usize = 256;
/// The stack of the planning thread. Only the pages a plan touches are
/// committed; the rest is address space.
pub const PLAN_STACK_BYTES: usize = 256 * 1024 * 1024;

/// Refuses a text longer than [`MAX_SQL_BYTES`], before anything parses it.
pub fn check_text(sql: &str) -> Result<(), PlanError> {
    if sql.len() > MAX_SQL_BYTES {
        return Err(PlanError::Invalid(format!(
            "the SQL text is {} bytes long; a gateway plans at most {} bytes. \
             Shorten it: a long list of conditions on one column is shorter as `col IN (…)` or `col NOT IN (…)`",
            sql.len(),
            MAX_SQL_BYTES
        )));
    }
    Ok(())
}

/// Refuses expressions nested deeper than [`MAX_EXPR_DEPTH`] and IN lists
/// longer than [`MAX_IN_LIST`]. Runs on the planning thread (it recurses).
pub fn check_statement(stmt: &Statement) -> Result<(), PlanError> {
    struct Depth {
        now: usize,
        found: Option<PlanError>,
    }
    impl Visitor for Depth {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            self.now += 1;
            if self.now > MAX_EXPR_DEPTH {
                self.found = Some(PlanError::not_permitted(
                    format!("an expression nested more than {MAX_EXPR_DEPTH} levels deep"),
                    crate::ast_check::position(e.span()),
                    "a gateway evaluates expressions of bounded depth only; write a long list of conditions \
                     on one column as `col IN (…)` or `col NOT IN (…)`, or split the query",
                ));
                return ControlFlow::Break(());
            }
            if let Expr::InList { list, .. } = e {
                if list.len() > MAX_IN_LIST {
                    self.found = Some(PlanError::not_permitted(
                        format!("an IN list of {} values", list.len()),
                        crate::ast_check::position(e.span()),
                        format!("at most {MAX_IN_LIST} values per IN list; split the query"),
                    ));
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        }
        fn post_visit_expr(&mut self, _e: &Expr) -> ControlFlow<()> {
            self.now -= 1;
            ControlFlow::Continue(())
        }
    }
    let mut v = Depth {
        now: 0,
        found: None,
    };
    let _ = stmt.visit(&mut v);
    match v.found {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Runs `work` on a planning thread with a [`PLAN_STACK_BYTES`] stack and
/// waits for it without blocking the caller's async runtime. The closure
/// owns everything it touches, so the deep trees it builds are also dropped
/// on that thread.
pub async fn on_planning_thread<T, F>(work: F) -> Result<T, PlanError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, PlanError> + Send + 'static,
{
    // Planning threads at once, in this process: each may touch a deep
    // stack, and a peer or analyst may send many texts at a time.
    static PLANNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            PLANNING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    if PLANNING.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= MAX_PLANNING {
        PLANNING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        return Err(PlanError::Invalid(format!(
            "this gateway is planning {MAX_PLANNING} queries at once; try again in a moment"
        )));
    }
    let leave = Leave;
    let (tx, rx) = futures::channel::oneshot::channel();
    std::thread::Builder::new()
        .name("council-plan".into())
        .stack_size(PLAN_STACK_BYTES)
        .spawn(move || {
            let _leave = leave;
            let _ = tx.send(work());
        })
        .map_err(|e| PlanError::Internal(format!("cannot start a planning thread: {e}")))?;
    rx.await
        .map_err(|_| PlanError::Internal("the planning thread ended without an answer".into()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize) -> String {
        let mut s = String::from("SELECT COUNT(*) FROM patients WHERE los <> 0");
        for i in 1..n {
            s.push_str(&format!(" AND los <> {i}"));
        }
        s
    }

    #[tokio::test]
    async fn deep_and_long_sql_is_refused_with_a_hint_not_a_crash() {
        let deep = chain(3_000);
        let e = on_planning_thread(move || crate::ast_check::parse_and_check(&deep).map(|_| ()))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("nested more than 500 levels"), "{e}");
        assert!(e.contains("IN ("), "{e}");
        let long = "x".repeat(MAX_SQL_BYTES + 1);
        let e = check_text(&long).unwrap_err().to_string();
        assert!(e.contains("at most 262144 bytes"), "{e}");
        // Deeper than any limit: still an error, on a big enough stack.
        let deepest = chain(15_000);
        assert!(deepest.len() < MAX_SQL_BYTES);
        let r = on_planning_thread(move || crate::ast_check::parse_and_check(&deepest).map(|_| ()))
            .await;
        assert!(r.is_err());
        let nested = format!(
            "SELECT COUNT(*) FROM patients WHERE {}los{} > 0",
            "(".repeat(2000),
            ")".repeat(2000)
        );
        let r = on_planning_thread(move || crate::ast_check::parse_and_check(&nested).map(|_| ()))
            .await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn a_chain_within_the_limit_parses() {
        let ok = chain(400);
        on_planning_thread(move || crate::ast_check::parse_and_check(&ok).map(|_| ()))
            .await
            .unwrap();
    }
}
