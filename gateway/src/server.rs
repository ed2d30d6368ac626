//! Starting and stopping a gateway: the peer listener (mutual TLS) and the
//! analyst listener (TLS), each an Arrow Flight service.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::GatewayConfig;
use crate::flightsql::FlightSqlFrontDoor;
use crate::gateway::Gateway;
use crate::net::{tls_incoming, Admit};
use crate::service::{PeerService, MAX_MESSAGE};

pub struct RunningGateway {
    pub party: String,
    pub peer_addr: SocketAddr,
    pub analyst_addr: SocketAddr,
    /// The PostgreSQL listener, where configured.
    pub pg_addr: Option<SocketAddr>,
    pub gateway: Arc<Gateway>,
    shutdown: Vec<oneshot::Sender<()>>,
    /// Every listener's task, with what it serves.
    tasks: Vec<(String, JoinHandle<()>)>,
}

impl RunningGateway {
    /// Stops both listeners gracefully.
    pub async fn stop(mut self) {
        for s in self.shutdown.drain(..) {
            let _ = s.send(());
        }
        for (_, t) in self.tasks.drain(..) {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
        }
    }

    /// Resolves when any listener stops before `stop` (it failed, or its
    /// task panicked), naming it: a gateway whose door is gone must not go
    /// on looking healthy. `council serve` then stops the whole gateway and
    /// exits non-zero, for its supervisor to restart it.
    pub async fn listener_ended(&mut self) -> String {
        first_ended(&mut self.tasks).await
    }
}

/// The label of the first task of `tasks` to end (removed from the list);
/// never resolves for an empty list.
async fn first_ended(tasks: &mut Vec<(String, JoinHandle<()>)>) -> String {
    if tasks.is_empty() {
        return std::future::pending().await;
    }
    let (result, i, _) = futures::future::select_all(tasks.iter_mut().map(|(_, t)| t)).await;
    let (label, _) = tasks.remove(i);
    match result {
        Ok(()) => format!("the {label} stopped"),
        Err(e) if e.is_panic() => format!("the {label} panicked"),
        Err(_) => format!("the {label} was cancelled"),
    }
}

/// A gateway's bound listeners.
pub struct Listeners {
    pub peer: TcpListener,
    /// Flight SQL (and the `council` CLI).
    pub analyst: TcpListener,
    /// PostgreSQL wire protocol, if configured.
    pub pg: Option<TcpListener>,
}

/// Binds the listeners from the configured addresses.
pub async fn bind(cfg: &GatewayConfig) -> Result<Listeners> {
    let pg = match &cfg.pg_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the PostgreSQL listener to {a}"))?,
        ),
        None => None,
    };
    let (peer, analyst) = bind_two(cfg).await?;
    Ok(Listeners { peer, analyst, pg })
}

async fn bind_two(cfg: &GatewayConfig) -> Result<(TcpListener, TcpListener)> {
    let peer = TcpListener::bind(&cfg.peer_listen)
        .await
        .with_context(|| format!("binding the peer listener to {}", cfg.peer_listen))?;
    let analyst = TcpListener::bind(&cfg.analyst_listen)
        .await
        .with_context(|| format!("binding the analyst listener to {}", cfg.analyst_listen))?;
    Ok((peer, analyst))
}

/// Starts a gateway on already-bound listeners.
pub async fn start(cfg: &GatewayConfig, listeners: Listeners) -> Result<RunningGateway> {
    crate::tls::install_provider();
    let Listeners { peer, analyst, pg } = listeners;
    let gateway = Gateway::new(cfg).await?;
    let peer_addr = peer.local_addr()?;
    let analyst_addr = analyst.local_addr()?;
    let pg_addr = match &pg {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };

    let peers = cfg.peers.clone();
    let admit_peer: Admit = Arc::new(move |conn: &rustls::ServerConnection| {
        let cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("no client certificate")?;
        let party = crate::tls::party_of(cert).map_err(|e| e.to_string())?;
        if peers.contains_key(&party) {
            Ok(Some(party))
        } else {
            Err(format!(
                "certificate names `{party}`, which is not a configured peer"
            ))
        }
    });
    let admit_any: Admit = Arc::new(|_: &rustls::ServerConnection| Ok(None));

    let peer_incoming = tls_incoming(peer, cfg.tls.peer_server_config()?, admit_peer, "peer");
    let analyst_incoming = tls_incoming(
        analyst,
        cfg.tls.analyst_server_config()?,
        admit_any,
        "analyst",
    );

    let (peer_tx, peer_rx) = oneshot::channel::<()>();
    let (an_tx, an_rx) = oneshot::channel::<()>();
    let peer_svc = FlightServiceServer::new(PeerService::new(gateway.clone()))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let analyst_svc = FlightServiceServer::new(
        FlightSqlFrontDoor::new(gateway.clone()).map_err(|e| anyhow::anyhow!(e))?,
    )
    .max_decoding_message_size(16 << 20)
    .max_encoding_message_size(MAX_MESSAGE);
    let t1 = spawn_flight(
        peer_svc,
        peer_incoming,
        peer_rx,
        format!("{} peer service", cfg.party),
        Some(PEER_WINDOWS),
    );
    let t2 = spawn_flight(
        analyst_svc,
        analyst_incoming,
        an_rx,
        format!("{} analyst service", cfg.party),
        None,
    );
    let mut shutdown = vec![peer_tx, an_tx];
    let mut tasks = vec![
        ("peer service".to_string(), t1),
        ("analyst service (Flight SQL)".to_string(), t2),
    ];
    if let Some(pg) = pg {
        let (tx, rx) = oneshot::channel::<()>();
        let door = Arc::new(crate::pg::PgFrontDoor::new(gateway.clone()));
        tasks.insert(
            0,
            (
                "PostgreSQL door".to_string(),
                crate::pg::spawn_pg(pg, cfg.tls.pg_server_config()?, door, rx),
            ),
        );
        shutdown.push(tx);
    }
    Ok(RunningGateway {
        party: cfg.party.clone(),
        peer_addr,
        analyst_addr,
        pg_addr,
        gateway,
        shutdown,
        tasks,
    })
}

/// The peer service's HTTP/2 windows (per stream, per connection): a share
/// stream whose query has not read its batches yet holds at most its
/// stream window, and the connection's window has room for every stream a
/// peer may have open at once (`MAX_PUTS_PER_PEER`) and one more, so that
/// one waiting stream never stalls another query's messages or an abort on
/// the same connection.
const PEER_WINDOWS: (u32, u32) = (
    1 << 20,
    (crate::service::MAX_PUTS_PER_PEER as u32 + 2) << 20,
);

/// Serves one Flight service on `incoming` until `stop` fires.
fn spawn_flight<T: FlightService>(
    svc: FlightServiceServer<T>,
    incoming: tokio_stream::wrappers::ReceiverStream<
        Result<crate::net::TaggedStream, std::io::Error>,
    >,
    stop: oneshot::Receiver<()>,
    label: String,
    windows: Option<(u32, u32)>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .initial_stream_window_size(windows.map(|w| w.0))
            .initial_connection_window_size(windows.map(|w| w.1))
            .tcp_nodelay(true)
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop.await;
            })
            .await;
        if let Err(e) = r {
            eprintln!("[{label}] stopped: {e}");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_listener_to_end_is_named_and_removed() {
        let mut tasks = vec![
            (
                "peer service".to_string(),
                tokio::spawn(std::future::pending::<()>()),
            ),
            (
                "PostgreSQL door".to_string(),
                tokio::spawn(async { panic!("a door's bug") }),
            ),
        ];
        let ended = first_ended(&mut tasks).await;
        assert_eq!(ended, "the PostgreSQL door panicked");
        assert_eq!(tasks.len(), 1);
        let quiet = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            first_ended(&mut tasks),
        )
        .await;
        assert!(quiet.is_err(), "a listener that still runs is not reported");
    }
}
