//! The audit log: one JSON object per line, each carrying the SHA-256 of the
//! previous entry and its own, so that changing or removing an entry breaks
//! the chain. Appends are flushed to disk (fsync) before they count.
//!
//! Limit: cutting entries off the end leaves a valid shorter chain; keep the
//! latest hash elsewhere (`council audit verify` prints it) to detect that.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened, as the gateway records it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// `decision` when the policy was checked, `outcome` when the query ended.
    pub event: String,
    pub query_id: String,
    pub leader: String,
    pub analyst: String,
    pub sql: String,
    /// `allow`, `deny` or `-` for outcome entries.
    pub decision: String,
    #[serde(default)]
    pub rule: Option<String>,
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// `revealed`, `aborted: ...`, `refused: ...` for outcome entries.
    #[serde(default)]
    pub outcome: Option<String>,
}

pub struct AuditLog {
    path: PathBuf,
    state: Mutex<(u64, String)>,
}

fn entry_hash(prev: &str, body: &Value) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(body.to_string().as_bytes());
    hex::encode(h.finalize())
}

impl AuditLog {
    /// Opens (or creates) the log, verifying the existing chain first: a
    /// gateway refuses to extend a log that was tampered with.
    pub fn open(path: &Path) -> Result<Self, String> {
        let (count, head) = if path.exists() {
            verify(path)?
        } else {
            (0, GENESIS.to_string())
        };
        Ok(AuditLog {
            path: path.to_path_buf(),
            state: Mutex::new((count, head)),
        })
    }

    pub fn append(&self, entry: &AuditEntry) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (seq, prev) = (st.0 + 1, st.1.clone());
        let mut body = serde_json::to_value(entry).map_err(|e| e.to_string())?;
        let obj = body.as_object_mut().ok_or("audit entry is not an object")?;
        obj.insert("seq".into(), Value::from(seq));
        obj.insert("time".into(), Value::from(now_rfc3339()));
        obj.insert("prev".into(), Value::from(prev.clone()));
        let hash = entry_hash(&prev, &body);
        if let Some(obj) = body.as_object_mut() {
            obj.insert("hash".into(), Value::from(hash.clone()));
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| format!("cannot open audit log {}: {e}", self.path.display()))?;
        writeln!(f, "{body}")
            .map_err(|e| format!("cannot write audit log {}: {e}", self.path.display()))?;
        f.sync_data()
            .map_err(|e| format!("cannot sync audit log {}: {e}", self.path.display()))?;
        *st = (seq, hash);
        Ok(())
    }
}

fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", d.as_secs(), d.subsec_millis())
}

/// Verifies the chain; returns the number of entries and the head hash, or
/// the first broken line and why.
pub fn verify(path: &Path) -> Result<(u64, String), String> {
    let f = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut prev = GENESIS.to_string();
    let mut count = 0u64;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| format!("line {n}: cannot read: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let mut v: Value =
            serde_json::from_str(&line).map_err(|e| format!("line {n}: not a JSON entry: {e}"))?;
        let obj = v
            .as_object_mut()
            .ok_or(format!("line {n}: not a JSON object"))?;
        let hash = obj
            .remove("hash")
            .and_then(|h| h.as_str().map(String::from))
            .ok_or(format!("line {n}: entry has no hash"))?;
        let seq = obj
            .get("seq")
            .and_then(|s| s.as_u64())
            .ok_or(format!("line {n}: entry has no seq"))?;
        let p = obj
            .get("prev")
            .and_then(|s| s.as_str())
            .ok_or(format!("line {n}: entry has no prev"))?;
        if seq != count + 1 {
            return Err(format!(
                "line {n}: entry {seq} follows entry {count}: an entry was removed or reordered"
            ));
        }
        if p != prev {
            return Err(format!("line {n}: entry {seq} does not follow the previous entry: an entry was removed or changed"));
        }
        if entry_hash(&prev, &v) != hash {
            return Err(format!(
                "line {n}: entry {seq} was changed after it was written"
            ));
        }
        prev = hash;
        count += 1;
    }
    Ok((count, prev))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize) -> AuditEntry {
        AuditEntry {
            event: "decision".into(),
            query_id: format!("q{i}"),
            sql: "SELECT 1".into(),
            decision: "allow".into(),
            ..Default::default()
        }
    }

    #[test]
    fn detects_changed_and_removed_entries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let log = AuditLog::open(&p).unwrap();
        for i in 0..4 {
            log.append(&entry(i)).unwrap();
        }
        drop(log);
        assert_eq!(verify(&p).unwrap().0, 4);
        // Reopening continues the chain.
        AuditLog::open(&p).unwrap().append(&entry(9)).unwrap();
        assert_eq!(verify(&p).unwrap().0, 5);
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();

        let changed = text.replace("\"query_id\":\"q1\"", "\"query_id\":\"q7\"");
        assert_ne!(changed, text);
        std::fs::write(&p, &changed).unwrap();
        assert!(
            verify(&p).unwrap_err().contains("was changed"),
            "{}",
            verify(&p).unwrap_err()
        );

        let removed: String = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 2)
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        std::fs::write(&p, removed).unwrap();
        assert!(
            verify(&p)
                .unwrap_err()
                .contains("line 3: entry 4 follows entry 2"),
            "{}",
            verify(&p).unwrap_err()
        );
        assert!(
            AuditLog::open(&p).is_err(),
            "a tampered log is not extended"
        );
    }
}
