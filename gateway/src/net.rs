//! Sockets with identities: TLS acceptors that hand tonic connections
//! tagged with who is on the other end, and TLS connectors for tonic
//! channels that verify who they reached.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// Who is on the other end of an accepted connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// The party id from a verified client certificate (peer channel only).
    pub party: Option<String>,
}

/// An accepted TLS connection, tagged with its [`ConnInfo`].
pub struct TaggedStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: ConnInfo,
}

impl Connected for TaggedStream {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TaggedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TaggedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Decides whether an authenticated peer may connect; returns its party id.
pub type Admit =
    Arc<dyn Fn(&rustls::ServerConnection) -> Result<Option<String>, String> + Send + Sync>;

/// Accepts TLS connections on `listener`, handshakes each in its own task
/// (a slow or hostile client cannot stall the others), and yields those
/// `admit` lets in. Refusals are logged, never fatal.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    admit: Admit,
    label: &'static str,
) -> ReceiverStream<Result<TaggedStream, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = tx.closed() => break,
            };
            let (tcp, remote) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("[{label}] accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let admit = admit.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let hs =
                    tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
                        .await;
                let stream = match hs {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        eprintln!("[{label}] TLS handshake with {remote} refused: {e}");
                        return;
                    }
                    Err(_) => {
                        eprintln!("[{label}] TLS handshake with {remote} timed out");
                        return;
                    }
                };
                match admit(stream.get_ref().1) {
                    Ok(party) => {
                        let _ = tx
                            .send(Ok(TaggedStream {
                                inner: stream,
                                info: ConnInfo {
                                    remote: Some(remote),
                                    party,
                                },
                            }))
                            .await;
                    }
                    Err(why) => eprintln!("[{label}] connection from {remote} refused: {why}"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A tonic connector that dials `addr` over TLS and verifies `server_name`.
#[derive(Clone)]
pub struct TlsDialer {
    pub addr: String,
    pub server_name: ServerName<'static>,
    pub config: Arc<rustls::ClientConfig>,
}

impl tower::Service<http::Uri> for TlsDialer {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&me.addr).await?;
            tcp.set_nodelay(true)?;
            let tls = TlsConnector::from(me.config)
                .connect(me.server_name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// The server name to verify when an analyst dials `addr` (host:port).
pub fn server_name_for(addr: &str) -> anyhow::Result<ServerName<'static>> {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    ServerName::try_from(host.to_string())
        .map_err(|e| anyhow::anyhow!("`{host}` is not a valid host name: {e}"))
}
