//! The privacy-budget ledger: one SQLite file per party, kept by that
//! party alone. Every charge is committed (WAL, `synchronous = FULL`: on
//! disk when `charge` returns) before the party lets anything of the query
//! go towards a reveal, so killing the gateway at any point never loses a
//! recorded charge; a charge whose query aborted before that point is
//! refunded (kept, marked `refunded`).
//!
//! Budgets are per analyst over a rolling period: what counts is the sum
//! of the charges (not refunded) of the last `period_days` days.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use planner::privacy::epsilon_text;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::policy::Budget;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("budget ledger {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{0}")]
    OverBudget(String),
}

/// One charge.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    pub query_id: String,
    pub analyst: String,
    pub at_unix: i64,
    pub epsilon_micro: u64,
    pub delta: f64,
    /// `charged` (in flight or ended without a reveal point recorded),
    /// `spent` (past the point where a reveal could happen) or `refunded`.
    pub state: String,
    pub sql: String,
}

/// What an analyst has left.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Remaining {
    pub epsilon_micro: u64,
    pub delta: f64,
}

pub struct Ledger {
    path: PathBuf,
    conn: Mutex<Connection>,
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Ledger {
    /// Opens (or creates) the ledger at `path`.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        let io = |e: rusqlite::Error| LedgerError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let conn = Connection::open(path).map_err(io)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS charges (
               query_id TEXT PRIMARY KEY,
               analyst TEXT NOT NULL,
               at_unix INTEGER NOT NULL,
               epsilon_micro INTEGER NOT NULL,
               delta REAL NOT NULL,
               state TEXT NOT NULL CHECK (state IN ('charged', 'spent', 'refunded')),
               sql TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS charges_by_analyst ON charges (analyst, at_unix);",
        )
        .map_err(io)?;
        Ok(Ledger {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    fn io(&self, e: rusqlite::Error) -> LedgerError {
        LedgerError::Io {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What `analyst` has left of `budget` at time `now`.
    /// What all analysts of `party` have left together under `budget`.
    pub fn remaining_for_party(
        &self,
        party: &str,
        budget: &Budget,
        now: i64,
    ) -> Result<Remaining, LedgerError> {
        let conn = self.conn();
        let (e, d) = spent_by_party(&conn, party, budget, now).map_err(|e| self.io(e))?;
        Ok(remaining_of(budget, e, d))
    }

    pub fn remaining(
        &self,
        analyst: &str,
        budget: &Budget,
        now: i64,
    ) -> Result<Remaining, LedgerError> {
        let conn = self.conn();
        spent_in_period(&conn, analyst, budget, now)
            .map(|(e, d)| remaining_of(budget, e, d))
            .map_err(|e| self.io(e))
    }

    /// Records a charge of (ε, δ) for `query_id`, durably, if it fits the
    /// budget; otherwise refuses, naming what is left.
    #[allow(clippy::too_many_arguments)]
    pub fn charge(
        &self,
        query_id: &str,
        analyst: &str,
        epsilon_micro: u64,
        delta: f64,
        budget: &Budget,
        party_budget: Option<&Budget>,
        now: i64,
        sql: &str,
    ) -> Result<Remaining, LedgerError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.io(e))?;
        let (e, d) = spent_in_period(&tx, analyst, budget, now).map_err(|e| self.io(e))?;
        let left = remaining_of(budget, e, d);
        if epsilon_micro > left.epsilon_micro || delta > left.delta + 1e-18 {
            return Err(LedgerError::OverBudget(over_budget_message(
                analyst,
                budget,
                left,
                epsilon_micro,
                delta,
            )));
        }
        if let Some(pb) = party_budget {
            let party = party_of(analyst);
            let (e, d) = spent_by_party(&tx, party, pb, now).map_err(|e| self.io(e))?;
            let left = remaining_of(pb, e, d);
            if epsilon_micro > left.epsilon_micro || delta > left.delta + 1e-18 {
                return Err(LedgerError::OverBudget(over_budget_message(
                    &format!("all analysts of {party} together"),
                    pb,
                    left,
                    epsilon_micro,
                    delta,
                )));
            }
        }
        tx.execute(
            "INSERT INTO charges (query_id, analyst, at_unix, epsilon_micro, delta, state, sql)
             VALUES (?1, ?2, ?3, ?4, ?5, 'charged', ?6)",
            params![query_id, analyst, now, epsilon_micro as i64, delta, sql],
        )
        .map_err(|e| self.io(e))?;
        tx.commit().map_err(|e| self.io(e))?;
        Ok(Remaining {
            epsilon_micro: left.epsilon_micro - epsilon_micro,
            delta: (left.delta - delta).max(0.0),
        })
    }

    /// Gives a charge back: its query aborted before any reveal could
    /// happen. A charge already `spent` stays spent.
    pub fn refund(&self, query_id: &str) -> Result<bool, LedgerError> {
        self.conn()
            .execute(
                "UPDATE charges SET state = 'refunded' WHERE query_id = ?1 AND state = 'charged'",
                params![query_id],
            )
            .map(|n| n > 0)
            .map_err(|e| self.io(e))
    }

    /// Marks a charge as past the reveal point: never refunded.
    pub fn mark_spent(&self, query_id: &str) -> Result<(), LedgerError> {
        self.conn()
            .execute(
                "UPDATE charges SET state = 'spent' WHERE query_id = ?1 AND state = 'charged'",
                params![query_id],
            )
            .map(|_| ())
            .map_err(|e| self.io(e))
    }

    /// Every charge (of one analyst), newest first.
    pub fn charges(&self, analyst: Option<&str>) -> Result<Vec<Charge>, LedgerError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "{CHARGE_COLUMNS} WHERE ?1 IS NULL OR analyst = ?1 ORDER BY at_unix DESC, rowid DESC"
            ))
            .map_err(|e| self.io(e))?;
        let rows = stmt
            .query_map(params![analyst], charge_of_row)
            .map_err(|e| self.io(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.io(e))
    }

    /// The charge of `query_id`, if any.
    pub fn get(&self, query_id: &str) -> Result<Option<Charge>, LedgerError> {
        self.conn()
            .query_row(
                &format!("{CHARGE_COLUMNS} WHERE query_id = ?1"),
                params![query_id],
                charge_of_row,
            )
            .optional()
            .map_err(|e| self.io(e))
    }
}

const CHARGE_COLUMNS: &str =
    "SELECT query_id, analyst, at_unix, epsilon_micro, delta, state, sql FROM charges";

fn charge_of_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Charge> {
    Ok(Charge {
        query_id: r.get(0)?,
        analyst: r.get(1)?,
        at_unix: r.get(2)?,
        epsilon_micro: r.get::<_, i64>(3)?.max(0) as u64,
        delta: r.get(4)?,
        state: r.get(5)?,
        sql: r.get(6)?,
    })
}

/// Whose spending a budget counts: one analyst, or every analyst of a party.
enum Spender<'a> {
    Analyst(&'a str),
    Party(&'a str),
}

fn spent_in_period(
    conn: &Connection,
    analyst: &str,
    budget: &Budget,
    now: i64,
) -> rusqlite::Result<(u64, f64)> {
    spent(conn, Spender::Analyst(analyst), budget, now)
}

/// What every analyst of `party` spent together in the period.
fn spent_by_party(
    conn: &Connection,
    party: &str,
    budget: &Budget,
    now: i64,
) -> rusqlite::Result<(u64, f64)> {
    spent(conn, Spender::Party(party), budget, now)
}

fn spent(
    conn: &Connection,
    who: Spender<'_>,
    budget: &Budget,
    now: i64,
) -> rusqlite::Result<(u64, f64)> {
    let since = now - budget.period_days as i64 * 86_400;
    let (filter, key) = match who {
        Spender::Analyst(a) => ("analyst = ?1", a),
        Spender::Party(p) => ("substr(analyst, 1, length(?1) + 1) = ?1 || ':'", p),
    };
    conn.query_row(
        &format!(
            "SELECT COALESCE(SUM(epsilon_micro), 0), COALESCE(SUM(delta), 0.0) FROM charges
             WHERE {filter} AND at_unix > ?2 AND state != 'refunded'"
        ),
        params![key, since],
        |r| Ok((r.get::<_, i64>(0)?.max(0) as u64, r.get::<_, f64>(1)?)),
    )
}

/// The party of a ledger's `PARTY:NAME` analyst key.
fn party_of(analyst: &str) -> &str {
    analyst.split_once(':').map(|(p, _)| p).unwrap_or(analyst)
}

fn remaining_of(budget: &Budget, eps: u64, delta: f64) -> Remaining {
    Remaining {
        epsilon_micro: budget.epsilon_micro.saturating_sub(eps),
        delta: (budget.delta - delta).max(0.0),
    }
}

/// The refusal an analyst sees.
pub fn over_budget_message(
    analyst: &str,
    budget: &Budget,
    left: Remaining,
    epsilon_micro: u64,
    delta: f64,
) -> String {
    let mut m = format!(
        "privacy budget exhausted for {analyst}: ε = {} left of {} for the rolling {}-day period, this query needs ε = {}",
        epsilon_text(left.epsilon_micro),
        epsilon_text(budget.epsilon_micro),
        budget.period_days,
        epsilon_text(epsilon_micro)
    );
    if delta > 0.0 {
        m.push_str(&format!(
            " (δ = {delta:e}; δ left {:e} of {:e})",
            left.delta, budget.delta
        ));
    }
    m.push_str("; charges older than the period no longer count");
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Budget {
        Budget {
            epsilon_micro: 3_000_000,
            delta: 0.0,
            period_days: 30,
            per_party: None,
        }
    }

    #[test]
    fn charges_refunds_and_refusals_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("budget.sqlite");
        let b = budget();
        let now = 1_000_000_000;
        {
            let l = Ledger::open(&path).unwrap();
            l.charge("q1", "a:alice", 1_000_000, 0.0, &b, None, now, "SELECT 1")
                .unwrap();
            l.charge("q2", "a:alice", 1_500_000, 0.0, &b, None, now, "SELECT 2")
                .unwrap();
            // Aborted before the reveal: refunded.
            assert!(l.refund("q2").unwrap());
            l.charge("q3", "a:alice", 1_500_000, 0.0, &b, None, now, "SELECT 3")
                .unwrap();
            l.mark_spent("q3").unwrap();
            // A spent charge is never refunded.
            assert!(!l.refund("q3").unwrap());
        }
        // Reopened (a restart): 2.5 of 3 spent.
        let l = Ledger::open(&path).unwrap();
        let left = l.remaining("a:alice", &b, now).unwrap();
        assert_eq!(left.epsilon_micro, 500_000);
        let e = l
            .charge("q4", "a:alice", 1_000_000, 0.0, &b, None, now, "SELECT 4")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ε = 0.5 left of 3"), "{e}");
        assert!(e.contains("needs ε = 1"), "{e}");
        // Other analysts have their own budget; old charges age out.
        l.charge("q5", "b:bob", 3_000_000, 0.0, &b, None, now, "SELECT 5")
            .unwrap();
        let later = now + 31 * 86_400;
        assert_eq!(
            l.remaining("a:alice", &b, later).unwrap().epsilon_micro,
            3_000_000
        );
        let all = l.charges(Some("a:alice")).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(l.get("q2").unwrap().unwrap().state, "refunded");
        // A party cap counts every analyst of the party together: invented
        // names do not get fresh budgets.
        let cap = Budget {
            epsilon_micro: 4_000_000,
            delta: 0.0,
            period_days: 30,
            per_party: None,
        };
        l.charge(
            "q6",
            "a:carol",
            1_000_000,
            0.0,
            &b,
            Some(&cap),
            now,
            "SELECT 6",
        )
        .unwrap();
        let e = l
            .charge(
                "q7",
                "a:mallory",
                1_000_000,
                0.0,
                &b,
                Some(&cap),
                now,
                "SELECT 7",
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("all analysts of a together"), "{e}");
        // a:alice spent 2.5 and a:carol 1 of the party's 4.
        assert_eq!(
            l.remaining_for_party("a", &cap, now).unwrap().epsilon_micro,
            500_000
        );
        assert_eq!(
            l.remaining_for_party("b", &cap, now).unwrap().epsilon_micro,
            1_000_000
        );
    }

    /// Killing the gateway (SIGKILL, no chance to clean up) while it charges
    /// loses no charge it had reported as recorded. The test runs itself as
    /// a child process that charges in a loop and prints each query id once
    /// `charge` returned; the parent kills it mid-loop and reopens the file.
    #[test]
    fn kill_9_during_charges_loses_nothing_recorded() {
        use std::io::{BufRead, Write};
        if let Ok(path) = std::env::var("COUNCIL_LEDGER_CHILD") {
            let l = Ledger::open(Path::new(&path)).unwrap();
            let b = Budget {
                epsilon_micro: u64::MAX / 4,
                delta: 0.0,
                period_days: 30,
                per_party: None,
            };
            let mut out = std::io::stdout();
            for i in 0.. {
                l.charge(
                    &format!("q{i}"),
                    "a:alice",
                    1,
                    0.0,
                    &b,
                    None,
                    now_unix(),
                    "SELECT 1",
                )
                .unwrap();
                writeln!(out, "recorded q{i}").unwrap();
                out.flush().unwrap();
            }
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("budget.sqlite");
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "ledger::tests::kill_9_during_charges_loses_nothing_recorded",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("COUNCIL_LEDGER_CHILD", &path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut recorded = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(id) = line.strip_prefix("recorded ") {
                recorded.push(id.to_string());
                if recorded.len() == 150 {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert_eq!(recorded.len(), 150, "the child stopped early");
        let l = Ledger::open(&path).unwrap();
        for id in &recorded {
            assert!(
                l.get(id).unwrap().is_some(),
                "charge {id} was reported recorded but is gone"
            );
        }
        assert!(l.charges(None).unwrap().len() >= recorded.len());
    }
}
