//! `hyserve drain`: asks the `hyserve serve`/`coordinator` on this host to drain (stop
//! taking requests, report not ready, let those in flight finish) and waits for it.
//! Made for a Kubernetes preStop hook, before the SIGTERM that stops the process.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The server's HTTP address (on this host: `/drain` answers only local callers).
    #[arg(long, env = "HYSERVE_DRAIN_ADDR", default_value = "127.0.0.1:8000")]
    http_addr: SocketAddr,
    /// Longest wait for the requests in flight, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(drain(a))
}

async fn drain(a: Args) -> anyhow::Result<()> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(a.http_addr)
            .await
            .with_context(|| format!("connecting to {}", a.http_addr))?;
        let req = format!(
            "POST /drain?timeout_secs={} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            a.timeout_secs, a.http_addr
        );
        s.write_all(req.as_bytes()).await?;
        let mut resp = Vec::new();
        s.take(1 << 16).read_to_end(&mut resp).await?;
        anyhow::Ok(String::from_utf8_lossy(&resp).into_owned())
    };
    let resp = tokio::time::timeout(Duration::from_secs(a.timeout_secs + 10), fut)
        .await
        .context("the server did not answer the drain request in time")??;
    let status = resp.split_whitespace().nth(1).unwrap_or("");
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    eprintln!("drain: HTTP {status} {body}");
    match status {
        "200" => Ok(()),
        "504" => anyhow::bail!("requests were still in flight after {} s", a.timeout_secs),
        _ => anyhow::bail!("the server refused to drain (HTTP {status})"),
    }
}
