//! The `/metrics` endpoint on a production host's port, served by hyper: `GET /metrics` answers
//! with the exposition text, anything else with 404 or 405. One request per connection.
//!
//! What a port on a busy host needs beyond HTTP:
//! - A bounded number of connections ([`MAX_CONNECTIONS`]): descriptors and buffers stay bounded
//!   whatever clients do.
//! - Idle clients cannot lock scrapers out: at the limit, the oldest connection that has not yet
//!   sent a complete request is closed to make room. A scraper sends its request as soon as it
//!   connects, so it is served, however many idle connections arrive before or after it.
//! - A stalled client is dropped after [`CONNECTION_TIMEOUT`], and nothing here ever makes the
//!   tracer wait: each connection is a task of its own.

use std::{
    collections::VecDeque,
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{ALLOW, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use crate::metrics::Metrics;

/// Connections open at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send its request and read the answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (out of descriptors, say), instead of retrying at once in a loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// A request's head must fit in this (hyper's smallest buffer); a larger one is refused.
const MAX_REQUEST_BYTES: usize = 8 << 10;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the metrics address; done before the kernel is touched, so a taken port fails early.
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to listen on --metrics-addr {addr}"))
}

/// Serves `/metrics` until the process ends.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let mut open = Open::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if !open.make_room() {
            // Every connection is being answered: the newcomer is told no by the close.
            drop(stream);
            continue;
        }
        let requested = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(connection(
            stream,
            Arc::clone(&metrics),
            Arc::clone(&requested),
        ));
        open.connections.push_back(Connection { task, requested });
    }
}

/// One open connection, as the accept loop tracks it.
struct Connection {
    task: JoinHandle<()>,
    /// Set once its request has arrived: from then on it is being answered, not idle.
    requested: Arc<AtomicBool>,
}

/// The open connections, oldest first.
#[derive(Default)]
struct Open {
    connections: VecDeque<Connection>,
}

impl Open {
    /// Forgets connections that ended, then, at the limit, closes the oldest one still waiting
    /// for its request. False when every connection is being answered.
    fn make_room(&mut self) -> bool {
        self.connections.retain(|c| !c.task.is_finished());
        if self.connections.len() < MAX_CONNECTIONS {
            return true;
        }
        let idle = self
            .connections
            .iter()
            .position(|c| !c.requested.load(Ordering::Relaxed));
        match idle.and_then(|i| self.connections.remove(i)) {
            Some(oldest) => {
                // Dropping its task closes the socket.
                oldest.task.abort();
                true
            }
            None => false,
        }
    }
}

async fn connection(stream: TcpStream, metrics: Arc<Metrics>, requested: Arc<AtomicBool>) {
    let service = service_fn(move |request: Request<Incoming>| {
        requested.store(true, Ordering::Relaxed);
        let response = respond(request.method(), request.uri().path(), &metrics);
        async move { Ok::<_, Infallible>(response) }
    });
    let serving = http1::Builder::new()
        .keep_alive(false)
        .max_buf_size(MAX_REQUEST_BYTES)
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), service);
    // A client that stalls is dropped; errors (a reset, a malformed request) end the connection.
    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, serving).await;
}

fn respond(method: &Method, path: &str, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (method, path) {
        (&Method::GET, "/metrics") => (StatusCode::OK, OPENMETRICS, metrics.encode()),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "metrics are at /metrics\n".to_owned(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(ALLOW, hyper::header::HeaderValue::from_static("GET"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_of_metrics_is_answered_with_the_page() {
        let metrics = Metrics::default();
        let page = respond(&Method::GET, "/metrics", &metrics);
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(page.headers()[CONTENT_TYPE], OPENMETRICS);
        assert_eq!(
            respond(&Method::GET, "/", &metrics).status(),
            StatusCode::NOT_FOUND
        );
        let post = respond(&Method::POST, "/metrics", &metrics);
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[ALLOW], "GET");
    }
}
