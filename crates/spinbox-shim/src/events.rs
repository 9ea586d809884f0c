//! Events to containerd, in order: one queue, one forwarder task.
//!
//! Handlers enqueue and go on (an RPC never waits on containerd's event service); the
//! forwarder publishes one event at a time, so TaskExit can never overtake TaskStart nor
//! TaskDelete overtake TaskExit. A refused publish is retried after
//! `timeouts.event_reconnect`, a bounded number of times, then dropped with an error log.
//! Closing the channel is the last cleanup phase: it waits for the queue to drain.

use std::sync::Arc;
use std::time::Duration;

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim_protos::protobuf::MessageDyn;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Attempts to hand an event to containerd before it is dropped (and logged).
const PUBLISH_ATTEMPTS: u32 = 3;

type Queued = (&'static str, Box<dyn MessageDyn>);

pub struct Events {
    tx: std::sync::Mutex<Option<mpsc::UnboundedSender<Queued>>>,
    forwarder: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: String, retry_after: Duration) -> Events {
        let (tx, mut rx) = mpsc::unbounded_channel::<Queued>();
        let publisher = Arc::new(publisher);
        let forwarder = tokio::spawn(async move {
            while let Some((topic, event)) = rx.recv().await {
                publish_with_retry(&publisher, &namespace, topic, event, retry_after).await;
            }
        });
        Events {
            tx: std::sync::Mutex::new(Some(tx)),
            forwarder: tokio::sync::Mutex::new(Some(forwarder)),
        }
    }

    /// Queues an event; after [`Events::close`] it is logged and dropped.
    pub fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match tx.as_ref() {
            Some(tx) if tx.send((topic, event)).is_ok() => {}
            _ => tracing::error!(topic, "event channel closed; event dropped"),
        }
    }

    /// Closes the channel and waits (up to `limit`) for queued events to reach containerd.
    /// Idempotent.
    pub async fn close(&self, limit: Duration) -> Vec<String> {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut handle) = self.forwarder.lock().await.take() else {
            return Vec::new();
        };
        match tokio::time::timeout(limit, &mut handle).await {
            Ok(Ok(())) => Vec::new(),
            Ok(Err(e)) => vec![format!("event forwarder failed: {e}")],
            Err(_) => {
                handle.abort();
                vec![format!("events still queued after {limit:?}; dropped")]
            }
        }
    }
}

/// Publishes an event; when the publisher refuses it (containerd unreachable, queue full),
/// waits `retry_after` and tries again, a bounded number of times.
async fn publish_with_retry(
    publisher: &RemotePublisher,
    namespace: &str,
    topic: &str,
    event: Box<dyn MessageDyn>,
    retry_after: Duration,
) {
    let mut last = String::new();
    for attempt in 1..=PUBLISH_ATTEMPTS {
        match publisher
            .publish(
                ttrpc::context::Context::default(),
                topic,
                namespace,
                event.clone_box(),
            )
            .await
        {
            Ok(()) => return,
            Err(e) => {
                last = e.to_string();
                tracing::warn!(topic, attempt, error = %e, "publishing event; retrying");
                tokio::time::sleep(retry_after).await;
            }
        }
    }
    tracing::error!(topic, error = %last, "event dropped after {PUBLISH_ATTEMPTS} attempts");
}

/// How long closing the channel may wait: every attempt of one event, plus slack.
pub fn close_limit(retry_after: Duration) -> Duration {
    retry_after * PUBLISH_ATTEMPTS + Duration::from_secs(1)
}
