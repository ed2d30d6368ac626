//! A throwaway PostgreSQL server for the tests: its own data directory in a
//! temporary folder, listening on 127.0.0.1 and an ephemeral port only, TLS
//! with a certificate made at test time, SCRAM passwords for TCP. Stopped
//! when dropped. Needs Debian's `postgresql` package (`tests/run.sh` and
//! `.ci/run` install it); as root, the server runs as the `postgres` user.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

pub struct PgServer {
    _dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    pub port: u16,
    pub user: String,
    pub password: String,
    /// PEM of the CA that signed the server's certificate.
    pub ca_file: PathBuf,
    socket_dir: PathBuf,
}

/// The folder of `initdb` and `pg_ctl`: on PATH, or Debian's versioned one.
fn bin_dir() -> Result<PathBuf> {
    if let Ok(out) = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
    {
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !p.is_empty() {
            let p = std::fs::canonicalize(&p).unwrap_or_else(|_| PathBuf::from(&p));
            if let Some(d) = p.parent() {
                return Ok(d.to_path_buf());
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| d.join("initdb").is_file())
        .collect();
    found.sort();
    found.pop().ok_or_else(|| {
        anyhow!(
            "PostgreSQL server binaries (initdb, pg_ctl) not found; run the tests with `bash tests/run.sh`, \
             which installs Debian's postgresql package when run as root"
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgServer {
    pub fn start() -> Result<Self> {
        let bin = bin_dir()?;
        let as_postgres = is_root();
        let dir = tempfile::Builder::new().prefix("council-pg-").tempdir()?;
        let data = dir.path().join("data");
        let socket_dir = dir.path().to_path_buf();
        let password = format!("pw-{}", rand::random::<u64>());
        let user = "council".to_string();
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, &password)?;

        // The server's certificate, made now, for 127.0.0.1.
        let fed =
            gateway::certs::make_federation("Council test PostgreSQL CA", &["pg".into()], &[])?;
        let (_, cert, key) = &fed.parties[0];
        let ca_file = dir.path().join("pg-ca.pem");
        std::fs::write(&ca_file, &fed.ca_cert)?;
        let cert_file = dir.path().join("server.crt");
        let key_file = dir.path().join("server.key");
        std::fs::write(&cert_file, cert)?;
        std::fs::write(&key_file, key)?;
        set_mode(&key_file, 0o600)?;
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()?
                .success();
            if !ok {
                bail!(
                    "chown to the postgres user failed (is Debian's postgresql package installed?)"
                );
            }
        }
        let port = council::bench::free_port()?;
        let server = PgServer {
            _dir: dir,
            data,
            bin,
            as_postgres,
            port,
            user,
            password,
            ca_file,
            socket_dir,
        };
        server.run(
            "initdb",
            &[
                "-D".as_ref(),
                server.data.as_os_str(),
                "-U".as_ref(),
                "council".as_ref(),
                "--pwfile".as_ref(),
                pwfile.as_os_str(),
                "--auth-local=trust".as_ref(),
                "--auth-host=scram-sha-256".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nshared_buffers = 32MB\nmax_connections = 40\n",
            server.socket_dir.display(),
            cert_file.display(),
            key_file.display()
        );
        append(&server.data.join("postgresql.conf"), &conf)?;
        // TCP only over TLS, with a password; the local socket for loading.
        std::fs::write(
            server.data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
        )?;
        let log = server.socket_dir.join("server.log");
        server.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                server.data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "start".as_ref(),
            ],
        )?;
        server.wait_ready()?;
        Ok(server)
    }

    fn run(&self, tool: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn wait_ready(&self) -> Result<()> {
        let start = Instant::now();
        loop {
            let ok = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!(
                    "the test PostgreSQL server did not become ready on port {}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The connection string a gateway gets (through an environment
    /// variable or a file): TLS required, SCRAM password.
    pub fn url(&self) -> String {
        format!(
            "postgresql://{}:{}@127.0.0.1:{}/postgres?sslmode=require",
            self.user, self.password, self.port
        )
    }

    /// Runs SQL (several statements) over the local socket, as the owner.
    pub async fn execute(&self, sql: &str) -> Result<()> {
        let (client, conn) = self.local_config().connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client.batch_execute(sql).await?;
        Ok(())
    }

    /// Loads CSV text (with a header) into `table` with COPY.
    pub async fn copy_csv(&self, table: &str, columns: &str, csv: &str) -> Result<u64> {
        use futures::SinkExt;
        let (client, conn) = self.local_config().connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let sink = client
            .copy_in(&format!(
                "COPY {table} ({columns}) FROM STDIN WITH (FORMAT csv, HEADER true)"
            ))
            .await?;
        futures::pin_mut!(sink);
        sink.send(bytes::Bytes::from(csv.to_string())).await?;
        Ok(sink.finish().await?)
    }

    fn local_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host_path(&self.socket_dir)
            .port(self.port)
            .user(&self.user)
            .dbname("postgres");
        c
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                self.data.as_os_str(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        );
    }
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}
