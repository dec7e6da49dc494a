//! Cancel notices: the run ids that `request_cancel` (and the reaper, for a
//! deadline) publish on `<P>:{Q}:cancel`, delivered to the worker holding
//! the run.
//!
//! On a single server the scripts PUBLISH and workers SUBSCRIBE. On a
//! cluster the channel is a sharded one (SPUBLISH/SSUBSCRIBE): it lives in
//! its queue's slot, so a notice stays on the shard that owns the queue
//! instead of being broadcast to every node, and the cluster client
//! subscribes again on the new master after a failover. Under Sentinel a
//! feed ends when the sentinels name a new master (a demoted master stays
//! up as a replica, and nothing is published there any more), so the
//! worker subscribes again on the new one.

use tokio::sync::mpsc;

use super::{Backend, Store};
use crate::error::Result;

/// A stream of cancelled run ids for the queues it was opened on.
pub struct CancelNotices {
    feed: Feed,
}

enum Feed {
    Single(redis::aio::PubSub),
    Sentinel {
        pubsub: redis::aio::PubSub,
        switches: tokio::sync::watch::Receiver<u64>,
    },
    Cluster {
        pushes: mpsc::UnboundedReceiver<redis::PushInfo>,
        /// Kept alive: dropping it would end the subscriptions.
        _conn: redis::cluster_async::ClusterConnection,
    },
}

impl CancelNotices {
    /// The next cancelled run id; `None` when the connection ended (the
    /// caller opens a new feed). On a cluster the client resubscribes by
    /// itself after a node fails, so this goes on across a failover.
    pub async fn next(&mut self) -> Option<String> {
        match &mut self.feed {
            Feed::Single(pubsub) => {
                use futures_util::StreamExt;
                let msg = pubsub.on_message().next().await?;
                Some(msg.get_payload::<String>().unwrap_or_default())
            }
            Feed::Sentinel { pubsub, switches } => {
                use futures_util::StreamExt;
                let mut messages = pubsub.on_message();
                tokio::select! {
                    msg = messages.next() => Some(msg?.get_payload::<String>().unwrap_or_default()),
                    // A sender dropped with its store ends the feed too.
                    _ = switches.changed() => None,
                }
            }
            Feed::Cluster { pushes, .. } => loop {
                let push = pushes.recv().await?;
                if push.kind != redis::PushKind::SMessage && push.kind != redis::PushKind::Message {
                    continue;
                }
                // [channel, payload]
                if let Some(payload) = push.data.into_iter().nth(1)
                    && let Ok(run_id) = redis::from_redis_value::<String>(payload)
                {
                    return Some(run_id);
                }
            },
        }
    }
}

impl Store {
    /// Subscribes to the cancel channels of `queues` (of every partition of a partitioned one).
    pub async fn cancel_notices(&self, queues: &[String]) -> Result<CancelNotices> {
        let queues = self.physical_queues(queues).await?;
        let channels: Vec<String> = queues.iter().map(|q| self.queue_keys(q).cancel_channel()).collect();
        let feed = match &self.inner.backend {
            Backend::Single { client, .. } => {
                let mut pubsub = client.get_async_pubsub().await?;
                for channel in &channels {
                    pubsub.subscribe(channel).await?;
                }
                Feed::Single(pubsub)
            }
            Backend::Sentinel(link) => {
                // Taken before the subscription: a switch while subscribing ends the feed.
                let mut switches = link.switches();
                switches.mark_unchanged();
                let mut pubsub = link.pubsub().await?;
                for channel in &channels {
                    pubsub.subscribe(channel).await?;
                }
                Feed::Sentinel { pubsub, switches }
            }
            Backend::Cluster { nodes, .. } => {
                let (tx, pushes) = mpsc::unbounded_channel();
                let client = super::conn::cluster_client(nodes, Some(self.config().response_timeout), Some(tx))?;
                let mut conn = client.get_async_connection().await?;
                // One SSUBSCRIBE per channel: each lives in its own slot.
                for channel in &channels {
                    conn.ssubscribe(channel).await?;
                }
                Feed::Cluster { pushes, _conn: conn }
            }
        };
        Ok(CancelNotices { feed })
    }
}
