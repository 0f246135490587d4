//! The in-memory event log of the embedded store: a ring of the last
//! [`RETENTION`] events and a broadcast for live subscribers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::{EventFeed, StoredEvent};

/// How many events the embedded store keeps for clients that reconnect.
pub const RETENTION: usize = 10_000;

#[derive(Debug)]
pub(crate) struct MemoryLog {
    ring: Mutex<(u64, VecDeque<StoredEvent>)>,
    tx: broadcast::Sender<StoredEvent>,
    /// The id before this process's first event.
    start: u64,
}

impl MemoryLog {
    pub(crate) fn new() -> Self {
        // Ids start from the clock so that they keep growing across restarts.
        let start =
            u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(0) * 1000;
        MemoryLog {
            ring: Mutex::new((start, VecDeque::new())),
            tx: broadcast::channel(4096).0,
            start,
        }
    }

    /// Ids up to this may have been events of an earlier process.
    pub(crate) fn floor(&self) -> u64 {
        self.start
    }

    pub(crate) fn append(&self, body: &[u8]) -> u64 {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.0 += 1;
        let event = StoredEvent {
            id: ring.0,
            body: body.to_vec(),
        };
        if ring.1.len() == RETENTION {
            ring.1.pop_front();
        }
        ring.1.push_back(event.clone());
        // Sent under the lock, so that subscribers see ids in order.
        let _ = self.tx.send(event);
        ring.0
    }

    fn after(&self, id: u64) -> (Vec<StoredEvent>, broadcast::Receiver<StoredEvent>) {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.tx.subscribe();
        let backlog = ring.1.iter().filter(|e| e.id > id).cloned().collect();
        (backlog, rx)
    }

    /// Events after `after` still in the ring, then live ones. A subscriber
    /// that falls behind the broadcast refills from the ring.
    pub(crate) fn feed(self: &Arc<Self>, after: u64) -> EventFeed {
        let (backlog, rx) = self.after(after);
        let state = (self.clone(), VecDeque::from(backlog), rx, after);
        Box::pin(futures_util::stream::unfold(
            state,
            |(log, mut pending, mut rx, mut last)| async move {
                loop {
                    if let Some(e) = pending.pop_front() {
                        if e.id <= last {
                            continue;
                        }
                        last = e.id;
                        return Some((e, (log, pending, rx, last)));
                    }
                    match rx.recv().await {
                        Ok(e) => pending.push_back(e),
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            let (backlog, new_rx) = log.after(last);
                            pending = VecDeque::from(backlog);
                            rx = new_rx;
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        ))
    }
}
