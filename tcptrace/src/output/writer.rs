//! The writer: a thread of its own that owns the destination, fed formatted chunks through a queue
//! bounded in bytes. A write that blocks (a stalled pipe, a collector restarting, a slow disk)
//! stops only this thread: the run loop keeps draining the ring buffer into the queue, and keeps
//! answering signals and `/metrics`, until the queue is full.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
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
    /// What the chunk holds against the queue's budget: its bytes and its place in the channel.
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

/// The run loop's end of the writer.
pub struct Writer {
    messages: Option<mpsc::Sender<Message>>,
    budget: Arc<Semaphore>,
    capacity: usize,
    written: Arc<AtomicU64>,
    done: oneshot::Receiver<Outcome>,
}

impl Writer {
    /// Starts the writer thread; the queue holds at most `capacity` bytes.
    pub fn spawn(mut destination: Destination, capacity: usize) -> anyhow::Result<Self> {
        let capacity = capacity.min(Semaphore::MAX_PERMITS);
        let (messages, queue) = mpsc::channel();
        let (finished, done) = oneshot::channel();
        let written = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&written);
        thread::Builder::new()
            .name("writer".to_owned())
            .spawn(move || {
                let _ = finished.send(write_all(&mut destination, &queue, &counter));
            })
            .context("failed to start the writer thread")?;
        Ok(Self {
            messages: Some(messages),
            budget: Arc::new(Semaphore::new(capacity)),
            capacity,
            written,
            done,
        })
    }

    /// Queues `chunk` if there is room for it; gives it back otherwise.
    pub fn try_send(&self, chunk: Chunk) -> Result<(), Chunk> {
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
    pub fn send(&self, chunk: Chunk, room: Room) {
        if let Some(messages) = &self.messages {
            // A writer that has ended says why through `finished`.
            let _ = messages.send(Message::Chunk(chunk, room));
        }
    }

    /// Reopens the file once what is queued before is written.
    pub fn reopen(&self) {
        if let Some(messages) = &self.messages {
            let _ = messages.send(Message::Reopen);
        }
    }

    /// Nothing more will be queued: the writer ends once the queue is written.
    pub fn close(&mut self) {
        self.messages = None;
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

    /// Permits for `cost` bytes; a chunk larger than the whole queue takes all of it.
    fn permits(&self, cost: usize) -> u32 {
        u32::try_from(cost.min(self.capacity)).unwrap_or(u32::MAX)
    }
}

/// The writer thread: writes chunks in order until the queue closes or a write fails.
fn write_all(
    destination: &mut Destination,
    queue: &mpsc::Receiver<Message>,
    written: &AtomicU64,
) -> Outcome {
    for message in queue {
        match message {
            Message::Chunk(chunk, room) => {
                match destination.write_all(&chunk.bytes) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Outcome::ReaderGone,
                    Err(e) => {
                        return Outcome::Failed(
                            anyhow::Error::new(e)
                                .context(format!("failed to write to {}", destination.describe())),
                        );
                    }
                }
                written.fetch_add(chunk.events, Ordering::Relaxed);
                // Only now is the chunk's memory free: its room goes back to the run loop.
                drop(chunk);
                drop(room);
            }
            Message::Reopen => {
                if let Err(e) = destination.reopen() {
                    eprintln!("tcptrace: warning: {e:#}; still writing to the file already open");
                }
            }
        }
    }
    Outcome::Done
}
