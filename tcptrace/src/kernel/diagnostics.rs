//! The kernel side's own diagnostics (aya-log): a socket whose storage could not be created, a
//! tracepoint record that could not be read. Off unless asked for: the level is a load-time
//! constant, so with logging off the verifier removes the logging code from the programs.

use aya::Ebpf;
use aya_log::EbpfLogger;

/// Writes kernel-side records to stderr, one line each.
pub struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        eprintln!(
            "tcptrace: kernel {}: {}",
            record.level().as_str().to_ascii_lowercase(),
            record.args()
        );
    }

    fn flush(&self) {}
}

/// The aya-log level the programs are loaded with: 0 (off), or from `RUST_LOG` (`error`, `warn`,
/// `info`, `debug`, `trace`; any other value means debug), or debug with `--debug`.
pub fn level(debug: bool) -> u8 {
    let from_env = std::env::var("RUST_LOG").ok().map(|value| {
        match value.trim().to_ascii_lowercase().as_str() {
            "off" | "" => 0,
            "error" => aya_log::Level::Error as u8,
            "warn" => aya_log::Level::Warn as u8,
            "info" => aya_log::Level::Info as u8,
            "trace" => aya_log::Level::Trace as u8,
            _ => aya_log::Level::Debug as u8,
        }
    });
    match (debug, from_env) {
        (true, env) => env.unwrap_or(0).max(aya_log::Level::Debug as u8),
        (false, env) => env.unwrap_or(0),
    }
}

/// The reader of the programs' log records, when logging is on.
pub fn reader(ebpf: &mut Ebpf, level: u8) -> anyhow::Result<Option<EbpfLogger<StderrLogger>>> {
    if level == 0 {
        return Ok(None);
    }
    Ok(Some(
        EbpfLogger::init_with_logger(ebpf, StderrLogger)
            .map_err(|e| anyhow::anyhow!("failed to read the kernel side's log: {e}"))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_unless_asked_for() {
        // The test process's own RUST_LOG would decide; only --debug is checked here.
        assert!(level(true) >= aya_log::Level::Debug as u8);
    }
}
