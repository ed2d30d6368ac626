//! Several gateways in one process on loopback, with real mutual TLS: what
//! `council demo` runs and what the end-to-end tests start. Also the
//! plaintext reference: the same SQL over the pooled data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use arrow::array::RecordBatch;
use connectors::files::find_table_file;
use connectors::FileSource;
use datafusion::catalog::MemTable;
use datafusion::prelude::SessionContext;
use planner::Catalog;
use policies::Policy;
use tokio::net::TcpListener;

use gateway::client::AnalystClient;
use gateway::config::{hash_password, AnalystCredential, GatewayConfig};
use gateway::server::{start, RunningGateway};
use gateway::tls::TlsMaterial;

/// One party of a local federation.
#[derive(Clone)]
pub struct PartySpec {
    pub id: String,
    /// Folder with one file per federated table (`patients.csv`, …).
    pub data_dir: PathBuf,
    pub policy_toml: String,
    /// (name, password, roles)
    pub analysts: Vec<(String, String, Vec<String>)>,
    /// This party's own copy of the catalog, if it differs from the spec's.
    pub catalog_override: Option<String>,
    pub fault: Option<gateway::config::Fault>,
    /// Preset Bearer tokens: analyst name → token (stored as SHA-256).
    pub tokens: BTreeMap<String, String>,
    /// Databases holding some tables instead of files; a file of the same
    /// table in `data_dir`, if any, is then only the plaintext reference's
    /// copy of the rows.
    pub databases: BTreeMap<String, gateway::config::DatabaseConfig>,
    pub db_tables: Vec<gateway::config::DbTable>,
    /// A data-less helper party: no tables, computes only on shares.
    pub helper: bool,
}

impl PartySpec {
    pub fn new(
        id: &str,
        data_dir: PathBuf,
        policy_toml: String,
        analysts: Vec<(String, String, Vec<String>)>,
    ) -> Self {
        PartySpec {
            id: id.to_string(),
            data_dir,
            policy_toml,
            analysts,
            catalog_override: None,
            fault: None,
            tokens: BTreeMap::new(),
            databases: BTreeMap::new(),
            db_tables: Vec::new(),
            helper: false,
        }
    }
}

pub struct FederationSpec {
    pub parties: Vec<PartySpec>,
    pub catalog_toml: String,
    pub peer_timeout: Duration,
    /// Extra party ids to certify with the same CA without starting them
    /// (impostors for tests).
    pub extra_certs: Vec<String>,
}

pub struct LocalFederation {
    pub ca_pem: String,
    pub gateways: Vec<RunningGateway>,
    pub work_dir: PathBuf,
    pub catalog: Catalog,
    /// Certificates made for `extra_certs`: (id, cert PEM, key PEM).
    pub extra: Vec<(String, String, String)>,
    tables: BTreeMap<String, Vec<PathBuf>>,
}

impl LocalFederation {
    /// Makes certificates, binds every listener on 127.0.0.1 with an
    /// ephemeral port, and starts one gateway per party.
    pub async fn start(spec: &FederationSpec, work_dir: &Path) -> Result<Self> {
        gateway::tls::install_provider();
        let catalog = Catalog::from_toml(&spec.catalog_toml, "catalog")?;
        let mut ids: Vec<String> = spec.parties.iter().map(|p| p.id.clone()).collect();
        ids.extend(spec.extra_certs.iter().cloned());
        let fed = gateway::certs::make_federation("Council demo CA", &ids, &[])?;
        let mut listeners = Vec::new();
        for _ in &spec.parties {
            let peer = TcpListener::bind("127.0.0.1:0").await?;
            let analyst = TcpListener::bind("127.0.0.1:0").await?;
            let pg = TcpListener::bind("127.0.0.1:0").await?;
            listeners.push((peer, analyst, pg));
        }
        let peer_addrs: Vec<String> = listeners
            .iter()
            .map(|(p, _, _)| p.local_addr().map(|a| a.to_string()))
            .collect::<Result<_, _>>()?;
        std::fs::create_dir_all(work_dir.join("audit"))?;
        let mut gateways = Vec::new();
        let mut tables: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        for (i, ((party, (_, cert, key)), (pl, al, gl))) in spec
            .parties
            .iter()
            .zip(&fed.parties)
            .zip(listeners)
            .enumerate()
        {
            let catalog = match &party.catalog_override {
                Some(text) => Catalog::from_toml(text, "catalog override")?,
                None => catalog.clone(),
            };
            let policy = Policy::parse(&party.policy_toml, Some(&catalog)).map_err(|problems| {
                anyhow!(
                    "policy of {}: {}",
                    party.id,
                    problems
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            })?;
            let mut files = Vec::new();
            for t in catalog.tables().values().filter(|_| !party.helper) {
                if let Some(d) = party
                    .db_tables
                    .iter()
                    .find(|d| d.table.table.name == t.name)
                {
                    // The plaintext reference reads the same rows: from a
                    // copy in data_dir, or from the SQLite file itself.
                    let copy = find_table_file(&party.data_dir, t)
                        .map(|f| f.path)
                        .or_else(|| match party.databases.get(&d.source) {
                            Some(gateway::config::DatabaseConfig::Sqlite(p)) => Some(p.clone()),
                            _ => None,
                        });
                    if let Some(p) = copy {
                        tables.entry(t.name.clone()).or_default().push(p);
                    }
                    continue;
                }
                let f = find_table_file(&party.data_dir, t).ok_or_else(|| {
                    anyhow!(
                        "party {}: no data for table `{}` in {} (expected {}.csv or {}.parquet)",
                        party.id,
                        t.name,
                        party.data_dir.display(),
                        t.name,
                        t.name
                    )
                })?;
                tables
                    .entry(t.name.clone())
                    .or_default()
                    .push(f.path.clone());
                files.push(f);
            }
            let analysts = party
                .analysts
                .iter()
                .map(|(n, p, r)| {
                    Ok(AnalystCredential {
                        name: n.clone(),
                        password_hash: hash_password(p)?,
                        roles: r.clone(),
                        token_sha256: party.tokens.get(n).map(|t| {
                            use sha2::Digest as _;
                            hex::encode(sha2::Sha256::digest(t.as_bytes()))
                        }),
                        scram: Some(gateway::config::scram_verifier(p)),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let peers: BTreeMap<String, String> = spec
                .parties
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, p)| (p.id.clone(), peer_addrs[j].clone()))
                .collect();
            let cfg = GatewayConfig {
                party: party.id.clone(),
                peer_listen: pl.local_addr()?.to_string(),
                analyst_listen: al.local_addr()?.to_string(),
                peers,
                helpers: spec
                    .parties
                    .iter()
                    .filter(|p| p.helper)
                    .map(|p| p.id.clone())
                    .collect(),
                catalog: catalog.clone(),
                policy,
                tables: files,
                databases: party.databases.clone(),
                db_tables: party.db_tables.clone(),
                analysts,
                tls: TlsMaterial::from_pem(&fed.ca_cert, cert, key)?,
                audit_log: work_dir.join("audit").join(format!("{}.log", party.id)),
                budget_ledger: work_dir
                    .join("audit")
                    .join(format!("{}-budget.sqlite", party.id)),
                peer_timeout: spec.peer_timeout,
                local_partitions: None,
                pg_listen: None,
                log_queries: false,
                fault: party.fault,
            };
            gateways.push(
                start(
                    &cfg,
                    gateway::server::Listeners {
                        peer: pl,
                        analyst: al,
                        pg: Some(gl),
                    },
                )
                .await
                .with_context(|| format!("starting gateway {}", party.id))?,
            );
        }
        let extra = fed.parties[spec.parties.len()..].to_vec();
        Ok(LocalFederation {
            ca_pem: fed.ca_cert,
            gateways,
            work_dir: work_dir.to_path_buf(),
            catalog,
            extra,
            tables,
        })
    }

    pub fn gateway(&self, party: &str) -> Option<&RunningGateway> {
        self.gateways.iter().find(|g| g.party == party)
    }

    /// An analyst client of `party`'s gateway, over TLS.
    pub async fn client(&self, party: &str, user: &str, password: &str) -> Result<AnalystClient> {
        let g = self
            .gateway(party)
            .ok_or_else(|| anyhow!("no gateway {party}"))?;
        AnalystClient::connect(&g.analyst_addr.to_string(), &self.ca_pem, user, password).await
    }

    /// Stops one gateway (a peer going down).
    pub async fn stop_party(&mut self, party: &str) {
        if let Some(i) = self.gateways.iter().position(|g| g.party == party) {
            let g = self.gateways.remove(i);
            g.stop().await;
        }
    }

    pub async fn stop(self) {
        for g in self.gateways {
            g.stop().await;
        }
    }

    /// The plaintext reference: every party's rows pooled in one DataFusion
    /// context. Only demos and tests build this.
    pub async fn pooled_context(&self) -> Result<SessionContext> {
        pooled_context(&self.catalog, &self.tables).await
    }
}

/// Registers each federated table as the union of all parties' files.
pub async fn pooled_context(
    catalog: &Catalog,
    tables: &BTreeMap<String, Vec<PathBuf>>,
) -> Result<SessionContext> {
    let ctx = SessionContext::new();
    for t in catalog.tables().values() {
        let mut partitions: Vec<Vec<RecordBatch>> = Vec::new();
        for path in tables.get(&t.name).into_iter().flatten() {
            if connectors::sqlite::is_sqlite_file(path) {
                partitions.push(connectors::sqlite::read_rows_for_reference(path, t).await?);
                continue;
            }
            let format =
                connectors::FileFormat::from_path(path).unwrap_or(connectors::FileFormat::Csv);
            let f = if path.is_dir() {
                find_table_file(path.parent().unwrap_or(Path::new(".")), t)
                    .ok_or_else(|| anyhow!("no files for {} in {}", t.name, path.display()))?
            } else {
                connectors::TableFile {
                    table: t.clone(),
                    path: path.clone(),
                    format,
                    renames: Default::default(),
                }
            };
            let src = FileSource::open(vec![f], None).await?;
            partitions.push(src.read_rows_for_reference(&t.name).await?);
        }
        let mem = MemTable::try_new(t.schema(), partitions)?;
        ctx.register_table(t.name.as_str(), Arc::new(mem))?;
    }
    Ok(ctx)
}

pub async fn plaintext(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
    Ok(ctx.sql(sql).await?.collect().await?)
}
