//! BTF mode: the BTF-enabled tracepoints, with kernel struct offsets read from the running
//! kernel's BTF; at start, iterators give the sockets opened before tracing began their holder
//! (`holders`).

use std::path::Path;

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Btf, Ebpf,
    programs::{BtfTracePoint, ProgramFd},
};
use tcptrace_common::{
    CONTAINER_FILTER_GLOBAL, ContainerFilter, KERNEL_CGROUP_TAGGED, KERNEL_FIN_TIME,
    KERNEL_HAS_CGROUP, KERNEL_HAS_IPV6, KERNEL_HAS_NETNS, KERNEL_RETRANSMIT_DETAIL,
    KERNEL_RETRANSMIT_ERR, KERNEL_RST_REASON, KernelOffsets, LISTEN_DROP_LAYOUT_GLOBAL,
    LISTEN_DROPS_MAP, ListenDropLayout, OFFSETS_GLOBAL, RETRANSMIT_LAYOUT_GLOBAL,
    SND_CWND_OFFSET_GLOBAL, SYNACK_LAYOUT_GLOBAL, TRACE_CONGESTION, TRACE_LISTEN_DROPS,
    TRACE_RETRANSMITS, TRACE_SNAPSHOT,
};

use super::{
    Census, EBPF_OBJECT, ListenDropTable, Loaded, Mode, Settings, VMLINUX_BTF, brief, config,
    fill_filters, finish, holders, kernel_before, kernel_release, loader,
    timewait_scan::TimewaitScan, tracefs_mode, vmlinux,
};
use crate::tracefs;

/// Why this kernel cannot run BTF mode, if it cannot.
pub fn supported() -> anyhow::Result<()> {
    if kernel_before(5, 11) {
        bail!(
            "kernel {} is older than 5.11, the first with socket storage for tracing programs",
            kernel_release()
        );
    }
    if !Path::new(VMLINUX_BTF).exists() {
        bail!("{VMLINUX_BTF} does not exist (a kernel built without CONFIG_DEBUG_INFO_BTF)");
    }
    Ok(())
}

pub fn load(settings: &Settings<'_>) -> anyhow::Result<Loaded> {
    let (
        mut offsets,
        retransmit_args,
        synack_args,
        reset_args,
        socket_use,
        error_report,
        congestion,
        listen_drops,
    ) = {
        let vmlinux = vmlinux::Btf::from_file(Path::new(VMLINUX_BTF))?;
        let mut offsets = offsets(&vmlinux)?;
        // The kernel's reasons for the resets it sends (6.10+), named on the CLOSE lines.
        if let Some(reasons) = vmlinux.enum_values("sk_rst_reason") {
            let value = |name: &str| {
                reasons
                    .iter()
                    .find(|(n, _)| n == name)
                    .and_then(|(_, v)| u32::try_from(*v + 1).ok())
                    .unwrap_or(0)
            };
            offsets.rst_abort_on_close = value("SK_RST_REASON_TCP_ABORT_ON_CLOSE");
            offsets.rst_state = value("SK_RST_REASON_TCP_STATE");
            crate::ending::set_rst_reasons(reasons);
        }
        (
            offsets,
            vmlinux.tracepoint_args("tcp_retransmit_skb"),
            vmlinux.tracepoint_args("tcp_retransmit_synack"),
            vmlinux.tracepoint_args("tcp_send_reset"),
            vmlinux.tracepoint_args("sock_recv_length").is_some(),
            vmlinux.tracepoint_args("inet_sk_error_report").is_some(),
            congestion_tracepoint(&vmlinux, settings)?,
            listen_drop_layout(&vmlinux, settings)?,
        )
    };
    if reset_args.is_some_and(|args| args >= 3) {
        offsets.features |= KERNEL_RST_REASON;
    }
    let retransmits = settings.filters.bits & TRACE_RETRANSMITS != 0;
    if retransmit_args.is_some_and(|args| args >= 3) {
        offsets.features |= KERNEL_RETRANSMIT_ERR;
    }
    // A tracepoint whose BTF type this kernel lacks or renamed runs its classic program, which
    // reads the record through tracefs and cannot see socket storage: its lines carry no owner.
    let mut classic = Vec::new();
    if retransmits {
        for (name, args) in [
            ("tcp_retransmit_skb", retransmit_args),
            ("tcp_retransmit_synack", synack_args),
        ] {
            if args.is_none() {
                let tracefs = tracefs::ensure_mounted()?;
                match tracefs_mode::retransmit(&tracefs, name) {
                    Ok(layout) => {
                        eprintln!(
                            "tcptrace: warning: this kernel's BTF has no tracepoint {name}; its classic tracepoint is used, and its lines carry no owner"
                        );
                        classic.push((name, layout));
                    }
                    Err(e) => eprintln!("tcptrace: warning: {name} not traced: {e:#}"),
                }
            }
        }
    }

    let snapshot_bit = if settings.snapshot { TRACE_SNAPSHOT } else { 0 };
    let config = config(settings, snapshot_bit);
    let log_level = super::diagnostics::level(settings.debug);
    super::raise_memlock_limit();
    let snd_cwnd = congestion.unwrap_or_default();
    let mut loader = loader(&config, settings.ring_buffer_bytes, &log_level);
    loader.override_global(OFFSETS_GLOBAL, &offsets, true);
    let container = container_filter(settings.filters.container.as_deref());
    loader.override_global(CONTAINER_FILTER_GLOBAL, &container, true);
    loader.override_global(SND_CWND_OFFSET_GLOBAL, &snd_cwnd, true);
    let listen_drop_layout = listen_drops.unwrap_or_default();
    loader.override_global(LISTEN_DROP_LAYOUT_GLOBAL, &listen_drop_layout, true);
    if listen_drops.is_none() {
        loader.map_max_entries(LISTEN_DROPS_MAP, 1);
    }
    for (name, layout) in &classic {
        let global = if *name == "tcp_retransmit_skb" {
            RETRANSMIT_LAYOUT_GLOBAL
        } else {
            SYNACK_LAYOUT_GLOBAL
        };
        loader.override_global(global, layout, true);
    }
    tracefs_mode::shrink_unused_maps(&mut loader);
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .context("failed to load the eBPF program")?;
    drop(loader);
    fill_filters(&mut ebpf, settings.filters)?;

    // The object has no CO-RE relocations: the kernel's BTF is needed only now, to attach.
    let btf = Btf::from_sys_fs().context("failed to read the kernel's BTF")?;
    let mut programs = vec![attach(
        &mut ebpf,
        &btf,
        "btf_inet_sock_set_state",
        "inet_sock_set_state",
    )?];
    if retransmits {
        for (program, tracepoint, args) in [
            (
                "btf_tcp_retransmit_skb",
                "tcp_retransmit_skb",
                retransmit_args,
            ),
            (
                "btf_tcp_retransmit_synack",
                "tcp_retransmit_synack",
                synack_args,
            ),
        ] {
            if args.is_some() {
                programs.push(attach(&mut ebpf, &btf, program, tracepoint)?);
            } else if classic.iter().any(|(name, _)| *name == tracepoint) {
                programs.push(tracefs_mode::attach(&mut ebpf, "tcp", tracepoint)?);
            }
        }
    }

    // Congestion state changes: lines with `--events congestion`, counted in the metrics.
    if congestion.is_some() {
        programs.push(attach(
            &mut ebpf,
            &btf,
            "btf_tcp_cong_state_set",
            "tcp_cong_state_set",
        )?);
    }

    // Connections listeners' full accept queues dropped: counted per listener in the kernel,
    // read once a second.
    let listen_drop_table = if listen_drops.is_some() {
        programs.push(attach(&mut ebpf, &btf, "btf_kfree_skb", "kfree_skb")?);
        Some(ListenDropTable::take(&mut ebpf)?)
    } else {
        None
    };

    // Resets a socket sends before it closes (out of memory, keepalive, an abort) name the
    // kernel's reason on its CLOSE line.
    if reset_args.is_some() {
        programs.push(attach(
            &mut ebpf,
            &btf,
            "btf_tcp_send_reset",
            "tcp_send_reset",
        )?);
    }

    // A connect's soft error (an ICMP message while its owner held the socket) is kept for its
    // CLOSE line (Linux 5.15+ has the tracepoint).
    if error_report {
        programs.push(attach(
            &mut ebpf,
            &btf,
            "btf_inet_sk_error_report",
            "inet_sk_error_report",
        )?);
    }

    // Owners that exit hand their sockets to the process they forked (a daemon's listener).
    for (program, tracepoint) in [
        ("btf_sched_process_fork", "sched_process_fork"),
        ("btf_sched_process_exit", "sched_process_exit"),
        ("btf_sched_process_exec", "sched_process_exec"),
    ] {
        programs.push(attach(&mut ebpf, &btf, program, tracepoint)?);
    }

    // --container: cgroups made from now on are matched by the kernel side as they are made,
    // those that exist already by a walk of the hierarchy.
    if let Some(prefix) = &settings.filters.container {
        if offsets.features & KERNEL_HAS_CGROUP == 0 {
            bail!("--container: this kernel's sockets do not record their cgroup");
        }
        attach(&mut ebpf, &btf, "btf_cgroup_mkdir", "cgroup_mkdir")?;
        let mount = settings.cgroup_mount.ok_or_else(|| {
            anyhow!("--container needs cgroup v2, and no cgroup2 mount was found")
        })?;
        super::fill_container_cgroups(&mut ebpf, &crate::cgroup::matching(mount, prefix))?;
    }

    // A process that receives on a socket holds it: it becomes the socket's holder (an
    // accepting worker, a forked backend, a descriptor passed over). Linux 6.3+.
    if socket_use {
        programs.push(attach(
            &mut ebpf,
            &btf,
            "btf_sock_recv_length",
            "sock_recv_length",
        )?);
    }

    // Attached first, so that no socket opened meanwhile is missed; the iterators then give a
    // holder to every socket that has none yet.
    let snapshot = match holders::take(&mut ebpf, &btf) {
        Ok(found) => {
            if found.unreached > 0 {
                eprintln!(
                    "tcptrace: warning: {} network namespaces could not be entered: their sockets that predate tracing show pid 0 until used",
                    found.unreached
                );
            }
            found.records
        }
        Err(e) if settings.snapshot_asked => {
            return Err(SnapshotRefused(brief(&format!("{e:#}"), settings.debug)).into());
        }
        Err(e) => {
            eprintln!(
                "tcptrace: warning: sockets opened before tracing began show pid 0 until used: {}",
                brief(&format!("{e:#}"), settings.debug)
            );
            Vec::new()
        }
    };
    let timewait = TimewaitScan::load(&mut ebpf, &btf)?;
    let census = if settings.census {
        Some(Census::load(&mut ebpf, &btf)?)
    } else {
        None
    };
    // Parsed, the kernel's BTF is the largest thing tcptrace ever holds (15 MiB on 6.18): its
    // memory goes back to the system before the ring buffer is mapped and the tracing begins.
    drop(btf);
    super::return_free_memory();
    let mut loaded = finish(ebpf, programs, Mode::Btf, snapshot, log_level)?;
    loaded.timewait = Some(timewait);
    loaded.census = census;
    loaded.listen_drops = listen_drop_table;
    Ok(loaded)
}

/// Whether congestion state changes are traced, and where `tcp_sock` keeps its congestion
/// window: None when they are not asked for (`--events congestion`, or the metrics), or when
/// only the metrics ask and this kernel lacks the tracepoint (before 6.3: the metric stays
/// absent). Lines asked for on such a kernel are an error.
fn congestion_tracepoint(
    btf: &vmlinux::Btf,
    settings: &Settings<'_>,
) -> anyhow::Result<Option<u32>> {
    if settings.filters.bits & TRACE_CONGESTION == 0 {
        return Ok(None);
    }
    let found = btf
        .tracepoint_args("tcp_cong_state_set")
        .and(btf.member_offset("tcp_sock", "snd_cwnd"));
    match found {
        None if settings.congestion_lines => bail!(
            "--events congestion: this kernel has no tracepoint tcp_cong_state_set (Linux 6.3 and later have it)"
        ),
        found => Ok(found),
    }
}

/// What the listen drop program reads on this kernel: None when listen drops are not asked for
/// (`--events listen-drops`, or the metrics), or when this kernel does not report them and they
/// were not named on the command line; named there, a kernel that does not report them is an
/// error.
fn listen_drop_layout(
    btf: &vmlinux::Btf,
    settings: &Settings<'_>,
) -> anyhow::Result<Option<ListenDropLayout>> {
    if settings.filters.bits & TRACE_LISTEN_DROPS == 0 {
        return Ok(None);
    }
    match super::listen_drop_table::layout(btf) {
        None if settings.listen_drops_required => bail!(
            "--events listen-drops: this kernel's kfree_skb tracepoint names neither the listener nor the listen overflow (Linux 6.15 and later do)"
        ),
        found => Ok(found),
    }
}

/// `--snapshot` cannot be written: the kernel refused the iterators. Fatal in every mode choice
/// (`auto` does not fall back to tracefs mode, which has no snapshot).
#[derive(Debug)]
pub struct SnapshotRefused(String);

impl std::fmt::Display for SnapshotRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--snapshot: the sockets that predate tracing cannot be listed: {}",
            self.0
        )
    }
}

impl std::error::Error for SnapshotRefused {}

/// `--container` as the kernel side compares it: the prefix in little-endian 8-byte words.
fn container_filter(prefix: Option<&str>) -> ContainerFilter {
    let mut filter = ContainerFilter::default();
    if let Some(prefix) = prefix {
        let bytes = prefix.as_bytes();
        let len = bytes.len().min(64);
        for (word, chunk) in filter.words.iter_mut().zip(bytes[..len].chunks(8)) {
            let mut padded = [0u8; 8];
            padded[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_le_bytes(padded);
        }
        filter.len = len as u32;
    }
    filter
}

/// Where BTF mode reads kernel structs on this kernel.
fn offsets(btf: &vmlinux::Btf) -> anyhow::Result<KernelOffsets> {
    let need = |name: &str, member: &str| {
        btf.member_offset(name, member)
            .ok_or_else(|| anyhow!("this kernel's BTF has no {name}.{member}"))
    };
    let v6 = (
        btf.member_offset("sock_common", "skc_v6_daddr"),
        btf.member_offset("sock_common", "skc_v6_rcv_saddr"),
    );
    let mut offsets = KernelOffsets {
        skc_daddr: need("sock_common", "skc_daddr")?,
        skc_rcv_saddr: need("sock_common", "skc_rcv_saddr")?,
        skc_dport: need("sock_common", "skc_dport")?,
        skc_num: need("sock_common", "skc_num")?,
        skc_family: need("sock_common", "skc_family")?,
        skc_state: need("sock_common", "skc_state")?,
        skc_v6_daddr: v6.0.unwrap_or_default(),
        skc_v6_rcv_saddr: v6.1.unwrap_or_default(),
        inet_sport: need("inet_sock", "inet_sport")?,
        tcp_total_retrans: need("tcp_sock", "total_retrans")?,
        task_tgid: need("task_struct", "tgid")?,
        task_pid: need("task_struct", "pid")?,
        task_real_parent: need("task_struct", "real_parent")?,
        task_group_leader: need("task_struct", "group_leader")?,
        task_comm: need("task_struct", "comm")?,
        socket_sk: need("socket", "sk")?,
        sk_type: need("sock", "sk_type")?,
        sk_protocol: need("sock", "sk_protocol")?,
        sk_err: need("sock", "sk_err")?,
        sk_err_soft: need("sock", "sk_err_soft")?,
        sk_flags: need("sock_common", "skc_flags")?,
        skc_cookie: need("sock_common", "skc_cookie")?,
        tcp_bytes_acked: need("tcp_sock", "bytes_acked")?,
        tcp_bytes_received: need("tcp_sock", "bytes_received")?,
        tcp_srtt_us: need("tcp_sock", "srtt_us")?,
        tcp_rcv_nxt: need("tcp_sock", "rcv_nxt")?,
        tcp_copied_seq: need("tcp_sock", "copied_seq")?,
        tw_substate: need("inet_timewait_sock", "tw_substate")?,
        tw_expires: need("inet_timewait_sock", "tw_timer")? + need("timer_list", "expires")?,
        features: if v6.0.is_some() && v6.1.is_some() {
            KERNEL_HAS_IPV6
        } else {
            0
        },
        ..KernelOffsets::default()
    };
    // A retransmit's kind, timeout and attempt. `icsk_ca_state` is a 5-bit bitfield; it starts
    // a byte of its own on the kernels checked (6.1, 6.12, 6.18), else it is not found here.
    let icsk = |member: &str| btf.member_offset("inet_connection_sock", member);
    let request = |member: &str| btf.member_offset("request_sock", member);
    if let Some(((((rto, ca_state), retransmits), pending), backoff)) = icsk("icsk_rto")
        .zip(icsk("icsk_ca_state"))
        .zip(icsk("icsk_retransmits"))
        .zip(icsk("icsk_pending"))
        .zip(icsk("icsk_backoff"))
        && let Some((req_timeout, req_num_retrans)) = request("timeout").zip(request("num_retrans"))
    {
        offsets.icsk_rto = rto;
        offsets.icsk_ca_state = ca_state;
        offsets.icsk_retransmits = retransmits;
        offsets.icsk_pending = pending;
        offsets.icsk_backoff = backoff;
        offsets.req_timeout = req_timeout;
        offsets.req_num_retrans = req_num_retrans;
        offsets.features |= KERNEL_RETRANSMIT_DETAIL;
    }
    // Where a socket keeps its cgroup and its network namespace; a kernel without either
    // (CONFIG_SOCK_CGROUP_DATA, CONFIG_NET_NS) leaves those fields out of the lines.
    if cgroup_offsets(btf, &mut offsets).is_some() {
        offsets.features |= KERNEL_HAS_CGROUP;
    }
    // Without CONFIG_NET_NS, `possible_net_t` is empty: every socket is in the one namespace.
    if let Some(((skc_net, net), (ns, inum))) = btf
        .member_offset("sock_common", "skc_net")
        .zip(btf.member_offset("possible_net_t", "net"))
        .zip(
            btf.member_offset("net", "ns")
                .zip(btf.member_offset("ns_common", "inum")),
        )
    {
        offsets.skc_net = skc_net + net;
        offsets.net_inum = ns + inum;
        offsets.features |= KERNEL_HAS_NETNS;
        // The FIN timeout of a connection handed over in FIN_WAIT2 (`tcp_fin_time`).
        if let Some((linger2, (ipv4, fin_timeout))) = btf.member_offset("tcp_sock", "linger2").zip(
            btf.member_offset("net", "ipv4")
                .zip(btf.member_offset("netns_ipv4", "sysctl_tcp_fin_timeout")),
        ) && offsets.features & KERNEL_RETRANSMIT_DETAIL != 0
        {
            offsets.tcp_linger2 = linger2;
            offsets.net_fin_timeout = ipv4 + fin_timeout;
            offsets.features |= KERNEL_FIN_TIME;
        }
    }
    Ok(offsets)
}

/// The socket's cgroup (a pointer since 5.15, a tagged word in a union before) and the cgroup
/// and kernfs fields the filters read; None when a field is missing.
/// https://elixir.bootlin.com/linux/v5.15/source/include/linux/cgroup-defs.h (sock_cgroup_data)
fn cgroup_offsets(btf: &vmlinux::Btf, offsets: &mut KernelOffsets) -> Option<()> {
    let data = btf.member_offset("sock", "sk_cgrp_data")?;
    offsets.sk_cgroup = match btf.member_offset("sock_cgroup_data", "cgroup") {
        Some(field) => data + field,
        None => {
            offsets.features |= KERNEL_CGROUP_TAGGED;
            data + btf.member_offset("sock_cgroup_data", "val")?
        }
    };
    offsets.cgroup_kn = btf.member_offset("cgroup", "kn")?;
    offsets.cgroup_root = btf.member_offset("cgroup", "root")?;
    offsets.root_hierarchy_id = btf.member_offset("cgroup_root", "hierarchy_id")?;
    offsets.kernfs_id = btf.member_offset("kernfs_node", "id")?;
    // Renamed in 6.15, when it became RCU-protected.
    offsets.kernfs_parent = btf
        .member_offset("kernfs_node", "__parent")
        .or_else(|| btf.member_offset("kernfs_node", "parent"))?;
    offsets.kernfs_name = btf.member_offset("kernfs_node", "name")?;
    Some(())
}

fn attach(
    ebpf: &mut Ebpf,
    btf: &Btf,
    program: &str,
    tracepoint: &str,
) -> anyhow::Result<ProgramFd> {
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("the eBPF object has no program {program}"))?
        .try_into()?;
    prog.load(tracepoint, btf)
        .with_context(|| format!("the kernel refused the program for {tracepoint}"))?;
    prog.attach()
        .with_context(|| format!("failed to attach to {tracepoint}"))?;
    Ok(prog.fd()?.try_clone()?)
}
