//! `council`: the Council gateway and its tools.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use gateway::output::{render, Format};

#[derive(Parser)]
#[command(
    name = "council",
    version,
    about = "Council: federated SQL aggregates over secret shares, each party enforcing its own policy."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Conn {
    /// The analyst address of your own party's gateway (host:port).
    #[arg(long, env = "COUNCIL_GATEWAY")]
    gateway: String,
    /// Your analyst name at that gateway.
    #[arg(long, env = "COUNCIL_USER")]
    user: String,
    /// Your password; else $COUNCIL_PASSWORD; else a prompt.
    #[arg(long, env = "COUNCIL_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// The federation CA certificate (PEM) the gateway's certificate chains to.
    #[arg(long, env = "COUNCIL_CA")]
    ca: PathBuf,
    /// Your party's id: the gateway's certificate must name it (safer than
    /// the host name alone, which several parties' certificates may share,
    /// e.g. 127.0.0.1).
    #[arg(long, env = "COUNCIL_PARTY")]
    party: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run three hospitals' gateways on loopback with sample data and real queries.
    Demo {
        /// Use your own data: one folder per party, files named after the tables, optional catalog.toml.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Answer this one query (with --data or on the sample data).
        #[arg(long)]
        sql: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Seed of the sample data.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Only write the sample data (one folder per hospital) and catalog.toml to this folder.
        #[arg(long, conflicts_with_all = ["data", "sql"])]
        write_data: Option<PathBuf>,
        /// Keep the gateways running until interrupted, and print how to
        /// connect psql, DBeaver or pandas to them.
        #[arg(long, conflicts_with = "sql")]
        serve: bool,
    },
    /// Benchmark TPC-H Q1 and Q6: Council over N gateway processes vs plaintext DataFusion.
    Bench {
        /// Scale factors, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "0.1")]
        sf: Vec<f64>,
        /// Numbers of parties, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "3")]
        parties: Vec<usize>,
        /// Domain sizes of the group sweep (GROUP BY over G declared
        /// values), comma-separated; `--groups 0` skips it.
        #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
        groups: Vec<usize>,
        /// Measured repetitions per query (after one warm-up).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Keep the generated data, configs and logs under this folder.
        #[arg(long)]
        keep: Option<PathBuf>,
        /// Executor micro-benchmarks (encode, share, combine, reveal) instead.
        #[arg(long)]
        micro: bool,
    },
    /// (Used by `bench`: peak memory of plaintext DataFusion alone.)
    #[command(hide = true)]
    BenchPlaintext {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        parties: usize,
        #[arg(long)]
        query: String,
        #[arg(long)]
        reps: usize,
        #[arg(long)]
        partitions: usize,
    },
    /// Make a federation CA and a certificate and key per party.
    Certs {
        /// Comma-separated party ids.
        #[arg(long, value_delimiter = ',')]
        parties: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        /// A host name or IP of one party's gateway, as PARTY=NAME
        /// (repeat for more); it goes into that party's certificate only.
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Run one party's gateway.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a query through your gateway.
    Query {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Show the plan and every party's verdict instead of running it.
        #[arg(long)]
        explain: bool,
        sql: String,
    },
    /// Show the federated plan, the disclosure manifest and every party's verdict.
    Explain {
        #[command(flatten)]
        conn: Conn,
        sql: String,
    },
    /// Check or test a policy file.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Show the differential-privacy budget ledger of a gateway.
    Budget {
        #[command(subcommand)]
        command: BudgetCommand,
    },
    /// Verify an audit log's hash chain.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print an argon2id hash of a password, for `[[analysts]] password_hash`.
    /// Print an analyst's credential lines for a gateway config: an argon2
    /// hash (Flight SQL, CLI) and a SCRAM-SHA-256 verifier (PostgreSQL).
    HashPassword {
        /// The password; else read from standard input.
        #[arg(long)]
        password: Option<String>,
    },
    /// Make a random Bearer token for a tool that cannot send a password:
    /// prints the token (give it to the tool) and the config line.
    NewToken,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy; report every error with its line.
    Check {
        file: PathBuf,
        /// Also check table and column names against this catalog.
        #[arg(long)]
        catalog: Option<PathBuf>,
    },
    /// Say whether the policy allows a query, and which rule decided. Touches no data.
    Test {
        file: PathBuf,
        #[arg(long)]
        catalog: PathBuf,
        #[arg(long)]
        sql: String,
        /// The asking analyst, as PARTY:NAME.
        #[arg(long, default_value = "analyst_party:analyst")]
        analyst: String,
        /// Roles of the analyst.
        #[arg(long = "role")]
        roles: Vec<String>,
        /// Exit with an error unless the decision is this (allow or deny).
        #[arg(long)]
        expect: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    Verify { file: PathBuf },
}

#[derive(Subcommand)]
enum BudgetCommand {
    /// Every analyst's spent and remaining budget, and the charges.
    Show {
        /// The gateway's config file (its policy gives the budget, its
        /// `budget_ledger` the ledger).
        #[arg(long, default_value = "gateway.toml")]
        config: PathBuf,
        /// Only this analyst (`PARTY:NAME`).
        #[arg(long)]
        analyst: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn password(conn: &Conn) -> Result<String> {
    match &conn.password {
        Some(p) => Ok(p.clone()),
        None => {
            rpassword::prompt_password(format!("password for {} at {}: ", conn.user, conn.gateway))
                .context("no --password, no $COUNCIL_PASSWORD and no terminal to ask on")
        }
    }
}

async fn client(conn: &Conn) -> Result<gateway::client::AnalystClient> {
    let ca = gateway::client::read_ca(&conn.ca)?;
    gateway::client::AnalystClient::connect_named(
        &conn.gateway,
        conn.party.as_deref(),
        &ca,
        &conn.user,
        &password(conn)?,
    )
    .await
}

async fn run(cli: Cli) -> Result<ExitCode> {
    gateway::tls::install_provider();
    match cli.command {
        Command::Demo {
            write_data: Some(dir),
            seed,
            ..
        } => {
            council::demo::write_demo_data(&dir, seed)?;
            std::fs::write(dir.join("catalog.toml"), council::demo::DEMO_CATALOG)?;
            println!(
                "wrote sample data for hospital_a, hospital_b, hospital_c and catalog.toml to {}",
                dir.display()
            );
            println!("run it with: council demo --data {}", dir.display());
        }
        Command::Demo {
            data,
            sql,
            format,
            seed,
            write_data: None,
            serve,
        } => {
            council::demo::run(council::demo::DemoOptions {
                data,
                sql,
                format,
                seed,
                serve,
            })
            .await?;
        }
        Command::Bench { micro: true, .. } => {
            council::bench::micro(4_000_000)?;
            council::bench::micro_mpc(&[1 << 20, 1 << 24]).await?;
        }
        Command::Bench {
            sf,
            parties,
            groups,
            reps,
            json,
            keep,
            micro: false,
        } => {
            if parties.iter().any(|&n| n < 2) || reps == 0 {
                bail!("--parties needs at least 2 and --reps at least 1");
            }
            council::bench::run(council::bench::BenchOptions {
                scale_factors: sf,
                parties,
                groups: groups.into_iter().filter(|&g| g > 0).collect(),
                reps,
                json,
                keep,
            })
            .await?;
        }
        Command::BenchPlaintext {
            dir,
            parties,
            query,
            reps,
            partitions,
        } => {
            council::bench::plaintext_child(&dir, parties, &query, reps, partitions).await?;
        }
        Command::Certs {
            parties,
            out,
            hosts,
        } => {
            if parties.is_empty() {
                bail!("name the parties: --parties hospital_a,hospital_b,hospital_c");
            }
            let fed = gateway::certs::make_federation("Council federation CA", &parties, &hosts)?;
            gateway::certs::write_federation(&fed, &out)?;
            println!(
                "wrote {}/ca.pem, ca.key and a certificate and key per party ({})",
                out.display(),
                parties.join(", ")
            );
            println!("keep ca.key offline; give each party only ca.pem and its own PARTY.pem and PARTY.key");
        }
        Command::Serve { config } => {
            let cfg = gateway::config::GatewayConfig::load(&config)?;
            let listeners = gateway::server::bind(&cfg).await?;
            let mut running = gateway::server::start(&cfg, listeners).await?;
            println!(
                "council gateway {} serving: peers on {} (mutual TLS), analysts on {} (Flight SQL, TLS){}; {} peer(s): {}",
                cfg.party,
                running.peer_addr,
                running.analyst_addr,
                running
                    .pg_addr
                    .map(|a| format!(" and {a} (PostgreSQL, TLS)"))
                    .unwrap_or_default(),
                cfg.peers.len(),
                cfg.peers.keys().cloned().collect::<Vec<_>>().join(", ")
            );
            let ended = tokio::select! {
                _ = tokio::signal::ctrl_c() => None,
                _ = terminate() => None,
                l = running.listener_ended() => Some(l),
            };
            match ended {
                None => {
                    println!("shutting down");
                    running.stop().await;
                }
                Some(what) => {
                    // A gateway with a door gone must not look healthy.
                    eprintln!(
                        "council gateway {}: {what}; stopping the whole gateway (restart it, e.g. from its supervisor)",
                        cfg.party
                    );
                    running.stop().await;
                    return Err(anyhow!("{what}"));
                }
            }
        }
        Command::Query {
            conn,
            format,
            explain,
            sql,
        } => {
            let c = client(&conn).await?;
            if explain {
                print!("{}", c.explain(&sql).await.map_err(|e| anyhow!("{e}"))?);
            } else {
                let batches = c.query(&sql).await.map_err(|e| anyhow!("{e}"))?;
                print!("{}", render(&batches, format)?);
                if let Some(f) = batches
                    .first()
                    .and_then(|b| gateway::dp::footer(&b.schema()))
                {
                    // On standard error: the rows on standard output stay
                    // machine-readable in every format.
                    eprint!("{f}");
                }
            }
        }
        Command::Explain { conn, sql } => {
            let c = client(&conn).await?;
            print!("{}", c.explain(&sql).await.map_err(|e| anyhow!("{e}"))?);
        }
        Command::Policy { command } => return policy(command).await,
        Command::Budget {
            command: BudgetCommand::Show { config, analyst },
        } => {
            let cfg = gateway::config::GatewayConfig::load(&config)?;
            print!(
                "{}",
                gateway::dp::budget_report(
                    &cfg.party,
                    cfg.policy.privacy.as_ref(),
                    &cfg.budget_ledger,
                    analyst.as_deref(),
                    policies::ledger::now_unix()
                )?
            );
        }
        Command::Audit {
            command: AuditCommand::Verify { file },
        } => match policies::audit::verify(&file) {
            Ok((n, head)) => println!("{}: {n} entries, chain intact; head {head}", file.display()),
            Err(e) => bail!("{}: {e}", file.display()),
        },
        Command::NewToken => {
            let (token, digest) = gateway::config::new_token();
            println!("token: {token}");
            println!("token_sha256 = \"{digest}\"");
        }
        Command::HashPassword { password } => {
            let p = match password {
                Some(p) => p,
                None => {
                    let mut s = String::new();
                    std::io::stdin().read_line(&mut s)?;
                    s.trim_end_matches(['\n', '\r']).to_string()
                }
            };
            println!(
                "password_hash = \"{}\"",
                gateway::config::hash_password(&p)?
            );
            println!("scram = \"{}\"", gateway::config::scram_verifier(&p));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(unix)]
async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending::<()>().await,
    }
}

#[cfg(not(unix))]
async fn terminate() {
    std::future::pending::<()>().await
}

async fn policy(cmd: PolicyCommand) -> Result<ExitCode> {
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let load_catalog = |p: &PathBuf| -> Result<planner::Catalog> {
        Ok(planner::Catalog::from_toml(
            &read(p)?,
            &p.display().to_string(),
        )?)
    };
    match cmd {
        PolicyCommand::Check { file, catalog } => {
            let cat = catalog.as_ref().map(load_catalog).transpose()?;
            match policies::Policy::parse(&read(&file)?, cat.as_ref()) {
                Ok(p) => {
                    if let Some(pp) = &p.privacy {
                        let dp_tables: Vec<&String> = p
                            .tables
                            .iter()
                            .filter(|(_, t)| t.privacy.is_some())
                            .map(|(n, _)| n)
                            .collect();
                        println!(
                            "differential privacy for {:?}: {} mechanism, ε = {} per query, budget ε = {} per analyst per {} days",
                            dp_tables,
                            pp.mechanism.name(),
                            planner::privacy::epsilon_text(pp.epsilon_micro),
                            planner::privacy::epsilon_text(pp.budget.epsilon_micro),
                            pp.budget.period_days
                        );
                    }
                    println!(
                        "{}: ok ({} table(s), {} analyst rule(s){})",
                        file.display(),
                        p.tables.len(),
                        p.allow.len(),
                        if cat.is_some() {
                            ", checked against the catalog"
                        } else {
                            "; pass --catalog to check names too"
                        }
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(problems) => {
                    for pr in &problems {
                        eprintln!("{}:{}: {}", file.display(), pr.line, pr.message);
                    }
                    eprintln!("{} problem(s)", problems.len());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        PolicyCommand::Test {
            file,
            catalog,
            sql,
            analyst,
            roles,
            expect,
        } => {
            let cat = load_catalog(&catalog)?;
            let pol = policies::Policy::parse(&read(&file)?, Some(&cat)).map_err(|pr| {
                anyhow!(
                    "{} has errors; run `council policy check` first: {}",
                    file.display(),
                    pr.iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            })?;
            let (party, name) = analyst
                .split_once(':')
                .ok_or_else(|| anyhow!("--analyst must be PARTY:NAME"))?;
            let who = policies::Analyst {
                party: party.into(),
                name: name.into(),
                roles,
            };
            let parties = vec![pol.party.clone().unwrap_or_else(|| "this_party".into())];
            let plan = planner::plan_query(&sql, &cat, &parties, &Default::default()).await;
            let decision = match plan {
                Err(e) => {
                    println!("deny: the planner refuses the query before any policy: {e}");
                    "deny"
                }
                Ok(plan) => match {
                    // Every use, as the checker classed it.
                    println!("column uses:");
                    for line in plan.uses.describe() {
                        println!("  {line}");
                    }
                    pol.check(&plan, &who)
                } {
                    policies::Decision::Allow => {
                        println!("allow: every column use is listed in {}", file.display());
                        if let Some(req) = pol.requirement(&plan, &who) {
                            // The noise this policy alone would ask for (the
                            // federation's other policies may ask for more).
                            let dp = planner::privacy::DpParams::merge(&[req], 1)
                                .map_err(|e| anyhow!(e))?
                                .ok_or_else(|| anyhow!("no privacy parameters"))?;
                            match plan.with_privacy(dp) {
                                Ok(p) => print!("{}", p.explain_privacy().unwrap_or_default()),
                                Err(e) => {
                                    println!("deny: under the differential privacy this policy requires: {e}");
                                    return match expect.as_deref() {
                                        Some("allow") => Ok(ExitCode::FAILURE),
                                        _ => Ok(ExitCode::SUCCESS),
                                    };
                                }
                            }
                        }
                        "allow"
                    }
                    policies::Decision::Deny { rule, reason } => {
                        println!("deny: {reason} (policy: {rule})");
                        "deny"
                    }
                },
            };
            match expect {
                Some(e) if e != decision => {
                    eprintln!("expected {e}, got {decision}");
                    Ok(ExitCode::FAILURE)
                }
                _ => Ok(ExitCode::SUCCESS),
            }
        }
    }
}
