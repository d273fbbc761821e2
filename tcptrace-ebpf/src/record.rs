//! A tracepoint record copied once onto the stack, then read at offsets that are known only at
//! load time (from the tracefs `format` file).
//!
//! One `bpf_probe_read_kernel` of the record replaces a helper call per field. (Direct loads from
//! the context need constant offsets, and the kernel refuses to attach a program whose loads reach
//! past the tracepoint's record size, which differs across kernels.) Fields are then read from the
//! copy at a masked, so provably in-bounds, variable offset.
//! <https://elixir.bootlin.com/linux/v6.18/source/kernel/trace/bpf_trace.c> (perf_event_attach_bpf_prog)

use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_probe_read_kernel, programs::TracePointContext,
};
use tcptrace_common::{RECORD_START, RECORD_WINDOW, record_copy_len};

/// Words of the copied window, plus slack so that a 16-byte read at the highest masked offset
/// stays inside.
const WORDS: usize = RECORD_WINDOW / 8 + 2;

/// The copy. Deliberately not zeroed as a whole (that costs a byte loop on this target): the
/// helper writes the window, the slack is zeroed by hand, and only fields inside the record are
/// read.
pub struct Record {
    words: MaybeUninit<[u64; WORDS]>,
}

impl Record {
    #[inline(always)]
    pub const fn uninit() -> Self {
        Self {
            words: MaybeUninit::uninit(),
        }
    }

    /// Copies `size` bytes of the record from `RECORD_START` (the loader checked `size` against
    /// the window). Fills in place: a record returned by value would be copied on the stack.
    #[inline(always)]
    pub fn fill(&mut self, ctx: &TracePointContext, size: u16) -> Result<(), ()> {
        let words = self.words.as_mut_ptr().cast::<u64>();
        // The window's last byte and the slack: the verifier wants every byte a masked read may
        // touch initialised. Volatile, or LLVM merges these into a memset of the whole copy.
        // SAFETY: in bounds of `words`.
        unsafe {
            words.add(WORDS - 3).write_volatile(0);
            words.add(WORDS - 2).write_volatile(0);
            words.add(WORDS - 1).write_volatile(0);
        }
        let size = record_copy_len(size);
        // SAFETY: the destination holds at least `size` bytes; the helper checks the source.
        let rc = unsafe {
            bpf_probe_read_kernel(
                words.cast(),
                size,
                ctx.as_ptr().cast::<u8>().add(RECORD_START).cast(),
            )
        };
        if rc == 0 { Ok(()) } else { Err(()) }
    }

    /// The field at `offset` (from the record's start, as the format file gives it).
    #[inline(always)]
    pub fn get<T: Copy>(&self, offset: u16) -> T {
        let index = usize::from(offset).wrapping_sub(RECORD_START) & (RECORD_WINDOW - 1);
        // SAFETY: index < RECORD_WINDOW and size_of::<T>() <= 16 keep the read inside `words`;
        // every field read lies inside the part the helper wrote.
        unsafe {
            self.words
                .as_ptr()
                .cast::<u8>()
                .add(index)
                .cast::<T>()
                .read_unaligned()
        }
    }
}
