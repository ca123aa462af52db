//! The operations endpoint: `GET /metrics` (Prometheus text), `/health`
//! (200 while the process serves) and `/ready` (200 once the pipeline is up,
//! 503 before and while stopping).
//!
//! A minimal HTTP/1.1 responder on tokio's `TcpListener`: one GET per
//! connection, `Connection: close`, request head capped and timed out. That
//! is all a scraper or a probe needs, and it keeps an HTTP stack out of the
//! supervisor.

use crate::shutdown::Shutdown;
use crate::telemetry::Telemetry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// A request head larger than this is refused.
const MAX_HEAD_BYTES: usize = 8192;
/// A client gets this long to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("binding the metrics endpoint to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds the listening socket (before anything else starts, so a taken port
/// is an error at once).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, EndpointError> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| EndpointError::Bind { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| EndpointError::Bind { addr, source })?;
    Ok(listener)
}

/// Serves until `stop` fires. Must run inside the runtime.
pub async fn serve(
    listener: std::net::TcpListener,
    telemetry: Arc<Telemetry>,
    mut stop: Shutdown,
) -> std::io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics endpoint listening");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = stop.requested() => return Ok(()),
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return Ok(()), // closed: never happens, we own it
            },
        };
        let (conn, peer) = tokio::select! {
            _ = stop.requested() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let telemetry = telemetry.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(CLIENT_TIMEOUT, respond(conn, &telemetry)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics endpoint: client"),
                Err(_) => tracing::debug!(%peer, "metrics endpoint: client timed out"),
            }
        });
    }
}

async fn respond(mut conn: TcpStream, telemetry: &Telemetry) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD_BYTES {
            return write(
                &mut conn,
                431,
                "text/plain",
                "request head too large\n",
                true,
            )
            .await;
        }
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(()); // closed before a whole request
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let with_body = method != "HEAD";
    if method != "GET" && method != "HEAD" {
        return write(&mut conn, 405, "text/plain", "GET only\n", true).await;
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => {
            let body = telemetry.render();
            write(
                &mut conn,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
                with_body,
            )
            .await
        }
        "/health" => write(&mut conn, 200, "text/plain", "ok\n", with_body).await,
        "/ready" if telemetry.is_ready() => {
            write(&mut conn, 200, "text/plain", "ready\n", with_body).await
        }
        "/ready" => write(&mut conn, 503, "text/plain", "not ready\n", with_body).await,
        _ => write(&mut conn, 404, "text/plain", "not found\n", with_body).await,
    }
}

async fn write(
    conn: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
    with_body: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if with_body {
        out.push_str(body);
    }
    conn.write_all(out.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(request.as_bytes()).await.expect("send");
        let mut out = String::new();
        c.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn answers_metrics_health_ready_and_refuses_the_rest() {
        let listener = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let telemetry = Telemetry::new();
        telemetry.events_consumed(42);
        let (stop_tx, stop) = Shutdown::manual();
        let server = tokio::spawn(serve(listener, telemetry.clone(), stop));

        let metrics = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
        assert!(metrics.contains("\r\nConnection: close\r\n"));
        assert!(metrics.contains("\nanalytics_events_consumed_total 42\n"));
        let (head, body) = metrics.split_once("\r\n\r\n").expect("head and body");
        assert!(head.contains(&format!("Content-Length: {}", body.len())));

        assert!(
            get(addr, "GET /health HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 200")
        );
        assert!(
            get(addr, "GET /ready HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 503")
        );
        telemetry.set_ready(true);
        assert!(
            get(addr, "GET /ready HTTP/1.0\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 200")
        );
        telemetry.set_stopping();
        assert!(
            get(addr, "GET /ready HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 503")
        );

        assert!(
            get(addr, "GET /nope HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 404")
        );
        assert!(
            get(addr, "POST /metrics HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 405")
        );
        let head_only = get(addr, "HEAD /health HTTP/1.1\r\n\r\n").await;
        assert!(head_only.ends_with("\r\n\r\n"), "{head_only}");
        // One byte over the cap and no end of head: refused once all of it
        // is read (so the close does not reset the connection).
        let prefix = "GET /metrics HTTP/1.1\r\nX: ";
        let huge = format!("{prefix}{}", "a".repeat(MAX_HEAD_BYTES + 1 - prefix.len()));
        assert!(get(addr, &huge).await.starts_with("HTTP/1.1 431"));

        stop_tx.send(true).expect("stop");
        server.await.expect("join").expect("served");
    }
}
