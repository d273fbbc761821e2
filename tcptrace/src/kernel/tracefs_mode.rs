//! tracefs mode: the classic tracepoints, whose record layouts come from the running kernel's
//! tracefs `format` files. Also the fallback of BTF mode for a tracepoint the kernel's BTF lacks.

use std::path::Path;

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramFd, TracePoint},
};
use tcptrace_common::{
    FILTER_FAILURES, FILTER_NETNS, HOLDERS_MAP, LISTEN_DROPS_MAP, LISTENERS_MAP,
    RETRANSMIT_LAYOUT_GLOBAL, RetransmitLayout, SOCKETS_MAP, STATE_LAYOUT_GLOBAL,
    SYNACK_LAYOUT_GLOBAL, TRACE_RETRANSMITS,
};

use super::{EBPF_OBJECT, Loaded, Mode, Settings, config, fill_filters, finish, loader};
use crate::tracefs;

pub fn load(settings: &Settings<'_>) -> anyhow::Result<Loaded> {
    if settings.filters.bits & FILTER_NETNS != 0 {
        // The classic tracepoints carry no namespace, and without BTF no socket can be read.
        bail!("--netns needs BTF mode: tracefs mode cannot see a socket's network namespace");
    }
    if settings.filters.bits & FILTER_FAILURES != 0 {
        bail!("--failures needs BTF mode: tracefs mode cannot read why a connection ended");
    }
    if settings.congestion_lines {
        bail!(
            "--events congestion needs BTF mode: tracefs mode cannot read a socket's congestion state"
        );
    }
    if settings.listen_drops_required {
        bail!(
            "--events listen-drops needs BTF mode: tracefs mode cannot see which listener dropped a connection"
        );
    }
    if settings.snapshot_asked {
        eprintln!("tcptrace: warning: --snapshot needs BTF mode; no snapshot is written");
    }
    let tracefs = tracefs::ensure_mounted()?;
    let retransmits = settings.filters.bits & TRACE_RETRANSMITS != 0;
    let config = config(settings, 0);
    // Always needed: the state program keeps the socket owners that retransmit lines carry.
    let state_layout = layout(
        &tracefs,
        "sock",
        "inet_sock_set_state",
        tracefs::Format::state_layout,
    )?;
    let mut retransmit_layout = RetransmitLayout::default();
    let mut synack_layout = None;
    if retransmits {
        retransmit_layout = retransmit(&tracefs, "tcp_retransmit_skb")?;
        match retransmit(&tracefs, "tcp_retransmit_synack") {
            Ok(synack) => synack_layout = Some(synack),
            Err(e) => eprintln!("tcptrace: warning: SYN-ACK retransmits not traced: {e:#}"),
        }
    }

    let log_level = super::diagnostics::level(settings.debug);
    super::raise_memlock_limit();
    let mut ebpf = loader(&config, settings.ring_buffer_bytes, &log_level)
        .override_global(STATE_LAYOUT_GLOBAL, &state_layout, true)
        .override_global(RETRANSMIT_LAYOUT_GLOBAL, &retransmit_layout, true)
        .override_global(
            SYNACK_LAYOUT_GLOBAL,
            &synack_layout.unwrap_or_default(),
            true,
        )
        .map_max_entries(SOCKETS_MAP, settings.max_sockets)
        // BTF mode's holders: unused here.
        .map_max_entries(HOLDERS_MAP, 1)
        .map_max_entries(LISTEN_DROPS_MAP, 1)
        .load(EBPF_OBJECT)
        .context("failed to load the eBPF program")?;
    fill_filters(&mut ebpf, settings.filters)?;

    let mut programs = vec![attach(&mut ebpf, "sock", "inet_sock_set_state")?];
    if retransmits {
        programs.push(attach(&mut ebpf, "tcp", "tcp_retransmit_skb")?);
        if synack_layout.is_some() {
            programs.push(attach(&mut ebpf, "tcp", "tcp_retransmit_synack")?);
        }
    }
    finish(ebpf, programs, Mode::Tracefs, Vec::new(), log_level)
}

/// The layout of a retransmit tracepoint (`tcp_retransmit_skb` or `tcp_retransmit_synack`).
pub fn retransmit(tracefs: &Path, name: &str) -> anyhow::Result<RetransmitLayout> {
    layout(tracefs, "tcp", name, tracefs::Format::retransmit_layout)
}

/// Loads and attaches the classic program named after its tracepoint.
pub fn attach(ebpf: &mut Ebpf, category: &str, name: &str) -> anyhow::Result<ProgramFd> {
    let tracepoint: &mut TracePoint = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?
        .try_into()?;
    tracepoint
        .load()
        .with_context(|| format!("the kernel refused the program for {category}:{name}"))?;
    tracepoint
        .attach(category, name)
        .with_context(|| format!("failed to attach {category}:{name}"))?;
    Ok(tracepoint.fd()?.try_clone()?)
}

fn layout<T>(
    tracefs: &Path,
    category: &str,
    name: &str,
    parse: impl FnOnce(&tracefs::Format) -> Result<T, tracefs::FormatError>,
) -> anyhow::Result<T> {
    let format = tracefs::read_format(tracefs, category, name)?;
    parse(&format).with_context(|| format!("unsupported layout of tracepoint {category}:{name}"))
}

/// The LRU maps only tracefs mode uses, shrunk to one entry when another mode runs.
pub fn shrink_unused_maps(loader: &mut EbpfLoader<'_>) {
    loader
        .map_max_entries(SOCKETS_MAP, 1)
        .map_max_entries(LISTENERS_MAP, 1);
}
