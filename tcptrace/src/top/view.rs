//! Drawing a [`Model`] on one screen: the host's sockets per state, the state machine's edges,
//! the process table and the lists under it. Pure: it draws into any ratatui backend, so the tests
//! render into `TestBackend` and compare with golden screens.

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Paragraph, Row, Table},
};

use super::model::{LIST_ROWS, Model, Owner, STATES, SortKey};
use crate::event::TcpState;

/// The smallest terminal the view fits in.
pub const MIN_WIDTH: u16 = 120;
pub const MIN_HEIGHT: u16 = 32;

/// The client's path through the state machine (active open, first to close), as the RFC draws it.
const CLIENT_PATH: [(TcpState, TcpState); 8] = [
    (TcpState::Close, TcpState::SynSent),
    (TcpState::SynSent, TcpState::Established),
    (TcpState::Established, TcpState::FinWait1),
    (TcpState::FinWait1, TcpState::FinWait2),
    (TcpState::FinWait2, TcpState::TimeWait),
    (TcpState::FinWait1, TcpState::Closing),
    (TcpState::Closing, TcpState::TimeWait),
    (TcpState::TimeWait, TcpState::Close),
];

/// The server's path (passive open, the peer closes first).
const SERVER_PATH: [(TcpState, TcpState); 6] = [
    (TcpState::Close, TcpState::Listen),
    (TcpState::Listen, TcpState::SynRecv),
    (TcpState::SynRecv, TcpState::Established),
    (TcpState::Established, TcpState::CloseWait),
    (TcpState::CloseWait, TcpState::LastAck),
    (TcpState::LastAck, TcpState::Close),
];

/// What the person at the terminal chose: the sort, a pause, a filter.
#[derive(Debug)]
pub struct ViewState {
    pub sort: SortKey,
    pub paused: bool,
    /// The `/` filter in force (comm or port).
    pub filter: String,
    /// While `/` is being typed: the text so far.
    pub editing: Option<String>,
}

impl Default for ViewState {
    fn default() -> Self {
        Self {
            sort: SortKey::Opened,
            paused: false,
            filter: String::new(),
            editing: None,
        }
    }
}

/// The first line's facts: the mode, the filters given on the command line, the clock.
pub struct Header<'a> {
    pub mode: &'a str,
    pub filters: &'a str,
    pub clock: &'a str,
}

pub fn draw(frame: &mut Frame, model: &Model, view: &ViewState, header: &Header) {
    let area = frame.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        let message = format!(
            "The terminal is too small: {}x{}; tcptrace top needs {MIN_WIDTH}x{MIN_HEIGHT}. \
             q quits.",
            area.width, area.height
        );
        frame.render_widget(
            Paragraph::new(message).wrap(ratatui::widgets::Wrap { trim: true }),
            area,
        );
        return;
    }
    let [title, upper, processes, lists, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(STATES.len() as u16 + 3),
        Constraint::Min(5),
        Constraint::Length(LIST_ROWS as u16 + 2),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_title(frame, title, model, view, header);
    let [states, machine] =
        Layout::horizontal([Constraint::Length(36), Constraint::Min(60)]).areas(upper);
    draw_states(frame, states, model);
    draw_machine(frame, machine, model);
    draw_processes(frame, processes, model, view);
    draw_lists(frame, lists, model, view);
    draw_footer(frame, footer, model, view);
}

fn bold() -> Style {
    Style::new().add_modifier(Modifier::BOLD)
}

fn draw_title(frame: &mut Frame, area: Rect, model: &Model, view: &ViewState, header: &Header) {
    let mut spans = vec![
        Span::styled("tcptrace top", bold()),
        Span::raw(format!(" · {} mode", header.mode)),
    ];
    if !header.filters.is_empty() {
        spans.push(Span::raw(format!(" · {}", header.filters)));
    }
    spans.push(Span::raw(format!(" · {}", header.clock)));
    if model.lost > 0 {
        spans.push(Span::raw(format!(" · {} events lost", model.lost)));
    }
    if view.paused {
        spans.push(Span::styled(" · PAUSED", bold()));
    }
    frame.render_widget(Line::from(spans), area);
}

fn draw_states(frame: &mut Frame, area: Rect, model: &Model) {
    let title = match model.census_interval.as_secs() {
        _ if !model.census => " Sockets now (followed) ".to_owned(),
        0 | 1 => " Sockets now (the kernel's count) ".to_owned(),
        // A big host: the census runs less often than the redraw.
        n => format!(" Sockets (kernel's count, every {n} s) "),
    };
    let rows: Vec<Row> = match model.counts() {
        Some((counts, change)) => STATES
            .iter()
            .zip(counts.iter().zip(change.iter()))
            .filter(|(state, _)| **state != TcpState::Close)
            .map(|(state, (count, change))| {
                Row::new([
                    state.to_string(),
                    count.to_string(),
                    format!("{change:+.1}/s"),
                ])
            })
            .collect(),
        None => vec![Row::new(["counting...".to_owned()])],
    };
    let table = Table::new(
        rows,
        [
            Constraint::Length(12),
            Constraint::Length(8),
            Constraint::Length(11),
        ],
    )
    .header(Row::new(["STATE", "SOCKETS", "CHANGE"]).style(bold()))
    .block(Block::bordered().title(title));
    frame.render_widget(table, area);
}

/// A rate in the width of the machine's column: `12.5/s`, and whole from 1000 on (`48210/s`).
fn per_second(rate: f64) -> String {
    if rate >= 1000.0 {
        format!("{rate:.0}/s")
    } else {
        format!("{rate:.1}/s")
    }
}

/// A duration the way a person reads it: 850us, 12.3ms, 4.1s, 2m05s.
pub fn human_duration(ns: u64) -> String {
    match ns {
        0..1_000_000 => format!("{}us", ns / 1000),
        1_000_000..1_000_000_000 => format!("{:.1}ms", ns as f64 / 1e6),
        1_000_000_000..60_000_000_000 => format!("{:.1}s", ns as f64 / 1e9),
        _ => format!("{}m{:02}s", ns / 60_000_000_000, ns / 1_000_000_000 % 60),
    }
}

fn edge_row(model: &Model, (old, new): (TcpState, TcpState)) -> Row<'static> {
    let (rate, median) = match model.edge(old, new) {
        Some(edge) => (
            per_second(edge.rate.per_second),
            edge.median_ns
                .map_or_else(|| "-".to_owned(), human_duration),
        ),
        None => ("0.0/s".to_owned(), "-".to_owned()),
    };
    Row::new([format!("{old} → {new}"), rate, median])
}

fn draw_machine(frame: &mut Frame, area: Rect, model: &Model) {
    let block =
        Block::bordered().title(" State machine: transitions and median time in the state left ");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [client, server] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(inner);
    // The longest edge (`ESTABLISHED → CLOSE_WAIT`), a rate and a median: both paths side by
    // side fit the narrowest screen (MIN_WIDTH).
    let widths = [
        Constraint::Length(24),
        Constraint::Length(8),
        Constraint::Length(7),
    ];
    let header = |name: &'static str| Row::new([name, "RATE", "MEDIAN"]).style(bold());
    let rows: Vec<Row> = CLIENT_PATH.iter().map(|&e| edge_row(model, e)).collect();
    frame.render_widget(
        Table::new(rows, widths).header(header("client (active open)")),
        client,
    );
    let rows: Vec<Row> = SERVER_PATH.iter().map(|&e| edge_row(model, e)).collect();
    frame.render_widget(
        Table::new(rows, widths).header(header("server (passive open)")),
        server,
    );
}

/// A count and its parts: `3 refused:2 reset_received:1`.
fn with_parts(parts: &[(&str, u64)]) -> String {
    let total: u64 = parts.iter().map(|&(_, n)| n).sum();
    let mut sorted = parts.to_vec();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut text = total.to_string();
    for (name, n) in sorted {
        text.push_str(&format!(" {name}:{n}"));
    }
    text
}

fn owner_label(owner: &Owner) -> String {
    if owner.pid == 0 {
        owner.name.to_string()
    } else {
        format!("{}[{}]", owner.name, owner.pid)
    }
}

fn draw_processes(frame: &mut Frame, area: Rect, model: &Model, view: &ViewState) {
    let columns = [
        (None, "PROCESS"),
        (Some(SortKey::Opened), "OPENED/S"),
        (Some(SortKey::Closed), "CLOSED/S"),
        (Some(SortKey::Failures), "FAILURES"),
        (Some(SortKey::Retransmits), "RETRANSMITS"),
        (Some(SortKey::CloseWait), "CLOSE_WAIT"),
        (Some(SortKey::TimeWait), "TIME_WAIT"),
    ];
    let header = Row::new(columns.map(|(key, name)| {
        if key == Some(view.sort) {
            format!("{name}▼")
        } else {
            name.to_owned()
        }
    }))
    .style(bold());
    let rows: Vec<Row> = model
        .processes(view.sort, &view.filter)
        .into_iter()
        .map(|(owner, p)| {
            Row::new([
                owner_label(owner),
                format!("{:.1}", p.opened.per_second),
                format!("{:.1}", p.closed.per_second),
                with_parts(&p.failures),
                with_parts(&p.retransmits),
                p.close_wait.to_string(),
                p.time_wait.to_string(),
            ])
        })
        .collect();
    let table = Table::new(
        rows,
        [
            Constraint::Min(22),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Min(18),
            Constraint::Min(18),
            Constraint::Length(11),
            Constraint::Length(10),
        ],
    )
    .header(header)
    .block(Block::bordered().title(format!(" Processes, by {} ", view.sort.name())));
    frame.render_widget(table, area);
}

fn draw_lists(frame: &mut Frame, area: Rect, model: &Model, view: &ViewState) {
    let [waiting, peers, listeners] = Layout::horizontal([
        Constraint::Percentage(40),
        Constraint::Percentage(20),
        Constraint::Percentage(40),
    ])
    .areas(area);
    let now = model.now_ns();
    let lines: Vec<Line> = model
        .oldest_close_wait(&view.filter)
        .into_iter()
        .map(|s| {
            let age = match s.since_ns {
                Some(since) => human_duration(now.saturating_sub(since)),
                None => "since start".to_owned(),
            };
            // The age first: a long address or name is what a narrow column cuts.
            Line::from(format!(
                "{age:>11}  {} {}:{} → {}:{}",
                owner_label(&s.owner),
                s.local.0,
                s.local.1,
                s.remote.0,
                s.remote.1
            ))
        })
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" Longest in CLOSE_WAIT ")),
        waiting,
    );
    let lines: Vec<Line> = model
        .peers()
        .into_iter()
        .map(|(addr, n)| Line::from(format!("{n:>7}  {addr}")))
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" Peers by retransmits ")),
        peers,
    );
    let lines: Vec<Line> = model
        .listeners(&view.filter)
        .into_iter()
        .map(|l| {
            Line::from(format!(
                "{:>7} dropped, queue {}/{}  {} {}:{}",
                l.drops,
                l.backlog.0,
                l.backlog.1,
                owner_label(&l.owner),
                l.local.0,
                l.local.1
            ))
        })
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" Listeners with drops ")),
        listeners,
    );
}

fn draw_footer(frame: &mut Frame, area: Rect, model: &Model, view: &ViewState) {
    let filter = match &view.editing {
        Some(text) => format!("/{text}_  (Enter applies, Esc cancels)"),
        None if !view.filter.is_empty() => format!("filter: {}", view.filter),
        None => String::new(),
    };
    let mut spans = vec![
        Span::styled("q", bold()),
        Span::raw(" quit  "),
        Span::styled("s", bold()),
        Span::raw(" sort  "),
        Span::styled("p", bold()),
        Span::raw(if view.paused { " resume  " } else { " pause  " }),
        Span::styled("/", bold()),
        Span::raw(" filter by comm or port  "),
        Span::raw(filter),
    ];
    if model.unfollowed > 0 {
        spans.push(Span::raw(format!(
            "  ({} sockets not followed)",
            model.unfollowed
        )));
    }
    frame.render_widget(Line::from(spans), area);
}

#[cfg(test)]
mod tests {
    //! Golden screens: a model from synthetic events drawn into `TestBackend`, compared cell by
    //! cell with `golden/*.txt`. `TCPTRACE_BLESS=1 cargo test` writes them anew after a change
    //! to the view that is meant.

    use std::net::{IpAddr, Ipv4Addr};

    use ratatui::{Terminal, backend::TestBackend};

    use super::*;
    use crate::{
        event::Kind,
        listen_drops::ListenDrop,
        top::model::{Counts, state_index, transition},
    };

    /// A host in a busy second: the kernel's count, a client and a server path, a CLOSE_WAIT
    /// pile-up, retransmits to two peers and a listener dropping connections.
    fn busy_model() -> Model {
        let mut model = Model::new(false);
        model.tick(0);
        let mut counts = Counts::default();
        for (state, n) in [
            (TcpState::Listen, 12),
            (TcpState::Established, 1480),
            (TcpState::TimeWait, 3120),
            (TcpState::CloseWait, 3),
        ] {
            counts[state_index(state).unwrap()] = n;
        }
        model.census_counts(0, counts, std::time::Duration::from_secs(1));
        for cookie in 1..=40 {
            model.event(
                &transition(cookie, TcpState::SynRecv, TcpState::Established, 1),
                None,
            );
        }
        for cookie in 1..=3 {
            // In CLOSE_WAIT since the start of the interval: 2 s at the tick.
            let mut event = transition(cookie, TcpState::Established, TcpState::CloseWait, 0);
            event.kind = Kind::State {
                old: TcpState::Established,
                new: TcpState::CloseWait,
                duration_ns: Some(cookie * 1_500_000),
            };
            model.event(&event, None);
        }
        for cookie in 41..=50 {
            let mut event = transition(cookie, TcpState::Close, TcpState::SynSent, 1);
            event.comm = [0; 16];
            event.comm[..4].copy_from_slice(b"curl");
            event.pid = 7;
            model.event(&event, None);
            event.kind = Kind::State {
                old: TcpState::SynSent,
                new: TcpState::Established,
                duration_ns: Some(250_000),
            };
            model.event(&event, None);
            event.kind = Kind::Retransmit {
                state: Some(TcpState::Established),
                err: None,
            };
            event.daddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1 + (cookie % 2) as u8));
            model.event(&event, None);
        }
        let mut drop = transition(99, TcpState::Listen, TcpState::Listen, 2);
        drop.kind = Kind::ListenDrop(ListenDrop {
            overflow: 20,
            no_socket: 0,
            total: 20,
            ack_backlog: 129,
            max_ack_backlog: 128,
        });
        model.event(&drop, None);
        let mut counts_later = counts;
        counts_later[state_index(TcpState::Established).unwrap()] = 1520;
        counts_later[state_index(TcpState::TimeWait).unwrap()] = 3100;
        model.census_counts(
            2_000_000_000,
            counts_later,
            std::time::Duration::from_secs(1),
        );
        model.tick(2_000_000_000);
        model
    }

    /// The screen as text, one line per row, trailing blanks cut.
    fn render(model: &Model, view: &ViewState, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        let header = Header {
            mode: "btf",
            filters: "port 80",
            clock: "12:00:00 UTC",
        };
        terminal
            .draw(|frame| draw(frame, model, view, &header))
            .unwrap();
        let buffer = terminal.backend().buffer();
        let mut text = String::new();
        for y in 0..height {
            let row: String = (0..width)
                .map(|x| buffer[(x, y)].symbol())
                .collect::<String>();
            text.push_str(row.trim_end());
            text.push('\n');
        }
        text
    }

    fn assert_golden(name: &str, screen: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/top/golden")
            .join(format!("{name}.txt"));
        if std::env::var_os("TCPTRACE_BLESS").is_some() {
            std::fs::write(&path, screen).unwrap();
        }
        let golden = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (TCPTRACE_BLESS=1 writes it)", path.display()));
        assert!(
            screen == golden,
            "the screen differs from {}:\n{screen}",
            path.display()
        );
    }

    #[test]
    fn a_busy_host_on_a_full_screen() {
        assert_golden(
            "busy",
            &render(&busy_model(), &ViewState::default(), 140, 45),
        );
    }

    #[test]
    fn sorted_by_retransmits_paused_and_filtered_by_comm() {
        let view = ViewState {
            sort: SortKey::Retransmits,
            paused: true,
            filter: "curl".to_owned(),
            editing: None,
        };
        assert_golden("filtered", &render(&busy_model(), &view, 120, 32));
    }

    #[test]
    fn a_terminal_too_small_says_so() {
        assert_golden(
            "too_small",
            &render(&busy_model(), &ViewState::default(), 80, 24),
        );
    }

    #[test]
    fn before_the_first_count() {
        assert_golden(
            "counting",
            &render(&Model::new(false), &ViewState::default(), 120, 32),
        );
    }
}
