//! Coalescing an HTTP/2 connection's writes, so that what it sends in one round leaves in one
//! segment.
//!
//! h2 (under hyper and tonic) flushes at the end of every poll of a connection. A unary call
//! from etcd's Go client then costs the server three writes: the acknowledgement of the
//! client's bandwidth-probing PING (grpc-go sends one with nearly every request), flushed
//! before the handler has run; the response's headers and data; and its trailers, which h2
//! holds back while a data frame of 256 bytes or more waits to be written on its own. Each
//! write on loopback runs the kernel's TCP send path and wakes the client once more.
//!
//! [`CoalescingWriter`] takes every write into its own buffer and holds a flush back until
//! the runtime has run the tasks that were ready on the worker when the flush came (the
//! handler about to answer among them): it answers `Pending` and asks for the wake that
//! `tokio::task::yield_now` uses, which tokio defers until the worker runs out of ready tasks,
//! or at the latest until its periodic maintenance (every 61 task polls). Further flushes in
//! the meantime stay held, however often h2 calls them; the first one after the wake writes
//! everything gathered by then in one system call. Reporting no vectored writes makes h2 copy
//! data frames under 1 KiB into its own buffer, trailers included, instead of flushing before
//! them. A flush of [`HELD_BYTES_MAX`] or more is never held. Outside a tokio runtime the wake
//! comes at once, and a flush is merely postponed to the next call.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes gathered before they are written regardless of flushes (h2 hands over at most a
/// 16 KiB frame and its header at a time, so a round of several frames fits).
pub const GATHERED_BYTES_MAX: usize = 64 * 1024;
/// A flush of this much or more is not held: the bytes are worth a system call of their own,
/// and a stream filling the receiver's flow-control window must not wait for its next turn.
pub const HELD_BYTES_MAX: usize = 16 * 1024;
/// A buffer that grew past this is freed once written: an idle connection keeps no more.
const RETAINED_BYTES_MAX: usize = 4 * 1024;

/// An I/O stream whose writes are gathered and written together (see the module's docs).
#[derive(Debug)]
pub struct CoalescingWriter<S> {
    inner: S,
    /// Bytes taken from the writer and not yet written to `inner`: `gathered[written..]`.
    /// Invariant: `written <= gathered.len() <= GATHERED_BYTES_MAX`.
    gathered: Vec<u8>,
    written: usize,
    /// The flush held back since bytes last went out, if one was: it is let through once
    /// the runtime has run the tasks that were ready when it was held.
    hold: Option<Arc<Hold>>,
}

/// A held flush, released by a wake the runtime defers until it has run the tasks already
/// ready on the worker (`tokio::task::yield_now`'s wake): it then wakes the connection's task.
#[derive(Debug)]
struct Hold {
    released: AtomicBool,
    task: Mutex<Waker>,
}

impl Wake for Hold {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.released.store(true, Ordering::Release);
        self.task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .wake_by_ref();
    }
}

impl Hold {
    /// Holds a flush from the task of `cx` until the runtime's deferred wake.
    fn start(cx: &Context<'_>) -> Arc<Self> {
        let hold = Arc::new(Hold {
            released: AtomicBool::new(false),
            task: Mutex::new(cx.waker().clone()),
        });
        let waker = Waker::from(hold.clone());
        let mut yield_cx = Context::from_waker(&waker);
        // Its first poll defers the wake (outside a runtime it wakes at once, and the flush
        // is simply not held) and answers Pending; the future is not needed after that.
        let mut yielded = std::pin::pin!(tokio::task::yield_now());
        let _ = yielded.as_mut().poll(&mut yield_cx);
        hold
    }

    fn released(&self, cx: &Context<'_>) -> bool {
        if self.released.load(Ordering::Acquire) {
            return true;
        }
        let mut task = self.task.lock().unwrap_or_else(|p| p.into_inner());
        if !task.will_wake(cx.waker()) {
            *task = cx.waker().clone();
        }
        false
    }
}

impl<S> CoalescingWriter<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            gathered: Vec::new(),
            written: 0,
            hold: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Bytes taken and not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.gathered.len() - self.written
    }
}

impl<S: AsyncWrite + Unpin> CoalescingWriter<S> {
    /// Writes every gathered byte to `inner`.
    fn poll_write_gathered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.gathered.len() {
            let unwritten = &self.gathered[self.written..];
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, unwritten))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.written = 0;
        self.hold = None;
        if self.gathered.capacity() > RETAINED_BYTES_MAX {
            self.gathered = Vec::new();
        } else {
            self.gathered.clear();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CoalescingWriter<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CoalescingWriter<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.gathered.len() + buf.len() > GATHERED_BYTES_MAX {
            std::task::ready!(this.poll_write_gathered(cx))?;
            if buf.len() > GATHERED_BYTES_MAX {
                return Pin::new(&mut this.inner).poll_write(cx, buf);
            }
        }
        this.gathered.extend_from_slice(buf);
        debug_assert!(this.gathered.len() <= GATHERED_BYTES_MAX);
        Poll::Ready(Ok(buf.len()))
    }

    /// h2 picks its way of writing by this: without vectored writes it copies data frames
    /// under 1 KiB into its buffer (with what follows them) rather than flushing before them.
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pending_bytes() >= HELD_BYTES_MAX {
            std::task::ready!(this.poll_write_gathered(cx))?;
        } else if this.pending_bytes() > 0 {
            match &this.hold {
                // Let the tasks ready on this worker (the handler about to answer) add to the
                // gathered bytes first.
                None => {
                    this.hold = Some(Hold::start(cx));
                    return Poll::Pending;
                }
                Some(hold) if !hold.released(cx) => return Poll::Pending,
                Some(_) => std::task::ready!(this.poll_write_gathered(cx))?,
            }
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_write_gathered(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    type Writes = Arc<Mutex<Vec<Vec<u8>>>>;

    /// A writer that records each write it is given, takes at most `accept_max` bytes of
    /// each, and answers `Pending` while `blocked`.
    #[derive(Debug, Default)]
    struct Recorder {
        writes: Writes,
        accept_max: Option<usize>,
        blocked: bool,
        shut_down: bool,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.blocked {
                return Poll::Pending;
            }
            let n = buf.len().min(self.accept_max.unwrap_or(usize::MAX));
            self.writes.lock().unwrap().push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut_down = true;
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A writer over `recorder`, the waker its tests poll with (and its count of wakes), and
    /// the writes the recorder saw.
    fn setup(
        recorder: Recorder,
    ) -> (
        CoalescingWriter<Recorder>,
        Writes,
        Waker,
        Arc<CountingWaker>,
    ) {
        let writes = recorder.writes.clone();
        let wakes = Arc::new(CountingWaker::default());
        let waker = Waker::from(wakes.clone());
        (CoalescingWriter::new(recorder), writes, waker, wakes)
    }

    fn write(writer: &mut CoalescingWriter<Recorder>, cx: &mut Context<'_>, bytes: &[u8]) {
        match Pin::new(writer).poll_write(cx, bytes) {
            Poll::Ready(Ok(n)) => assert_eq!(n, bytes.len()),
            other => panic!("the write was not taken whole: {other:?}"),
        }
    }

    fn flush(writer: &mut CoalescingWriter<Recorder>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(writer).poll_flush(cx).map(|r| r.unwrap())
    }

    #[test]
    fn outside_a_runtime_a_flush_waits_for_the_next_call_which_writes_all_gathered_at_once() {
        let (mut writer, writes, waker, wakes) = setup(Recorder::default());
        let mut cx = Context::from_waker(&waker);

        write(&mut writer, &mut cx, b"ping-ack");
        assert_eq!(flush(&mut writer, &mut cx), Poll::Pending);
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            1,
            "held, so the task is woken"
        );
        assert!(writes.lock().unwrap().is_empty());

        write(&mut writer, &mut cx, b"headers+data");
        write(&mut writer, &mut cx, b"trailers");
        assert_eq!(flush(&mut writer, &mut cx), Poll::Ready(()));
        assert_eq!(
            *writes.lock().unwrap(),
            vec![b"ping-ackheaders+datatrailers".to_vec()]
        );
        assert_eq!(writer.pending_bytes(), 0);

        // The next round is held once again; a flush with nothing gathered is not.
        write(&mut writer, &mut cx, b"next");
        assert_eq!(flush(&mut writer, &mut cx), Poll::Pending);
        assert_eq!(flush(&mut writer, &mut cx), Poll::Ready(()));
        assert_eq!(flush(&mut writer, &mut cx), Poll::Ready(()));
        assert_eq!(writes.lock().unwrap().len(), 2);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn partial_and_blocked_writes_lose_and_reorder_nothing() {
        let (mut writer, writes, waker, _) = setup(Recorder {
            accept_max: Some(3),
            blocked: true,
            ..Default::default()
        });
        let mut cx = Context::from_waker(&waker);
        write(&mut writer, &mut cx, b"abcdefgh");
        assert_eq!(flush(&mut writer, &mut cx), Poll::Pending);
        // The socket is full: still pending, and nothing is dropped.
        assert_eq!(flush(&mut writer, &mut cx), Poll::Pending);
        assert_eq!(writer.pending_bytes(), 8);
        writer.inner.blocked = false;
        assert_eq!(flush(&mut writer, &mut cx), Poll::Ready(()));
        let sent: Vec<u8> = writes.lock().unwrap().concat();
        assert_eq!(sent, b"abcdefgh");
        assert_eq!(writes.lock().unwrap().len(), 3, "written 3 bytes at a time");
    }

    #[test]
    fn a_write_that_overflows_the_buffer_sends_what_was_gathered_first() {
        let (mut writer, writes, waker, _) = setup(Recorder::default());
        let mut cx = Context::from_waker(&waker);
        write(&mut writer, &mut cx, b"head");
        let big = vec![7u8; GATHERED_BYTES_MAX];
        write(&mut writer, &mut cx, &big);
        // The gathered head went out on its own; the big write was gathered after it.
        assert_eq!(*writes.lock().unwrap(), vec![b"head".to_vec()]);
        assert_eq!(writer.pending_bytes(), GATHERED_BYTES_MAX);
        let bigger = vec![8u8; GATHERED_BYTES_MAX + 1];
        write(&mut writer, &mut cx, &bigger);
        // Too big to gather: written through, after what was gathered before it.
        let sent = writes.lock().unwrap().clone();
        assert_eq!(sent, vec![b"head".to_vec(), big, bigger]);
        assert_eq!(writer.pending_bytes(), 0);
    }

    #[test]
    fn shutdown_writes_what_was_gathered_first() {
        let (mut writer, writes, waker, _) = setup(Recorder::default());
        let mut cx = Context::from_waker(&waker);
        write(&mut writer, &mut cx, b"goaway");
        let shut = Pin::new(&mut writer).poll_shutdown(&mut cx);
        assert!(matches!(shut, Poll::Ready(Ok(()))));
        assert!(writer.inner.shut_down);
        assert_eq!(*writes.lock().unwrap(), vec![b"goaway".to_vec()]);
    }

    /// The connection's task as hyper drives h2: each poll takes what the handler queued and
    /// flushes twice (hyper polls the connection again after taking a request).
    fn poll_connection(
        writer: &mut CoalescingWriter<Recorder>,
        queued: &Mutex<Vec<Vec<u8>>>,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        for bytes in queued.lock().unwrap().drain(..) {
            write(writer, cx, &bytes);
        }
        if flush(writer, cx).is_ready() {
            return Poll::Ready(());
        }
        flush(writer, cx)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_held_flush_waits_for_the_tasks_ready_before_it_even_when_flushed_again() {
        let (mut writer, writes, _, _) = setup(Recorder::default());
        let queued = Arc::new(Mutex::new(Vec::new()));
        write(
            &mut writer,
            &mut Context::from_waker(Waker::noop()),
            b"ping-ack",
        );
        let handler = {
            let queued = queued.clone();
            tokio::spawn(async move { queued.lock().unwrap().push(b"response".to_vec()) })
        };
        std::future::poll_fn(|cx| poll_connection(&mut writer, &queued, cx)).await;
        handler.await.unwrap();
        assert_eq!(*writes.lock().unwrap(), vec![b"ping-ackresponse".to_vec()]);

        // With nothing else to run, the held flush goes out on the runtime's next turn.
        write(
            &mut writer,
            &mut Context::from_waker(Waker::noop()),
            b"alone",
        );
        std::future::poll_fn(|cx| poll_connection(&mut writer, &queued, cx)).await;
        assert_eq!(writes.lock().unwrap().len(), 2);
        assert_eq!(writer.pending_bytes(), 0);
    }

    #[test]
    fn a_flush_of_a_full_frame_or_more_is_not_held() {
        let (mut writer, writes, waker, wakes) = setup(Recorder::default());
        let mut cx = Context::from_waker(&waker);
        write(&mut writer, &mut cx, &vec![1u8; HELD_BYTES_MAX - 1]);
        assert_eq!(flush(&mut writer, &mut cx), Poll::Pending);
        write(&mut writer, &mut cx, &[2u8]);
        assert_eq!(flush(&mut writer, &mut cx), Poll::Ready(()));
        assert_eq!(writes.lock().unwrap().len(), 1);
        write(&mut writer, &mut cx, &vec![3u8; HELD_BYTES_MAX]);
        assert_eq!(flush(&mut writer, &mut cx), Poll::Ready(()));
        assert_eq!(writes.lock().unwrap().len(), 2);
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            1,
            "only the small flush was held"
        );
    }
}
