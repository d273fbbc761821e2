//! tcptrace's pipeline, one module per step: kernel (eBPF, with tracefs layouts or BTF offsets) -> tracer (ring
//! buffer) -> event (decode) -> output (formats). The binary wires them; the benchmark drives the
//! decode and format steps directly.

pub mod cgroup;
pub mod check;
pub mod cli;
pub mod congestion;
pub mod ending;
pub mod event;
pub mod fast_hash;
pub mod filter;
pub mod kernel;
pub mod listen_drops;
pub mod metrics;
pub mod metrics_endpoint;
pub mod output;
pub mod privileges;
pub mod process_names;
pub mod retransmit;
pub mod signals;
pub mod tick_rate;
pub mod timewait;
pub mod top;
pub mod tracefs;
pub mod tracer;
