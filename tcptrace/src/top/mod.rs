//! `tcptrace top`: the tracer's events (and, in BTF mode, the kernel's census of the host's
//! sockets) drawn on a full-screen view a person reads, refreshed every second.
//!
//! The tracer feeds a [`Model`] ([`Feed`]); a thread of its own ([`Screen`]) owns the terminal,
//! ticks the model, draws it and reads the keys. `q` (or Ctrl-C, which raw mode turns into a key)
//! ends tcptrace as SIGTERM does. While the view is up, what tcptrace would print on stderr is
//! kept and printed once the terminal is back as it was.

mod keys;
pub mod model;
pub mod view;

use std::{
    io::{IsTerminal as _, Read as _, Seek as _, Write as _},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub use self::model::Model;
use self::{
    keys::{Input, Key, Keys},
    model::{Counts, state_index},
    view::{Header, ViewState},
};
use crate::{cgroup::Cgroup, event::TcpEvent, kernel::Census, tracer::monotonic_ns};

/// How often the view is refreshed, and the census taken.
pub const REFRESH: Duration = Duration::from_secs(1);
/// A census may cost a two-hundredth of the time until the next one (0.5% of a core; between
/// two, every transition moves the counts on)...
const CENSUS_BUDGET: u32 = 200;
/// ...but comes at least this often (it also counts what no transition shows: request sockets,
/// and timewait sockets that were there before tracing began and expire).
const CENSUS_MAX_INTERVAL: Duration = Duration::from_secs(10);

/// The longest a key waits to be seen.
const KEY_POLL: Duration = Duration::from_millis(100);

/// What the tracer hands the view: every event that passed the filters, and the census.
pub struct Feed {
    model: Arc<Mutex<Model>>,
    census: Option<Census>,
    census_wanted: bool,
}

impl Feed {
    /// `census_counts`: whether the kernel's census of the host's sockets counts what the filters
    /// keep (it sees no owners: with owner filters the view counts the sockets it follows).
    pub fn new(model: Arc<Mutex<Model>>, census_counts: bool) -> Self {
        Self {
            model,
            census: None,
            census_wanted: census_counts,
        }
    }

    /// The census the kernel side loaded (BTF mode), if the view takes one.
    pub fn with_census(mut self, census: Option<Census>) -> Self {
        self.census = census.filter(|_| self.census_wanted);
        self
    }

    fn model(&self) -> MutexGuard<'_, Model> {
        // A panic elsewhere while holding it leaves the model as it was: keep going.
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn event(&self, event: &TcpEvent, cgroup: Option<&Cgroup>) {
        self.model().event(event, cgroup);
    }

    pub fn lost(&self, count: u64) {
        self.model().lost(count);
    }

    pub fn has_census(&self) -> bool {
        self.census.is_some()
    }

    /// Takes the census, and says when the next one is due: a census costs one walk of the
    /// kernel's socket tables, so on a big host it runs less often than the view redraws, to
    /// cost at most 0.5% of a core ([`CENSUS_BUDGET`]). One that fails is given up (the view goes
    /// on with what it follows).
    pub fn take_census(&mut self, now_ns: u64) -> Duration {
        let Some(census) = &mut self.census else {
            return CENSUS_MAX_INTERVAL;
        };
        let cpu = crate::tracer::thread_cpu_ns();
        let counted = census.count();
        let cost = Duration::from_nanos(crate::tracer::thread_cpu_ns().saturating_sub(cpu));
        let interval = (cost * CENSUS_BUDGET).clamp(REFRESH, CENSUS_MAX_INTERVAL);
        match counted {
            Ok(raw) => {
                let mut counts = Counts::default();
                for (state, n) in raw.iter().enumerate() {
                    if let Some(i) = state_index(crate::event::TcpState::from(state as u32)) {
                        counts[i] += n;
                    }
                }
                self.model().census_counts(now_ns, counts, interval);
            }
            Err(e) => {
                eprintln!("tcptrace: warning: {e:#}; counting the sockets followed instead");
                self.census = None;
            }
        }
        interval
    }
}

/// The terminal while the view is up.
pub struct Screen {
    ui: Option<thread::JoinHandle<anyhow::Result<()>>>,
    stop: Arc<AtomicBool>,
    stderr: Option<KeptStderr>,
}

/// What the first line says.
pub struct Title {
    pub mode: String,
    pub filters: String,
}

impl Title {
    /// The filters the command line gave, as the first line shows them.
    pub fn new(cli: &crate::cli::Cli, mode: &str) -> Self {
        let list = |values: &[u16]| {
            values
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut filters = Vec::new();
        for (name, ports) in [
            ("port", &cli.ports),
            ("local port", &cli.local_ports),
            ("remote port", &cli.remote_ports),
        ] {
            if !ports.is_empty() {
                filters.push(format!("{name} {}", list(ports)));
            }
        }
        if !cli.pids.is_empty() {
            let pids: Vec<String> = cli.pids.iter().map(u32::to_string).collect();
            filters.push(format!("pid {}", pids.join(",")));
        }
        for cgroup in &cli.cgroups {
            filters.push(format!("cgroup {cgroup}"));
        }
        if let Some(container) = &cli.container {
            filters.push(format!("container {container}"));
        }
        if !cli.netns.is_empty() {
            let netns: Vec<String> = cli.netns.iter().map(u32::to_string).collect();
            filters.push(format!("netns {}", netns.join(",")));
        }
        if cli.ipv4 {
            filters.push("IPv4".to_owned());
        }
        if cli.ipv6 {
            filters.push("IPv6".to_owned());
        }
        Self {
            mode: mode.to_owned(),
            filters: filters.join(" · "),
        }
    }
}

/// Checks that there is a terminal to draw on, before anything is loaded.
pub fn check_terminal() -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() {
        bail!(
            "tcptrace top draws on a terminal, and stdout is not one (for a stream of lines, run tcptrace without top)"
        );
    }
    Ok(())
}

impl Screen {
    /// Takes the terminal (raw mode, the alternate screen) and starts drawing `model`.
    pub fn start(model: Arc<Mutex<Model>>, title: Title) -> anyhow::Result<Self> {
        let stderr = KeptStderr::start().context("failed to keep stderr while the view is up")?;
        let terminal = ratatui::try_init().context("failed to take the terminal")?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let ui = thread::Builder::new()
            .name("tcptrace-top".into())
            .spawn(move || {
                let drawn = run(terminal, &model, &title, &stopped);
                // However the view ends (q, a terminal that hung up or failed), tcptrace ends
                // with it: it does not go on tracing with nothing to show.
                if !stopped.load(Ordering::SeqCst) {
                    quit();
                }
                drawn
            })
            .context("failed to start the view")?;
        Ok(Self {
            ui: Some(ui),
            stop,
            stderr: Some(stderr),
        })
    }

    /// Gives the terminal back as it was, then prints what stderr got meanwhile.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.restore()
    }

    fn restore(&mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        let drawn = match self.ui.take().map(thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(anyhow::anyhow!("the view panicked")),
            None => Ok(()),
        };
        ratatui::restore();
        if let Some(stderr) = self.stderr.take() {
            stderr.finish();
        }
        drawn
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        if self.ui.is_some() {
            let _ = self.restore();
        }
    }
}

/// The view's loop: tick and draw once a second (unless paused), redraw at once on a key or a
/// resize; ends on `q` or when the terminal hangs up.
fn run(
    mut terminal: ratatui::DefaultTerminal,
    model: &Mutex<Model>,
    title: &Title,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let lock = || model.lock().unwrap_or_else(|e| e.into_inner());
    let mut keys = Keys::open().context("failed to read the terminal")?;
    let mut view = ViewState::default();
    let mut next_tick = Instant::now();
    let mut redraw = true;
    let mut size = terminal
        .size()
        .context("failed to read the terminal's size")?;
    while !stop.load(Ordering::SeqCst) {
        if Instant::now() >= next_tick {
            next_tick += REFRESH;
            if !view.paused {
                lock().tick(monotonic_ns());
                redraw = true;
            }
        }
        // A resize is drawn at the next wake-up (within KEY_POLL).
        let now_size = terminal
            .size()
            .context("failed to read the terminal's size")?;
        if now_size != size {
            size = now_size;
            redraw = true;
        }
        if redraw {
            let clock = clock_text();
            let header = Header {
                mode: &title.mode,
                filters: &title.filters,
                clock: &clock,
            };
            let model = lock();
            terminal
                .draw(|frame| view::draw(frame, &model, &view, &header))
                .context("failed to draw the view")?;
            redraw = false;
        }
        let wait = next_tick
            .saturating_duration_since(Instant::now())
            .min(KEY_POLL);
        match keys.wait(wait) {
            Input::Timeout => {}
            Input::HungUp => return Ok(()),
            Input::Keys(pressed) => {
                for key in pressed {
                    if handle_key(&mut view, key) == Action::Quit {
                        return Ok(());
                    }
                }
                redraw = true;
            }
        }
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Action {
    Continue,
    Quit,
}

fn handle_key(view: &mut ViewState, key: Key) -> Action {
    if key == Key::Interrupt {
        return Action::Quit;
    }
    if let Some(text) = &mut view.editing {
        match key {
            Key::Char(c) => text.push(c),
            Key::Backspace => {
                text.pop();
            }
            Key::Enter => view.filter = view.editing.take().unwrap_or_default(),
            Key::Esc => view.editing = None,
            Key::Interrupt => {}
        }
        return Action::Continue;
    }
    match key {
        Key::Char('q') => return Action::Quit,
        Key::Char('s') => view.sort = view.sort.next(),
        Key::Char('p') => view.paused = !view.paused,
        Key::Char('/') => view.editing = Some(String::new()),
        Key::Esc => view.filter.clear(),
        _ => {}
    }
    Action::Continue
}

/// Ends tcptrace the way SIGTERM does: the tracer's loop stops, then `main` gives the terminal
/// back and prints the summary.
fn quit() {
    // SAFETY: signals this process; no memory is touched.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGTERM);
    }
}

fn clock_text() -> String {
    let secs = crate::event::WallClock::now_ns() / 1_000_000_000;
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

/// stderr, kept in memory while the view owns the terminal.
struct KeptStderr {
    saved: OwnedFd,
    kept: std::fs::File,
}

impl KeptStderr {
    fn start() -> std::io::Result<Self> {
        // SAFETY: duplicates fd 2 into a new descriptor that we own.
        let saved = unsafe { libc::dup(2) };
        if saved < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `dup` returned a new descriptor nothing else owns.
        let saved = unsafe { OwnedFd::from_raw_fd(saved) };
        // SAFETY: a NUL-terminated name; returns a new descriptor or -1.
        let kept = unsafe { libc::memfd_create(c"tcptrace-stderr".as_ptr(), libc::MFD_CLOEXEC) };
        if kept < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: as above.
        let kept = unsafe { std::fs::File::from_raw_fd(kept) };
        // SAFETY: both descriptors are open; fd 2 now points at the memory file.
        if unsafe { libc::dup2(kept.as_raw_fd(), 2) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { saved, kept })
    }

    fn finish(mut self) {
        // SAFETY: both descriptors are open; fd 2 is the terminal's again.
        unsafe { libc::dup2(self.saved.as_raw_fd(), 2) };
        let mut text = Vec::new();
        if self.kept.rewind().is_ok() && self.kept.read_to_end(&mut text).is_ok() {
            let _ = std::io::stderr().write_all(&text);
        }
    }
}
