//! Finding tracefs (mounting it when needed) and reading tracepoint layouts from their `format`
//! files, so the eBPF program learns the running kernel's field offsets instead of guessing them.

use std::{
    ffi::CString,
    io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use tcptrace_common::{FIELD_ABSENT, RECORD_START, RECORD_WINDOW, RetransmitLayout, StateLayout};

/// Where tracefs is mounted on current systems, and where aya looks for it first.
const TRACEFS: &str = "/sys/kernel/tracing";
/// The older location, under debugfs.
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// Where tracefs stands on this host, before tcptrace touches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// Mounted and readable here.
    Mounted(PathBuf),
    /// Mounted here, but not ours to read (tracefs is root's, mode 0700).
    Unreadable(PathBuf, String),
    /// Something is mounted where tracefs belongs, and it has no `events` directory.
    NotTracefs(PathBuf),
    /// Mounted nowhere tcptrace looks: [`ensure_mounted`] mounts it at `/sys/kernel/tracing`.
    Unmounted,
}

/// Looks for tracefs where current and older systems mount it, without changing anything.
pub fn find() -> Found {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for candidate in [TRACEFS, DEBUGFS_TRACING] {
        match std::fs::read_dir(Path::new(candidate).join("events")) {
            Ok(_) => return Found::Mounted(PathBuf::from(candidate)),
            Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
                return Found::Unreadable(PathBuf::from(candidate), err.to_string());
            }
            Err(_) if is_mount_point(&mounts, candidate) => {
                return Found::NotTracefs(PathBuf::from(candidate));
            }
            Err(_) => {}
        }
    }
    Found::Unmounted
}

/// Where [`ensure_mounted`] mounts tracefs when it is mounted nowhere.
pub const MOUNT_POINT: &str = TRACEFS;

/// Returns the tracefs mount point, mounting tracefs at `/sys/kernel/tracing` when it is nowhere
/// to be found. Must run before the first attach: aya remembers the path it finds.
pub fn ensure_mounted() -> anyhow::Result<PathBuf> {
    match find() {
        Found::Mounted(path) => return Ok(path),
        Found::Unreadable(path, err) => bail!(
            "cannot read tracefs at {} ({err}): run as root, or with \
             CAP_DAC_READ_SEARCH besides CAP_BPF and CAP_PERFMON",
            path.display()
        ),
        Found::NotTracefs(path) => bail!(
            "tracefs at {} has no events directory: is it really tracefs?",
            path.display()
        ),
        Found::Unmounted => {}
    }
    let target = CString::new(TRACEFS).context("tracefs path holds a NUL byte")?;
    let fstype = c"tracefs";
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        bail!(
            "tracefs is not mounted and mounting it at {TRACEFS} failed ({err}); \
             mount it with `mount -t tracefs tracefs {TRACEFS}` as root"
        );
    }
    Ok(PathBuf::from(TRACEFS))
}

/// Whether `/proc/self/mounts` lists something mounted at `path`.
fn is_mount_point(mounts: &str, path: &str) -> bool {
    mounts
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some(path))
}

/// Reads `events/<category>/<name>/format` under `tracefs`.
pub fn read_format(tracefs: &Path, category: &str, name: &str) -> anyhow::Result<Format> {
    let path = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = std::fs::read_to_string(&path).map_err(|err| {
        if err.kind() == io::ErrorKind::NotFound {
            anyhow::anyhow!(
                "this kernel has no tracepoint {category}:{name} ({} is missing)",
                path.display()
            )
        } else {
            anyhow::Error::new(err).context(format!("failed to read {}", path.display()))
        }
    })?;
    Format::parse(&text).with_context(|| format!("failed to parse {}", path.display()))
}

const STATE_FIELDS: [&str; 11] = [
    "skaddr", "oldstate", "newstate", "sport", "dport", "family", "protocol", "saddr", "daddr",
    "saddr_v6", "daddr_v6",
];
const RETRANSMIT_FIELDS: [&str; 10] = [
    "skaddr", "sport", "dport", "saddr", "daddr", "saddr_v6", "daddr_v6", "state", "family", "err",
];

/// One field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: usize,
    pub size: usize,
}

/// The fields of a tracepoint record, as its `format` file lists them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Format {
    pub fields: Vec<Field>,
}

/// What can be wrong with a format file or the layout it describes.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("line {line}: malformed field description")]
    Malformed { line: usize },
    #[error("the format lists no fields")]
    NoFields,
    #[error("required field `{0}` is missing")]
    MissingField(&'static str),
    #[error("field `{name}` is {size} bytes, expected {expected}")]
    WrongSize {
        name: &'static str,
        size: usize,
        expected: &'static str,
    },
    #[error("field `{0}` lies outside the first {end} bytes of the record, which is all tcptrace reads", end = RECORD_START + RECORD_WINDOW)]
    OutOfWindow(&'static str),
}

impl Format {
    /// Parses the text of a tracefs `format` file.
    pub fn parse(text: &str) -> Result<Self, FormatError> {
        let mut fields = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            let Some(rest) = line.strip_prefix("field:") else {
                continue;
            };
            let malformed = FormatError::Malformed { line: index + 1 };
            let mut parts = rest.split(';').map(str::trim);
            let decl = parts.next().ok_or(malformed.clone())?;
            let mut offset = None;
            let mut size = None;
            for part in parts {
                if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.parse().ok();
                }
            }
            let (Some(offset), Some(size)) = (offset, size) else {
                return Err(malformed);
            };
            // "const void * skaddr" or "__u8 saddr[4]": the name is the last word, less any array suffix.
            let name = decl.rsplit([' ', '*']).next().unwrap_or_default();
            let name = name.split('[').next().unwrap_or_default();
            if name.is_empty() {
                return Err(malformed);
            }
            fields.push(Field {
                name: name.to_owned(),
                offset,
                size,
            });
        }
        if fields.is_empty() {
            return Err(FormatError::NoFields);
        }
        Ok(Self { fields })
    }

    /// The fields tcptrace reads, as `name@offset:size`, in the record's order.
    pub fn summary(&self) -> String {
        self.fields
            .iter()
            .filter(|f| {
                STATE_FIELDS.contains(&f.name.as_str())
                    || RETRANSMIT_FIELDS.contains(&f.name.as_str())
            })
            .map(|f| format!("{}@{}:{}", f.name, f.offset, f.size))
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|field| field.name == name)
    }

    fn offset(
        &self,
        name: &'static str,
        sizes: &'static [usize],
        expected: &'static str,
    ) -> Result<u16, FormatError> {
        self.optional(name, sizes, expected)?
            .ok_or(FormatError::MissingField(name))
    }

    fn optional(
        &self,
        name: &'static str,
        sizes: &'static [usize],
        expected: &'static str,
    ) -> Result<Option<u16>, FormatError> {
        let Some(field) = self.field(name) else {
            return Ok(None);
        };
        if !sizes.contains(&field.size) {
            return Err(FormatError::WrongSize {
                name,
                size: field.size,
                expected,
            });
        }
        // The eBPF side reads a window of the record; a field outside it cannot be read.
        if field.offset < RECORD_START || field.offset + field.size > RECORD_START + RECORD_WINDOW {
            return Err(FormatError::OutOfWindow(name));
        }
        Ok(Some(field.offset as u16))
    }

    /// Bytes from `RECORD_START` to the end of the last of `names` this format has.
    fn record_size(&self, names: &[&str]) -> u16 {
        let end = names
            .iter()
            .filter_map(|name| self.field(name))
            .map(|field| field.offset + field.size)
            .max()
            .unwrap_or(RECORD_START);
        // In range: every field used was checked against the window.
        (end.saturating_sub(RECORD_START)) as u16
    }

    /// The layout of `sock:inet_sock_set_state`.
    pub fn state_layout(&self) -> Result<StateLayout, FormatError> {
        let protocol = self.offset("protocol", &[1, 2], "1 or 2")?;
        Ok(StateLayout {
            skaddr: self.offset("skaddr", &[8], "8")?,
            oldstate: self.offset("oldstate", &[4], "4")?,
            newstate: self.offset("newstate", &[4], "4")?,
            sport: self.offset("sport", &[2], "2")?,
            dport: self.offset("dport", &[2], "2")?,
            family: self.offset("family", &[2], "2")?,
            protocol,
            protocol_size: self.field("protocol").map_or(2, |field| field.size as u16),
            saddr: self.offset("saddr", &[4], "4")?,
            daddr: self.offset("daddr", &[4], "4")?,
            saddr_v6: self.offset("saddr_v6", &[16], "16")?,
            daddr_v6: self.offset("daddr_v6", &[16], "16")?,
            record_size: self.record_size(&STATE_FIELDS),
            _pad: 0,
        })
    }

    /// The layout of `tcp:tcp_retransmit_skb` or `tcp:tcp_retransmit_synack`. Fields that older
    /// kernels lack (`state`, `family`, `err`) are [`FIELD_ABSENT`] there.
    pub fn retransmit_layout(&self) -> Result<RetransmitLayout, FormatError> {
        let optional = |name, sizes, expected| {
            self.optional(name, sizes, expected)
                .map(|offset| offset.unwrap_or(FIELD_ABSENT))
        };
        Ok(RetransmitLayout {
            skaddr: self.offset("skaddr", &[8], "8")?,
            sport: self.offset("sport", &[2], "2")?,
            dport: self.offset("dport", &[2], "2")?,
            saddr: self.offset("saddr", &[4], "4")?,
            daddr: self.offset("daddr", &[4], "4")?,
            saddr_v6: self.offset("saddr_v6", &[16], "16")?,
            daddr_v6: self.offset("daddr_v6", &[16], "16")?,
            state: optional("state", &[4], "4")?,
            family: optional("family", &[2], "2")?,
            err: optional("err", &[4], "4")?,
            record_size: self.record_size(&RETRANSMIT_FIELDS),
            _pad: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use tcptrace_common::record_copy_len;

    use super::*;

    /// A field ending at the window's last byte (136) is accepted, and the eBPF side copies the
    /// whole 128-byte record (a mask of the size once turned 128 into 0).
    #[test]
    fn a_field_ending_at_the_windows_edge_is_copied() {
        let text = "\tfield:void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
            \tfield:__u16 sport;\toffset:16;\tsize:2;\tsigned:0;\n\
            \tfield:__u16 dport;\toffset:18;\tsize:2;\tsigned:0;\n\
            \tfield:__u8 saddr[4];\toffset:20;\tsize:4;\tsigned:0;\n\
            \tfield:__u8 daddr[4];\toffset:24;\tsize:4;\tsigned:0;\n\
            \tfield:__u8 saddr_v6[16];\toffset:28;\tsize:16;\tsigned:0;\n\
            \tfield:__u8 daddr_v6[16];\toffset:44;\tsize:16;\tsigned:0;\n\
            \tfield:int err;\toffset:132;\tsize:4;\tsigned:1;\n";
        let layout = Format::parse(text)
            .expect("parses")
            .retransmit_layout()
            .expect("a valid layout");
        assert_eq!(layout.record_size, 128);
        assert_eq!(record_copy_len(layout.record_size), 128);
    }

    fn fixture(name: &str) -> Format {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Format::parse(&text).unwrap()
    }

    #[test]
    fn parses_this_kernels_inet_sock_set_state() {
        let layout = fixture("inet_sock_set_state-6.18.format")
            .state_layout()
            .unwrap();
        assert_eq!(
            layout,
            StateLayout {
                skaddr: 8,
                oldstate: 16,
                newstate: 20,
                sport: 24,
                dport: 26,
                family: 28,
                protocol: 30,
                protocol_size: 2,
                saddr: 32,
                daddr: 36,
                saddr_v6: 40,
                daddr_v6: 56,
                record_size: 64,
                _pad: 0,
            }
        );
    }

    #[test]
    fn parses_u8_protocol_of_kernels_before_5_6() {
        let layout = fixture("inet_sock_set_state-5.4.format")
            .state_layout()
            .unwrap();
        assert_eq!((layout.protocol, layout.protocol_size), (30, 1));
        assert_eq!((layout.saddr, layout.daddr_v6), (31, 55));
    }

    #[test]
    fn retransmit_layouts_across_kernels() {
        let now = fixture("tcp_retransmit_skb-6.18.format")
            .retransmit_layout()
            .unwrap();
        assert_eq!(
            (
                now.skaddr, now.state, now.sport, now.family, now.saddr, now.err
            ),
            (16, 24, 28, 32, 34, 76)
        );
        let v6_1 = fixture("tcp_retransmit_skb-6.1.format")
            .retransmit_layout()
            .unwrap();
        assert_eq!((v6_1.family, v6_1.err), (32, FIELD_ABSENT));
        let v5_10 = fixture("tcp_retransmit_skb-5.10.format")
            .retransmit_layout()
            .unwrap();
        assert_eq!(
            (v5_10.state, v5_10.family, v5_10.err),
            (24, FIELD_ABSENT, FIELD_ABSENT)
        );
        let v4_19 = fixture("tcp_retransmit_skb-4.19.format")
            .retransmit_layout()
            .unwrap();
        assert_eq!(
            (v4_19.state, v4_19.family, v4_19.sport, v4_19.saddr_v6),
            (FIELD_ABSENT, FIELD_ABSENT, 24, 36)
        );
        let synack = fixture("tcp_retransmit_synack-6.18.format")
            .retransmit_layout()
            .unwrap();
        assert_eq!(
            (synack.skaddr, synack.sport, synack.family, synack.state),
            (8, 24, 28, FIELD_ABSENT)
        );
    }

    #[test]
    fn a_missing_required_field_is_named() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/inet_sock_set_state-6.18.format"),
        )
        .unwrap();
        let without: String = text
            .lines()
            .filter(|l| !l.contains(" newstate;"))
            .map(|l| format!("{l}\n"))
            .collect();
        let err = Format::parse(&without).unwrap().state_layout().unwrap_err();
        assert_eq!(err, FormatError::MissingField("newstate"));
        assert_eq!(err.to_string(), "required field `newstate` is missing");
    }

    #[test]
    fn wrong_sizes_and_garbage_are_refused() {
        let text = "format:\n\tfield:int skaddr;\toffset:8;\tsize:4;\tsigned:1;\n";
        assert!(matches!(
            Format::parse(text).unwrap().retransmit_layout(),
            Err(FormatError::WrongSize { name: "skaddr", .. })
        ));
        assert_eq!(
            Format::parse("name: x\nformat:\n"),
            Err(FormatError::NoFields)
        );
        assert_eq!(
            Format::parse("\tfield:int x;\toffset:zz;\tsize:4;\n"),
            Err(FormatError::Malformed { line: 1 })
        );
        assert_eq!(
            Format::parse("\tfield:;\toffset:1;\tsize:4;\n"),
            Err(FormatError::Malformed { line: 1 })
        );
        let far = "\tfield:const void * skaddr;\toffset:99999;\tsize:8;\n";
        assert_eq!(
            Format::parse(far).unwrap().retransmit_layout(),
            Err(FormatError::OutOfWindow("skaddr"))
        );
        let header = "\tfield:const void * skaddr;\toffset:4;\tsize:8;\n";
        assert_eq!(
            Format::parse(header).unwrap().retransmit_layout(),
            Err(FormatError::OutOfWindow("skaddr"))
        );
    }

    #[test]
    fn record_sizes_cover_the_last_field_used() {
        let size = |name| fixture(name).retransmit_layout().unwrap().record_size;
        assert_eq!(size("tcp_retransmit_skb-6.18.format"), 80 - 8);
        assert_eq!(size("tcp_retransmit_skb-6.1.format"), 74 - 8);
        assert_eq!(size("tcp_retransmit_skb-4.19.format"), 68 - 8);
        assert_eq!(size("tcp_retransmit_synack-6.18.format"), 70 - 8);
        let state = fixture("inet_sock_set_state-5.4.format")
            .state_layout()
            .unwrap();
        assert_eq!(state.record_size, 71 - 8);
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

            /// Any text: parsed or refused, never a panic; a layout from it is in the window.
            #[test]
            fn parse_takes_any_text(text in "\\PC*") {
                if let Ok(format) = Format::parse(&text) {
                    let _ = format.state_layout();
                    let _ = format.retransmit_layout();
                }
            }

            /// Field lines with any names, offsets and sizes: layouts built from them keep every
            /// field inside the window the eBPF side reads.
            #[test]
            fn layouts_stay_in_the_window(fields in proptest::collection::vec(
                (prop::sample::select(vec!["skaddr", "oldstate", "newstate", "sport", "dport", "family", "protocol",
                    "saddr", "daddr", "saddr_v6", "daddr_v6", "state", "err", "other"]),
                 0usize..100_000, prop::sample::select(vec![0usize, 1, 2, 4, 8, 16, 99])),
                0..20,
            )) {
                let text: String = fields
                    .iter()
                    .map(|(name, offset, size)| format!("\tfield:int {name};\toffset:{offset};\tsize:{size};\tsigned:0;\n"))
                    .collect();
                if let Ok(format) = Format::parse(&text) {
                    if let Ok(layout) = format.retransmit_layout() {
                        prop_assert!(usize::from(layout.record_size) <= RECORD_WINDOW);
                        // The eBPF side copies the whole record, also one ending at the window's edge.
                        prop_assert_eq!(record_copy_len(layout.record_size), u32::from(layout.record_size));
                        for offset in [layout.skaddr, layout.sport, layout.dport, layout.saddr, layout.daddr, layout.saddr_v6, layout.daddr_v6] {
                            prop_assert!(usize::from(offset) >= RECORD_START);
                        }
                    }
                    if let Ok(layout) = format.state_layout() {
                        prop_assert!(usize::from(layout.record_size) <= RECORD_WINDOW);
                        prop_assert_eq!(record_copy_len(layout.record_size), u32::from(layout.record_size));
                    }
                }
            }
        }
    }
}
