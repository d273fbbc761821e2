//! The writer: a thread of its own that owns the destination, fed formatted chunks through a queue
//! bounded in bytes. A write that blocks (a stalled pipe, a collector restarting, a slow disk)
//! stops only this thread: the run loop keeps draining the ring buffer into the queue, and keeps
//! answering signals and `/metrics`, until the queue is full.
//!
//! The budget is a semaphore of bytes the run loop can wait on without blocking its thread; each
//! queued chunk holds its bytes until it is written. The queue itself is a mutex and a condition
//! variable, signalled only when the thread waits for work: a busy writer costs no wakeups.

use std::{
    collections::VecDeque,
    io,
    sync::{
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

use anyhow::Context as _;
use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::Destination;

/// Formatted lines and how many events they hold.
pub struct Chunk {
    pub bytes: Bytes,
    pub events: u64,
}

impl Chunk {
    /// What the chunk holds against the queue's budget: its bytes and its place in the queue.
    pub fn cost(&self) -> usize {
        self.bytes.len() + size_of::<Message>()
    }
}

/// Room in the queue for one chunk, given back when dropped (once the chunk is written).
pub struct Room {
    _permit: OwnedSemaphorePermit,
}

enum Message {
    Chunk(Chunk, Room),
    /// Reopen the file (SIGHUP), after the chunks queued before it.
    Reopen,
}

/// How the writer thread ended.
pub enum Outcome {
    /// The queue was closed and everything in it written.
    Done,
    /// The reader of our output went away (a closed pipe).
    ReaderGone,
    /// A write failed (a full disk).
    Failed(anyhow::Error),
}

#[derive(Default)]
struct Queue {
    state: Mutex<State>,
    /// Signalled when there is something to write, or the queue closed.
    ready: Condvar,
}

#[derive(Default)]
struct State {
    messages: VecDeque<Message>,
    /// Nothing more will come (the run loop is done), or nothing more is taken (the writer ended).
    closed: bool,
    /// The writer thread waits for `ready`.
    idle: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; should it ever, the queue is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The run loop's end of the writer.
pub struct Writer {
    queue: Arc<Queue>,
    budget: Arc<Semaphore>,
    capacity: usize,
    written: Arc<AtomicU64>,
    done: oneshot::Receiver<Outcome>,
}

impl Writer {
    /// Starts the writer thread; the queue holds at most `capacity` bytes.
    pub fn spawn(mut destination: Destination, capacity: usize) -> anyhow::Result<Self> {
        let capacity = capacity.min(Semaphore::MAX_PERMITS);
        let queue = Arc::new(Queue::default());
        let (finished, done) = oneshot::channel();
        let written = Arc::new(AtomicU64::new(0));
        let (thread_queue, counter) = (Arc::clone(&queue), Arc::clone(&written));
        thread::Builder::new()
            .name("writer".to_owned())
            .spawn(move || {
                let outcome = write_all(&mut destination, &thread_queue, &counter);
                // Whatever is still queued will not be written: its room goes back.
                let mut state = thread_queue.lock();
                state.closed = true;
                state.messages.clear();
                drop(state);
                let _ = finished.send(outcome);
            })
            .context("failed to start the writer thread")?;
        Ok(Self {
            queue,
            budget: Arc::new(Semaphore::new(capacity)),
            capacity,
            written,
            done,
        })
    }

    /// Queues `chunk` if there is room for it; gives it back otherwise.
    pub fn try_send(&mut self, chunk: Chunk) -> Result<(), Chunk> {
        match Arc::clone(&self.budget).try_acquire_many_owned(self.permits(chunk.cost())) {
            Ok(permit) => {
                self.send(chunk, Room { _permit: permit });
                Ok(())
            }
            Err(_) => Err(chunk),
        }
    }

    /// Waits until a chunk of `cost` fits. Dropping the future gives nothing up.
    pub fn room(&self, cost: usize) -> impl Future<Output = Room> + use<> {
        let budget = Arc::clone(&self.budget);
        let permits = self.permits(cost);
        async move {
            match budget.acquire_many_owned(permits).await {
                Ok(permit) => Room { _permit: permit },
                // The semaphore is never closed.
                Err(_) => std::future::pending().await,
            }
        }
    }

    /// Queues `chunk` in the room waited for.
    pub fn send(&mut self, chunk: Chunk, room: Room) {
        self.queue(Message::Chunk(chunk, room));
    }

    /// Reopens the file once what is queued before is written.
    pub fn reopen(&mut self) {
        self.queue(Message::Reopen);
    }

    /// Nothing more will be queued: the writer ends once the queue is written.
    pub fn close(&mut self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_one();
    }

    /// Events written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// How the writer thread ended; pending while it runs.
    pub async fn finished(&mut self) -> Outcome {
        (&mut self.done).await.unwrap_or_else(|_| {
            Outcome::Failed(anyhow::anyhow!("the writer thread stopped unexpectedly"))
        })
    }

    fn queue(&mut self, message: Message) {
        let mut state = self.queue.lock();
        // Once the writer has ended, what comes is dropped (and its room given back); the run
        // loop learns why through `finished`.
        if !state.closed {
            state.messages.push_back(message);
            if state.idle {
                self.queue.ready.notify_one();
            }
        }
    }

    /// Permits for `cost` bytes; a chunk larger than the whole queue takes all of it.
    fn permits(&self, cost: usize) -> u32 {
        u32::try_from(cost.min(self.capacity)).unwrap_or(u32::MAX)
    }
}

/// The writer thread: takes everything queued at once and writes it in order, until the queue is
/// closed and empty or a write fails.
fn write_all(destination: &mut Destination, queue: &Queue, written: &AtomicU64) -> Outcome {
    let mut batch = VecDeque::new();
    loop {
        {
            let mut state = queue.lock();
            while state.messages.is_empty() && !state.closed {
                state.idle = true;
                state = queue
                    .ready
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                state.idle = false;
            }
            if state.messages.is_empty() {
                return Outcome::Done;
            }
            std::mem::swap(&mut batch, &mut state.messages);
        }
        while let Some(message) = batch.pop_front() {
            match message {
                Message::Chunk(chunk, room) => {
                    match destination.write_all(&chunk.bytes) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                            return Outcome::ReaderGone;
                        }
                        Err(e) => {
                            return Outcome::Failed(anyhow::Error::new(e).context(format!(
                                "failed to write to {}",
                                destination.describe()
                            )));
                        }
                    }
                    written.fetch_add(chunk.events, Ordering::Relaxed);
                    // Only now is the chunk's memory free: its room goes back to the run loop.
                    drop(chunk);
                    drop(room);
                }
                Message::Reopen => {
                    if let Err(e) = destination.reopen() {
                        eprintln!(
                            "tcptrace: warning: {e:#}; still writing to the file already open"
                        );
                    }
                }
            }
        }
    }
}
