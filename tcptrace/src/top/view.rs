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
pub const MIN_WIDTH: u16 = 110;
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
    let title = if model.census {
        " Sockets now (the kernel's count) "
    } else {
        " Sockets now (followed) "
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
            format!("{:.1}/s", edge.rate.per_second),
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
    let widths = [
        Constraint::Length(26),
        Constraint::Length(9),
        Constraint::Length(8),
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
        owner.name.clone()
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
        Constraint::Percentage(25),
        Constraint::Percentage(35),
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
