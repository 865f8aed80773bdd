//! Cluster membership: which worker processes exist and where.
//!
//! With etcd, every worker registers `<prefix>/workers/<name>` (a JSON [`WorkerInfo`])
//! under a lease it keeps alive; a worker that dies stops renewing and its key expires.
//! The coordinator lists and watches that prefix, and stores each placement epoch under
//! `<prefix>/placement`. Without etcd, a static `--peers` list names the workers and the
//! coordinator asks each for its [`WorkerInfo`] over gRPC.

use std::time::Duration;

use etcd_client::{
    Client, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, WatchOptions,
};
use serde::{Deserialize, Serialize};

/// What a worker tells the cluster about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Unique within the cluster; ranks are given in name order.
    pub name: String,
    /// Where its gRPC service listens (`host:port`).
    pub addr: String,
    /// Memory it offers for weights and KV.
    pub memory_bytes: u64,
    /// "cpu" or "cuda:N".
    pub device: String,
}

/// Renews a lease every third of its TTL until renewing fails.
async fn keep_alive(mut keeper: LeaseKeeper, mut stream: LeaseKeepAliveStream, ttl: Duration) {
    let every = Duration::from_secs((ttl.as_secs() / 3).max(1));
    loop {
        if let Err(e) = keeper.keep_alive().await {
            tracing::error!(error = %e, "etcd lease keep-alive failed");
            return;
        }
        match stream.message().await {
            Ok(Some(r)) if r.ttl() > 0 => {}
            other => {
                tracing::error!(?other, "etcd lease lost");
                return;
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// A membership change seen by the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberEvent {
    Joined(WorkerInfo),
    Lost(String),
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("etcd at {endpoint}: {source}")]
    Etcd {
        endpoint: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd key {key}: {reason}")]
    BadValue { key: String, reason: String },
    #[error("{have} of {want} workers registered after {secs} s: {names:?}")]
    TooFew {
        have: usize,
        want: usize,
        secs: u64,
        names: Vec<String>,
    },
}

/// The etcd keys of one cluster.
#[derive(Clone, Debug)]
pub struct EtcdMembership {
    endpoint: String,
    prefix: String,
}

impl EtcdMembership {
    /// `endpoint` like `http://127.0.0.1:2379`; keys live under `/hyserve/<cluster>/`.
    pub fn new(endpoint: &str, cluster: &str) -> Self {
        Self {
            endpoint: endpoint.to_string(),
            prefix: format!("/hyserve/{cluster}"),
        }
    }

    fn err(&self, source: etcd_client::Error) -> MembershipError {
        MembershipError::Etcd {
            endpoint: self.endpoint.clone(),
            source,
        }
    }

    async fn client(&self) -> Result<Client, MembershipError> {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10));
        Client::connect([self.endpoint.as_str()], Some(opts))
            .await
            .map_err(|e| self.err(e))
    }

    fn workers_prefix(&self) -> String {
        format!("{}/workers/", self.prefix)
    }

    pub fn placement_key(&self) -> String {
        format!("{}/placement", self.prefix)
    }

    /// Registers `info` under a lease of `ttl` and keeps it alive until the returned
    /// task is dropped or the process dies; the key then expires within `ttl`. A lease
    /// lost to an etcd outage is registered again as soon as etcd answers.
    pub async fn register(
        &self,
        info: &WorkerInfo,
        ttl: Duration,
    ) -> Result<tokio::task::JoinHandle<()>, MembershipError> {
        let first = self.register_once(info, ttl).await?;
        let (me, info) = (self.clone(), info.clone());
        Ok(tokio::spawn(async move {
            let mut lease = Some(first);
            loop {
                if let Some((keeper, stream)) = lease.take() {
                    keep_alive(keeper, stream, ttl).await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                match me.register_once(&info, ttl).await {
                    Ok(l) => lease = Some(l),
                    Err(e) => {
                        tracing::warn!(error = %e, "registering in etcd again failed; retrying")
                    }
                }
            }
        }))
    }

    async fn register_once(
        &self,
        info: &WorkerInfo,
        ttl: Duration,
    ) -> Result<(LeaseKeeper, LeaseKeepAliveStream), MembershipError> {
        let mut client = self.client().await?;
        let ttl_s = ttl.as_secs().max(2) as i64;
        let lease = client
            .lease_grant(ttl_s, None)
            .await
            .map_err(|e| self.err(e))?
            .id();
        let key = format!("{}{}", self.workers_prefix(), info.name);
        let value = serde_json::to_string(info).expect("WorkerInfo serializes");
        client
            .put(
                key.clone(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(|e| self.err(e))?;
        let kept = client
            .lease_keep_alive(lease)
            .await
            .map_err(|e| self.err(e))?;
        tracing::info!(key = %key, ttl_s, "registered in etcd");
        Ok(kept)
    }

    /// The workers registered now.
    pub async fn list(&self) -> Result<Vec<WorkerInfo>, MembershipError> {
        let mut client = self.client().await?;
        let resp = client
            .get(self.workers_prefix(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let info: WorkerInfo =
                serde_json::from_slice(kv.value()).map_err(|e| MembershipError::BadValue {
                    key,
                    reason: e.to_string(),
                })?;
            out.push(info);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Waits until `want` workers are registered (polling), then returns them in name
    /// order; a longer wait than `timeout` is an error naming who is there.
    pub async fn wait_for(
        &self,
        want: usize,
        timeout: Duration,
    ) -> Result<Vec<WorkerInfo>, MembershipError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let have = self.list().await?;
            if have.len() >= want {
                return Ok(have.into_iter().take(want).collect());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(MembershipError::TooFew {
                    have: have.len(),
                    want,
                    secs: timeout.as_secs(),
                    names: have.into_iter().map(|w| w.name).collect(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Streams joins and losses to `on_event` until the watch fails.
    pub async fn watch(
        &self,
        mut on_event: impl FnMut(MemberEvent) + Send,
    ) -> Result<(), MembershipError> {
        let mut client = self.client().await?;
        let prefix = self.workers_prefix();
        let mut stream = client
            .watch(prefix.clone(), Some(WatchOptions::new().with_prefix()))
            .await
            .map_err(|e| self.err(e))?;
        while let Some(resp) = stream.message().await.map_err(|e| self.err(e))? {
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let name = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
                match ev.event_type() {
                    EventType::Put => match serde_json::from_slice::<WorkerInfo>(kv.value()) {
                        Ok(info) => on_event(MemberEvent::Joined(info)),
                        Err(e) => tracing::warn!(key = %key, error = %e, "bad worker entry"),
                    },
                    EventType::Delete => on_event(MemberEvent::Lost(name)),
                }
            }
        }
        Ok(())
    }

    /// Stores a placement epoch (JSON).
    pub async fn store_placement(&self, value: &str) -> Result<(), MembershipError> {
        let mut client = self.client().await?;
        client
            .put(self.placement_key(), value, None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The stored placement, if any.
    pub async fn load_placement(&self) -> Result<Option<String>, MembershipError> {
        let mut client = self.client().await?;
        let resp = client
            .get(self.placement_key(), None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }
}
