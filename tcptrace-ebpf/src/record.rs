//! A tracepoint record copied once onto the stack, then read at offsets that are known only at
//! load time (from the tracefs `format` file).
//!
//! One `bpf_probe_read_kernel` of the record replaces a helper call per field. (Direct loads from
//! the context need constant offsets, and the kernel refuses to attach a program whose loads reach
//! past the tracepoint's record size, which differs across kernels.) Fields are then read from the
//! copy at a masked, so provably in-bounds, variable offset.
//! <https://elixir.bootlin.com/linux/v6.18/source/kernel/trace/bpf_trace.c> (perf_event_attach_bpf_prog)

use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_probe_read_kernel, programs::TracePointContext,
};
use tcptrace_common::{RECORD_START, RECORD_WINDOW};

/// The copied window plus slack, so a 16-byte read at the highest masked offset stays inside.
#[repr(C, align(8))]
pub struct Record {
    bytes: [u8; RECORD_WINDOW + 16],
}

impl Record {
    /// Copies `size` bytes of the record from `RECORD_START` (the loader checked `size` against
    /// the window); the rest stays zero.
    #[inline(always)]
    pub fn copy(ctx: &TracePointContext, size: u16) -> Result<Self, ()> {
        let mut record = Self {
            bytes: [0; RECORD_WINDOW + 16],
        };
        let size = u32::from(size) & (RECORD_WINDOW as u32 - 1);
        // SAFETY: the destination holds at least `size` bytes; the helper checks the source.
        let rc = unsafe {
            bpf_probe_read_kernel(
                record.bytes.as_mut_ptr().cast(),
                size,
                ctx.as_ptr().cast::<u8>().add(RECORD_START).cast(),
            )
        };
        if rc == 0 { Ok(record) } else { Err(()) }
    }

    /// The field at `offset` (from the record's start, as the format file gives it).
    #[inline(always)]
    pub fn get<T: Copy>(&self, offset: u16) -> T {
        let index = usize::from(offset).wrapping_sub(RECORD_START) & (RECORD_WINDOW - 1);
        // SAFETY: index < RECORD_WINDOW and size_of::<T>() <= 16 keep the read inside `bytes`.
        unsafe { self.bytes.as_ptr().add(index).cast::<T>().read_unaligned() }
    }
}
