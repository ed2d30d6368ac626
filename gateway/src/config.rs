//! A gateway's configuration file (TOML). Relative paths are resolved
//! against the folder of the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use connectors::postgres::PgConnect;
use connectors::{FileFormat, SqlTable, TableFile};
use planner::Catalog;
use policies::Policy;
use serde::Deserialize;

use crate::tls::TlsMaterial;

/// SCRAM iteration count of every verifier `council hash-password` makes
/// (here, not in `pg`, so that the configuration depends on no front door).
pub const SCRAM_ITERATIONS: usize = 4096;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    party: String,
    peer_listen: String,
    analyst_listen: String,
    catalog: PathBuf,
    policy: PathBuf,
    audit_log: PathBuf,
    /// The privacy-budget ledger (SQLite); next to the audit log if absent.
    #[serde(default)]
    budget_ledger: Option<PathBuf>,
    #[serde(default = "default_timeout_ms")]
    peer_timeout_ms: u64,
    #[serde(default)]
    local_partitions: Option<usize>,
    #[serde(default)]
    pg_listen: Option<String>,
    tls: RawTls,
    #[serde(default)]
    peers: Vec<RawPeer>,
    #[serde(default)]
    sources: BTreeMap<String, RawSource>,
    #[serde(default)]
    tables: BTreeMap<String, RawTable>,
    #[serde(default)]
    analysts: Vec<AnalystCredential>,
    /// The federation's data-less helper parties (every gateway lists the
    /// same ones; this one is a helper if it is listed): they complete the
    /// three compute parties of a comparison and hold no tables.
    #[serde(default)]
    helpers: Vec<String>,
}

/// A database holding some of this party's tables: exactly one of
/// `postgres` or `sqlite`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    #[serde(default)]
    postgres: Option<RawPostgres>,
    #[serde(default)]
    sqlite: Option<PathBuf>,
    #[serde(default)]
    flight_sql: Option<RawFlightSql>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlightSql {
    uri: String,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    username: Option<String>,
    /// Refused: present only to say where secrets go.
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    password_env: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_env: Option<String>,
    #[serde(default)]
    token_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    /// Refused: present only to say where the connection string goes.
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    url_env: Option<String>,
    #[serde(default)]
    url_file: Option<PathBuf>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
}

/// Where a party's tables live (besides files).
#[derive(Debug, Clone)]
pub enum DatabaseConfig {
    Postgres(PgConnect),
    Sqlite(PathBuf),
    FlightSql(connectors::flight_sql::FlightSqlConnect),
}

/// A federated table held by a named database source.
#[derive(Debug, Clone)]
pub struct DbTable {
    pub source: String,
    pub table: SqlTable,
}

fn default_timeout_ms() -> u64 {
    10_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    id: String,
    address: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    /// A CSV or Parquet file, or a folder of them.
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    format: Option<String>,
    /// Or a `[sources.NAME]` database, and the table or view in it
    /// (`name` or `schema.name`; default: the federated table's name).
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    table: Option<String>,
    /// Federated column → local column name, where they differ.
    #[serde(default)]
    columns: BTreeMap<String, String>,
}

/// An analyst of this party: a name, roles for policies, and an argon2
/// password hash (PHC string; `council hash-password` makes one).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalystCredential {
    pub name: String,
    pub password_hash: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// SHA-256 (hex) of a preset Bearer token for tools that cannot send a
    /// password (`council new-token` makes one).
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// SCRAM-SHA-256 salted password for PostgreSQL logins,
    /// `ITERATIONS:SALT_B64:SALTED_B64` (`council hash-password` makes it).
    /// Not the password, but enough to log in over SCRAM: keep the config
    /// as private as a key.
    #[serde(default)]
    pub scram: Option<String>,
}

/// Everything a gateway needs, loaded and checked.
pub struct GatewayConfig {
    pub party: String,
    pub peer_listen: String,
    pub analyst_listen: String,
    /// PostgreSQL wire protocol listener (TLS, SCRAM-SHA-256), if any.
    pub pg_listen: Option<String>,
    /// Other parties: id → address.
    pub peers: BTreeMap<String, String>,
    /// The federation's data-less helper parties (this one may be one).
    pub helpers: Vec<String>,
    pub catalog: Catalog,
    pub policy: Policy,
    pub tables: Vec<TableFile>,
    /// Named databases (`[sources.NAME]`) and the tables they hold.
    pub databases: BTreeMap<String, DatabaseConfig>,
    pub db_tables: Vec<DbTable>,
    pub analysts: Vec<AnalystCredential>,
    pub tls: TlsMaterial,
    pub audit_log: PathBuf,
    /// The privacy-budget ledger (SQLite), opened when the policy uses DP.
    pub budget_ledger: PathBuf,
    pub peer_timeout: Duration,
    /// DataFusion's target partitions for the local part (None: the number
    /// of cores). Lower it where the gateway shares its machine.
    pub local_partitions: Option<usize>,
    /// Print one line per audit entry on standard error (`council serve`).
    pub log_queries: bool,
    /// Test-only fault injection; never set from a config file.
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

/// Faults the end-to-end tests inject to play a peer that dies mid-query.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Take part until the shares are due, then fall silent (as a crashed
    /// process would): send no shares and no abort.
    SilentBeforeShares,
    /// Never answer `propose` (a party paused before its verdict).
    SilentBeforeVerdict,
    /// Accept `start`, then do nothing (a party killed right after it).
    SilentAfterStart,
    /// Send the input round, then fall silent before the result share.
    SilentAfterInput,
    /// Send a result share of the wrong shape (garbage).
    GarbageResult,
    /// Delay every share message (a slow peer within the timeout).
    Slow,
    /// Take part in a comparison until its tenth round, then fall silent
    /// (a compute party that dies mid-protocol).
    SilentMidComparison,
}

/// `budget.sqlite` in the audit log's folder.
pub fn default_ledger(audit_log: &Path) -> PathBuf {
    audit_log
        .parent()
        .map(|d| d.join("budget.sqlite"))
        .unwrap_or_else(|| PathBuf::from("budget.sqlite"))
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

impl GatewayConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let raw: RawConfig =
            toml::from_str(&text).map_err(|e| anyhow!("config {}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        crate::certs::check_party_id(&raw.party)
            .with_context(|| format!("config {}: party", path.display()))?;

        let cat_path = resolve(base, &raw.catalog);
        let cat_text = std::fs::read_to_string(&cat_path)
            .with_context(|| format!("reading catalog {}", cat_path.display()))?;
        let catalog = Catalog::from_toml(&cat_text, &cat_path.display().to_string())?;

        let pol_path = resolve(base, &raw.policy);
        let pol_text = std::fs::read_to_string(&pol_path)
            .with_context(|| format!("reading policy {}", pol_path.display()))?;
        let policy = Policy::parse(&pol_text, Some(&catalog)).map_err(|problems| {
            let lines: Vec<String> = problems
                .iter()
                .map(|p| format!("  {}:{p}", pol_path.display()))
                .collect();
            anyhow!(
                "policy {} has errors (run `council policy check` for details):\n{}",
                pol_path.display(),
                lines.join("\n")
            )
        })?;
        if let Some(p) = &policy.party {
            if *p != raw.party {
                bail!(
                    "policy {} is for party `{p}` but this gateway is `{}`",
                    pol_path.display(),
                    raw.party
                );
            }
        }

        let mut peers = BTreeMap::new();
        for p in raw.peers {
            crate::certs::check_party_id(&p.id)
                .with_context(|| format!("config {}: peers", path.display()))?;
            if p.id == raw.party {
                bail!(
                    "config {}: peer `{}` is this gateway itself",
                    path.display(),
                    p.id
                );
            }
            if peers.insert(p.id.clone(), p.address).is_some() {
                bail!("config {}: peer `{}` is listed twice", path.display(), p.id);
            }
        }
        let cfg_name = path.display().to_string();
        let mut databases = BTreeMap::new();
        for (name, src) in raw.sources {
            databases.insert(name.clone(), database_config(&cfg_name, base, &name, src)?);
        }
        let mut tables = Vec::new();
        let mut db_tables = Vec::new();
        for (name, t) in raw.tables {
            let def = catalog.table(&name).ok_or_else(|| {
                anyhow!(
                    "config {}: table `{name}` is not in the catalog {}",
                    path.display(),
                    cat_path.display()
                )
            })?;
            match (t.path, t.source) {
                (Some(_), Some(_)) => bail!(
                    "config {}: table `{name}` has both `path` and `source`; keep one",
                    path.display()
                ),
                (None, None) => bail!(
                    "config {}: table `{name}` needs `path = \"...\"` (a CSV or Parquet file) or `source = \"NAME\"` (a [sources.NAME] database)",
                    path.display()
                ),
                (None, Some(source)) => {
                    if !databases.contains_key(&source) {
                        bail!(
                            "config {}: table `{name}`: source `{source}` is not defined; add [sources.{source}] with postgres = {{ url_env = \"...\" }} or sqlite = \"FILE\"",
                            path.display()
                        );
                    }
                    if t.format.is_some() {
                        bail!(
                            "config {}: table `{name}`: `format` is for files; a database table has none",
                            path.display()
                        );
                    }
                    db_tables.push(DbTable {
                        source,
                        table: SqlTable {
                            table: def.clone(),
                            local: t.table.unwrap_or_else(|| name.clone()),
                            renames: t.columns,
                        },
                    });
                }
                (Some(file), None) => {
                    if t.table.is_some() {
                        bail!(
                            "config {}: table `{name}`: `table` names a table in a database source; a file has none",
                            path.display()
                        );
                    }
                    let p = resolve(base, &file);
                    let format = match t.format.as_deref() {
                        Some("csv") => FileFormat::Csv,
                        Some("parquet") => FileFormat::Parquet,
                        Some(other) => bail!(
                            "config {}: table `{name}`: format `{other}` is unknown; use csv or parquet",
                            path.display()
                        ),
                        None => FileFormat::from_path(&p).unwrap_or(FileFormat::Csv),
                    };
                    tables.push(TableFile {
                        table: def.clone(),
                        path: p,
                        format,
                        renames: t.columns,
                    });
                }
            }
        }
        for h in &raw.helpers {
            if *h != raw.party && !peers.contains_key(h) {
                bail!(
                    "config {}: helper `{h}` is neither this gateway nor one of its peers",
                    path.display()
                );
            }
        }
        let helper = raw.helpers.contains(&raw.party);
        if helper && !(tables.is_empty() && db_tables.is_empty()) {
            bail!(
                "config {}: `{}` is a helper party, which holds no data; remove its [tables.*] (or remove it \
                 from `helpers`)",
                path.display(),
                raw.party
            );
        }
        for t in catalog.tables().keys().filter(|_| !helper) {
            if !tables.iter().any(|f| &f.table.name == t)
                && !db_tables.iter().any(|d| &d.table.table.name == t)
            {
                bail!(
                    "config {}: federated table `{t}` has no local data; add [tables.{t}] with path = \"...\" \
                     or source = \"...\" (an empty CSV with a header is fine if this party has no rows)",
                    path.display()
                );
            }
        }
        let tls = TlsMaterial::from_files(
            &resolve(base, &raw.tls.ca),
            &resolve(base, &raw.tls.cert),
            &resolve(base, &raw.tls.key),
        )
        .with_context(|| format!("config {}: tls", path.display()))?;
        for a in &raw.analysts {
            if let Some(s) = &a.scram {
                if parse_scram(s).is_none() {
                    bail!(
                        "config {}: analyst `{}`: scram is not a verifier `{}:SALT:SALTED` (base64); make one with `council hash-password`",
                        path.display(),
                        a.name,
                        SCRAM_ITERATIONS
                    );
                }
            }
            argon2::PasswordHash::new(&a.password_hash)
                .map_err(|e| anyhow!("config {}: analyst `{}`: password_hash is not a PHC string ({e}); make one with `council hash-password`", path.display(), a.name))?;
        }
        Ok(GatewayConfig {
            party: raw.party,
            helpers: raw.helpers,
            peer_listen: raw.peer_listen,
            analyst_listen: raw.analyst_listen,
            pg_listen: raw.pg_listen,
            peers,
            catalog,
            policy,
            tables,
            databases,
            db_tables,
            analysts: raw.analysts,
            tls,
            budget_ledger: match &raw.budget_ledger {
                Some(p) => resolve(base, p),
                None => default_ledger(&resolve(base, &raw.audit_log)),
            },
            audit_log: resolve(base, &raw.audit_log),
            peer_timeout: Duration::from_millis(raw.peer_timeout_ms.max(1)),
            local_partitions: match raw.local_partitions {
                Some(0) => bail!(
                    "config {}: local_partitions must be at least 1 (or left out: the number of cores)",
                    path.display()
                ),
                k => k,
            },
            log_queries: true,
            fault: None,
        })
    }
}

/// Checks one `[sources.NAME]` entry; reads the PostgreSQL connection string
/// from its environment variable or file (never from the config itself).
fn database_config(cfg: &str, base: &Path, name: &str, src: RawSource) -> Result<DatabaseConfig> {
    let never_inline = |key: &str| {
        anyhow!(
            "config {cfg}: sources.{name}: secrets never go in the config (it may be committed or shared); \
             put the {key} in an environment variable and write {key}_env = \"NAME\", or in a file only the \
             gateway can read and write {key}_file = \"PATH\""
        )
    };
    // A secret from `{key}_env` or `{key}_file`; `required` if one must be given.
    let secret = |key: &str,
                  env: Option<String>,
                  file: Option<PathBuf>,
                  required: bool|
     -> Result<Option<String>> {
        match (env, file) {
            (Some(var), None) => std::env::var(&var).map(Some).map_err(|_| {
                anyhow!("config {cfg}: sources.{name}: environment variable {var} ({key}_env) is not set")
            }),
            (None, Some(f)) => {
                let f = resolve(base, &f);
                let text = std::fs::read_to_string(&f)
                    .map_err(|e| anyhow!("config {cfg}: sources.{name}: {key}_file {}: {e}", f.display()))?;
                Ok(Some(text.trim().to_string()))
            }
            (None, None) if !required => Ok(None),
            _ => bail!(
                "config {cfg}: sources.{name}: give exactly one of {key}_env = \"VARIABLE\" or {key}_file = \"PATH\""
            ),
        }
    };
    match (src.postgres, src.sqlite, src.flight_sql) {
        (Some(pg), None, None) => {
            if pg.url.is_some() {
                return Err(never_inline("url"));
            }
            let url = secret("url", pg.url_env, pg.url_file, true)?.unwrap_or_default();
            Ok(DatabaseConfig::Postgres(PgConnect {
                url,
                ca_file: pg.ca_file.map(|f| resolve(base, &f)),
            }))
        }
        (None, Some(file), None) => Ok(DatabaseConfig::Sqlite(resolve(base, &file))),
        (None, None, Some(f)) => {
            if f.password.is_some() {
                return Err(never_inline("password"));
            }
            if f.token.is_some() {
                return Err(never_inline("token"));
            }
            let password = secret("password", f.password_env, f.password_file, false)?;
            if password.is_some() != f.username.is_some() {
                bail!("config {cfg}: sources.{name}: flight_sql needs both `username` and a password, or neither");
            }
            Ok(DatabaseConfig::FlightSql(connectors::flight_sql::FlightSqlConnect {
                uri: f.uri,
                ca_file: f.ca_file.map(|p| resolve(base, &p)),
                username: f.username,
                password,
                token: secret("token", f.token_env, f.token_file, false)?,
            }))
        }
        _ => bail!(
            "config {cfg}: sources.{name}: give exactly one of postgres = {{ url_env = \"...\" }}, sqlite = \"FILE\" \
             or flight_sql = {{ uri = \"grpc+tls://HOST:PORT\" }}"
        ),
    }
}

/// A SCRAM-SHA-256 verifier line for `password` (random 16-byte salt).
pub fn scram_verifier(password: &str) -> String {
    use base64::Engine as _;
    let salt: [u8; 16] = rand::random();
    let salted =
        pgwire::api::auth::sasl::scram::gen_salted_password(password, &salt, SCRAM_ITERATIONS);
    let b64 = base64::engine::general_purpose::STANDARD;
    format!(
        "{}:{}:{}",
        SCRAM_ITERATIONS,
        b64.encode(salt),
        b64.encode(salted)
    )
}

/// Parses a `scram` line into (salt, salted password).
pub fn parse_scram(line: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut parts = line.split(':');
    let iterations: usize = parts.next()?.parse().ok()?;
    let salt = b64.decode(parts.next()?).ok()?;
    let salted = b64.decode(parts.next()?).ok()?;
    (iterations == SCRAM_ITERATIONS && parts.next().is_none() && salted.len() == 32)
        .then_some((salt, salted))
}

/// A random Bearer token and the SHA-256 (hex) a config stores.
pub fn new_token() -> (String, String) {
    use sha2::Digest as _;
    let raw: [u8; 32] = rand::random();
    let token = hex::encode(raw);
    let digest = hex::encode(sha2::Sha256::digest(token.as_bytes()));
    (token, digest)
}

/// Password checks on a few threads of their own. argon2id takes 19 MiB a
/// check; on the shared blocking pool every thread that ever ran one keeps
/// its allocator arena (and the 19 MiB) resident, so a flood of bad logins
/// grew a gateway by hundreds of MiB even with bounded concurrency. Here
/// `threads` threads do every check, from a queue of at most `queue` jobs.
pub struct PasswordChecks {
    jobs: std::sync::mpsc::SyncSender<PasswordJob>,
}

type PasswordJob = (String, String, tokio::sync::oneshot::Sender<bool>);

impl PasswordChecks {
    pub fn new(threads: usize, queue: usize) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<PasswordJob>(queue);
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let _ = std::thread::Builder::new()
                .name(format!("council-password-{i}"))
                .spawn(move || {
                    // One argon2 memory per thread, reused by every check.
                    let mut blocks: Vec<argon2::Block> = Vec::new();
                    loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(p) => p.into_inner().recv(),
                        };
                        let Ok((password, hash, reply)) = job else {
                            // The gateway is gone.
                            return;
                        };
                        if reply.is_closed() {
                            // The login gave up waiting: no check for it.
                            continue;
                        }
                        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            verify_with_memory(&password, &hash, &mut blocks)
                        }))
                        .unwrap_or(false);
                        let _ = reply.send(ok);
                    }
                });
        }
        PasswordChecks { jobs: tx }
    }

    /// Whether `password` matches `hash`; `None` if the queue is full or
    /// the answer did not come within `wait`.
    pub async fn check(
        &self,
        password: &str,
        hash: &str,
        wait: std::time::Duration,
    ) -> Option<bool> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .try_send((password.to_string(), hash.to_string(), tx))
            .ok()?;
        tokio::time::timeout(wait, rx).await.ok()?.ok()
    }
}

/// `verify_password`, computing the hash in `blocks` (resized to the
/// hash's memory cost, then kept): the same check without allocating 19 MiB
/// each time. The hashes come from this gateway's own config.
fn verify_with_memory(password: &str, phc: &str, blocks: &mut Vec<argon2::Block>) -> bool {
    use argon2::password_hash::Output;
    let Ok(h) = argon2::PasswordHash::new(phc) else {
        return false;
    };
    let (Ok(algorithm), Ok(params)) = (
        argon2::Algorithm::try_from(h.algorithm),
        argon2::Params::try_from(&h),
    ) else {
        return false;
    };
    let version = match h.version.map(argon2::Version::try_from) {
        None => argon2::Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let (Some(salt), Some(expected)) = (h.salt, h.hash) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let need = params.block_count();
    if blocks.len() != need {
        *blocks = vec![argon2::Block::default(); need];
    }
    let mut out = vec![0u8; expected.len()];
    let hasher = argon2::Argon2::new(algorithm, version, params);
    if hasher
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut blocks[..])
        .is_err()
    {
        return false;
    }
    // Output compares in constant time.
    Output::new(&out).is_ok_and(|o| o == expected)
}

/// The argon2id hash (the same parameters as `hash_password`) that an
/// unknown user name is checked against, so that a refusal takes as long for
/// a name that does not exist as for a wrong password. Its password was
/// random and was never kept: no password matches it.
pub fn standin_password_hash() -> String {
    "$argon2id$v=19$m=19456,t=2,p=1$UdwEa0FULhnHe7Hw3yy8VQ$U+ubGxp0TAGBE0XrrHjcAYC3p/Sc6xE0YXQIO+GlkQA"
        .to_string()
}

/// An argon2id PHC hash of `password`.
pub fn hash_password(password: &str) -> Result<String> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow!("hashing the password: {e}"))
}

pub fn verify_password(password: &str, phc: &str) -> bool {
    use argon2::password_hash::PasswordVerifier;
    match argon2::PasswordHash::new(phc) {
        Ok(h) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffered_password_check_agrees_with_argon2() {
        let h = hash_password("s3cret").unwrap();
        let mut blocks = Vec::new();
        assert!(verify_with_memory("s3cret", &h, &mut blocks));
        assert!(!verify_with_memory("s3cret!", &h, &mut blocks));
        assert!(!verify_with_memory(
            "s3cret",
            "$argon2id$garbage",
            &mut blocks
        ));
        assert!(!verify_with_memory(
            "x",
            &standin_password_hash(),
            &mut blocks
        ));
        assert!(verify_password("s3cret", &h));
    }

    #[test]
    fn malformed_configs_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gw.toml");
        std::fs::write(&p, "party = \"a\"\npeer_listen = 7\n").unwrap();
        let e = format!("{:#}", GatewayConfig::load(&p).err().unwrap());
        assert!(e.contains("gw.toml") && e.contains("line 2"), "{e}");
        std::fs::write(&p, "party = \"A B\"\npeer_listen = \"x\"\nanalyst_listen = \"y\"\ncatalog = \"c\"\npolicy = \"p\"\naudit_log = \"l\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n").unwrap();
        let e = format!("{:#}", GatewayConfig::load(&p).err().unwrap());
        assert!(e.contains("party id `A B` is not valid"), "{e}");
        assert!(format!(
            "{:#}",
            GatewayConfig::load(&dir.path().join("none.toml"))
                .err()
                .unwrap()
        )
        .contains("none.toml"));
    }

    #[test]
    fn connection_strings_come_from_the_environment_or_a_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let pg = |url: Option<&str>, env: Option<&str>, file: Option<&str>| RawSource {
            postgres: Some(RawPostgres {
                url: url.map(str::to_string),
                url_env: env.map(str::to_string),
                url_file: file.map(PathBuf::from),
                ca_file: Some("pg-ca.pem".into()),
            }),
            sqlite: None,
            flight_sql: None,
        };
        let err = |src| {
            format!(
                "{:#}",
                database_config("gw.toml", dir.path(), "db", src)
                    .err()
                    .unwrap()
            )
        };
        let e = err(pg(Some("postgresql://u:pw@h/db"), None, None));
        assert!(
            e.contains("secrets never go in the config") && e.contains("url_env"),
            "{e}"
        );
        assert!(!e.contains("pw@"), "the secret is not echoed: {e}");
        let e = err(pg(None, Some("COUNCIL_TEST_SURELY_UNSET_VAR"), None));
        assert!(
            e.contains("COUNCIL_TEST_SURELY_UNSET_VAR (url_env) is not set"),
            "{e}"
        );
        let e = err(pg(None, None, None));
        assert!(e.contains("exactly one of url_env"), "{e}");
        let e = err(RawSource {
            postgres: None,
            sqlite: None,
            flight_sql: None,
        });
        assert!(e.contains("sources.db: give exactly one of"), "{e}");
        let flight = |password: Option<&str>, username: Option<&str>| RawSource {
            postgres: None,
            sqlite: None,
            flight_sql: Some(RawFlightSql {
                uri: "grpc+tls://warehouse:443".into(),
                ca_file: None,
                username: username.map(str::to_string),
                password: password.map(str::to_string),
                password_env: None,
                password_file: None,
                token: None,
                token_env: None,
                token_file: None,
            }),
        };
        let e = err(flight(Some("hunter2"), Some("svc")));
        assert!(
            e.contains("put the password in an environment variable") && !e.contains("hunter2"),
            "{e}"
        );
        let e = err(flight(None, Some("svc")));
        assert!(e.contains("needs both `username` and a password"), "{e}");

        std::fs::write(
            dir.path().join("pg-url"),
            "host=127.0.0.1 user=u dbname=d\n",
        )
        .unwrap();
        let Ok(DatabaseConfig::Postgres(c)) =
            database_config("gw.toml", dir.path(), "db", pg(None, None, Some("pg-url")))
        else {
            panic!("url_file was not read");
        };
        assert_eq!(c.url, "host=127.0.0.1 user=u dbname=d");
        assert_eq!(c.ca_file, Some(dir.path().join("pg-ca.pem")));
        // SAFETY of the test: a variable name no other test reads.
        std::env::set_var("COUNCIL_TEST_PG_URL_CONFIG", "host=h user=u");
        let Ok(DatabaseConfig::Postgres(c)) = database_config(
            "gw.toml",
            dir.path(),
            "db",
            pg(None, Some("COUNCIL_TEST_PG_URL_CONFIG"), None),
        ) else {
            panic!("url_env was not read");
        };
        assert_eq!(c.url, "host=h user=u");
        assert!(
            !format!("{c:?}").contains("host=h"),
            "Debug hides the secret"
        );
    }

    #[test]
    fn passwords_verify_against_their_hash_only() {
        let h = hash_password("s3cret").unwrap();
        assert!(verify_password("s3cret", &h));
        assert!(!verify_password("s3cret ", &h));
        assert!(!verify_password("s3cret", "not a hash"));
    }
}
