//! Moving bytes both ways: half-close passed on, bounded buffers
//! (backpressure: a slow reader slows the writer down, nothing piles up),
//! and an idle timeout.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffer per direction: large enough for bulk transfers, small enough that
/// thousands of connections stay cheap. Never grows.
const BUFFER: usize = 64 * 1024;

/// A stream that counts what is read from it and notes when.
pub(crate) struct Counted<S> {
    inner: S,
    read: Arc<AtomicU64>,
    last: Arc<AtomicU64>,
    start: Instant,
}

impl<S> Counted<S> {
    pub(crate) fn new(
        inner: S,
        read: Arc<AtomicU64>,
        last: Arc<AtomicU64>,
        start: Instant,
    ) -> Self {
        Counted {
            inner,
            read,
            last,
            start,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut me.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            me.read.fetch_add(n as u64, Ordering::Relaxed);
            let ms = u64::try_from(me.start.elapsed().as_millis()).unwrap_or(u64::MAX);
            me.last.store(ms, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// How a pipe ended.
#[derive(Debug)]
pub(crate) enum End {
    /// Both sides finished (each half-close passed on).
    Done,
    /// Nothing moved for the idle timeout.
    Idle,
    /// A side failed.
    Error(io::Error),
}

/// Bytes moved: (from `a` to `b`, from `b` to `a`).
pub(crate) type Moved = (u64, u64);

/// Copies `a` to `b` and `b` to `a` until both are done or nothing moved
/// for `idle`. When one side ends its sending, the other side's sending half
/// is shut down (TLS: close_notify, then FIN) and the other direction goes on.
pub(crate) async fn pipe<A, B>(a: A, b: B, idle: Duration) -> (End, Moved)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let (from_a, from_b) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut a = Counted::new(a, from_a.clone(), last.clone(), start);
    let mut b = Counted::new(b, from_b.clone(), last.clone(), start);
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, BUFFER, BUFFER);
    let watch = async {
        let tick = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            tokio::time::sleep(tick).await;
            let quiet = start
                .elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
        }
    };
    let end = tokio::select! {
        r = copy => match r {
            Ok(_) => End::Done,
            Err(e) => End::Error(e),
        },
        () = watch => End::Idle,
    };
    (
        end,
        (
            from_a.load(Ordering::Relaxed),
            from_b.load(Ordering::Relaxed),
        ),
    )
}
