//! How a DP answer tells its readers what noise it carries: Arrow field
//! metadata (Flight SQL clients and BI tools read it from the schema) and
//! a footer for the CLI.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use planner::finalize::ColumnNoise;
use planner::privacy::{epsilon_text, DpParams, Mechanism};

/// Schema-level key: the query's mechanism and ε (and δ).
pub const PRIVACY_KEY: &str = "council.privacy";
/// Field-level keys.
pub const NOISE_KEY: &str = "council.noise";
pub const CI95_KEY: &str = "council.noise.ci95";
pub const NOTE_KEY: &str = "council.noise.note";

/// One line: mechanism, ε, δ and who required it.
pub fn summary(p: &DpParams) -> String {
    let mut s = format!(
        "differential privacy: {} mechanism, ε = {}",
        p.mechanism.name(),
        epsilon_text(p.epsilon_micro)
    );
    if p.mechanism == Mechanism::Gaussian {
        s.push_str(&format!(", δ = {:e}", p.delta));
    }
    s.push_str(&format!(
        " for this query (required by {}); values clamped and rows per individual bounded as EXPLAIN shows",
        p.required_by.join(", ")
    ));
    if p.min_group_size > 0 {
        s.push_str(&format!(
            "; groups whose noised row count is below {} are left out",
            p.min_group_size
        ));
    }
    s
}

/// The answer's schema and batches with the noise of each column in the
/// field metadata.
pub fn annotate(
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    privacy: Option<&str>,
    noise: &[Option<ColumnNoise>],
) -> Result<(SchemaRef, Vec<RecordBatch>), arrow::error::ArrowError> {
    let Some(privacy) = privacy else {
        return Ok((schema, batches));
    };
    // The batches' own schema (nullability may differ from the plan's).
    let schema = batches.first().map(|b| b.schema()).unwrap_or(schema);
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let mut md = f.metadata().clone();
            if let Some(Some(n)) = noise.get(i) {
                md.insert(NOISE_KEY.into(), n.distribution.clone());
                if let Some(w) = n.ci95 {
                    md.insert(CI95_KEY.into(), format!("{w}"));
                }
                md.insert(NOTE_KEY.into(), n.note.clone());
            }
            f.as_ref().clone().with_metadata(md)
        })
        .collect();
    let mut md: HashMap<String, String> = schema.metadata().clone();
    md.insert(PRIVACY_KEY.into(), privacy.to_string());
    let schema = Arc::new(Schema::new_with_metadata(fields, md));
    let batches = batches
        .into_iter()
        .map(|b| b.with_schema(schema.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

/// The CLI's footer for an annotated schema, if it has noise.
pub fn footer(schema: &Schema) -> Option<String> {
    let privacy = schema.metadata().get(PRIVACY_KEY)?;
    let mut s = format!("{privacy}\n");
    for f in schema.fields() {
        let Some(noise) = f.metadata().get(NOISE_KEY) else {
            continue;
        };
        s.push_str(&format!("  {}: {noise}", f.name()));
        if let Some(w) = f.metadata().get(CI95_KEY) {
            s.push_str(&format!("; 95% interval: value ± {w}"));
        }
        if let Some(n) = f.metadata().get(NOTE_KEY) {
            s.push_str(&format!(" ({n})"));
        }
        s.push('\n');
    }
    Some(s)
}

/// `council budget show`: the budget, then per analyst what is spent and
/// left in the current period, then every charge, newest first.
pub fn budget_report(
    party: &str,
    privacy: Option<&policies::PrivacyPolicy>,
    ledger_path: &std::path::Path,
    analyst: Option<&str>,
    now: i64,
) -> anyhow::Result<String> {
    let Some(pp) = privacy else {
        anyhow::bail!(
            "the policy of {party} has no [privacy] section, so it keeps no budget ledger"
        );
    };
    if !ledger_path.exists() {
        return Ok(format!(
            "{party}: no budget ledger yet at {} (no DP query has run)\n",
            ledger_path.display()
        ));
    }
    let ledger = policies::Ledger::open(ledger_path)?;
    let b = &pp.budget;
    let mut s = format!(
        "Privacy budget at {party} (ledger {}): ε = {}{} per analyst per rolling {}-day period\n",
        ledger_path.display(),
        epsilon_text(b.epsilon_micro),
        if b.delta > 0.0 {
            format!(", δ = {:e}", b.delta)
        } else {
            String::new()
        },
        b.period_days
    );
    let charges = ledger.charges(analyst)?;
    let mut analysts: Vec<&str> = charges.iter().map(|c| c.analyst.as_str()).collect();
    analysts.sort();
    analysts.dedup();
    if let Some(a) = analyst {
        if analysts.is_empty() {
            analysts.push(a);
        }
    }
    s.push_str(&format!(
        "{:<28} {:>10} {:>10} {:>8} {:>9}\n",
        "analyst", "spent ε", "left ε", "charges", "refunded"
    ));
    for a in &analysts {
        let left = ledger.remaining(a, b, now)?;
        let mine: Vec<_> = charges.iter().filter(|c| c.analyst == *a).collect();
        s.push_str(&format!(
            "{:<28} {:>10} {:>10} {:>8} {:>9}\n",
            a,
            epsilon_text(b.epsilon_micro - left.epsilon_micro),
            epsilon_text(left.epsilon_micro),
            mine.len(),
            mine.iter().filter(|c| c.state == "refunded").count()
        ));
    }
    if !charges.is_empty() {
        s.push_str("Charges, newest first (state: charged = in flight or ended before its outcome was recorded, spent, refunded):\n");
    }
    for c in &charges {
        let at = chrono::DateTime::from_timestamp(c.at_unix, 0)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_else(|| c.at_unix.to_string());
        let mut sql: String = c.sql.split_whitespace().collect::<Vec<_>>().join(" ");
        if sql.chars().count() > 70 {
            sql = sql.chars().take(67).collect::<String>() + "...";
        }
        s.push_str(&format!(
            "  {at}  {}  ε = {}{}  {:<8}  {sql}\n",
            c.analyst,
            epsilon_text(c.epsilon_micro),
            if c.delta > 0.0 {
                format!(", δ = {:e}", c.delta)
            } else {
                String::new()
            },
            c.state
        ));
    }
    Ok(s)
}
