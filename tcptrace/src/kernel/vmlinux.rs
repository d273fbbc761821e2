//! Just enough of a BTF reader to find struct member offsets and tracepoint prototypes in the
//! running kernel's `/sys/kernel/btf/vmlinux`, so BTF mode reads kernel structs at the offsets of
//! this kernel, never of the build machine's headers.
//! Format: <https://docs.kernel.org/bpf/btf.html>

use std::path::Path;

/// Why BTF could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("not BTF data (bad magic or header)")]
    BadHeader,
    #[error("BTF data is truncated or malformed at type {0}")]
    Malformed(u32),
}

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

/// One member of a struct or union.
#[derive(Clone, Copy, Debug)]
struct Member {
    name: u32,
    type_id: u32,
    /// Offset in bits.
    bit_offset: u32,
}

/// The type section, indexed but not decoded: each type is decoded when a lookup reaches it, so
/// reading the kernel's BTF costs little more memory than the file itself.
pub struct Btf {
    data: Vec<u8>,
    /// Byte offset in `data` of each type (index = type id; id 0, void, has none).
    types: Vec<u32>,
    strings: std::ops::Range<usize>,
}

/// One type's header fields.
struct Header {
    name: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    size_or_type: u32,
    /// Where the kind-specific data starts.
    rest: usize,
}

impl Btf {
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let read = |at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
        };
        if data.get(0..2) != Some(&MAGIC.to_le_bytes()[..]) {
            return Err(BtfError::BadHeader);
        }
        let (types_start, types_len, strings_start, strings_len) = (|| {
            let hdr_len = read(4)? as usize;
            Some((
                hdr_len + read(8)? as usize,
                read(12)? as usize,
                hdr_len + read(16)? as usize,
                read(20)? as usize,
            ))
        })()
        .ok_or(BtfError::BadHeader)?;
        let end = types_start + types_len;
        if data.len() < end || data.len() < strings_start + strings_len {
            return Err(BtfError::BadHeader);
        }
        let mut types = vec![0];
        let mut at = types_start;
        while at < end {
            let id = types.len() as u32;
            let info = read(at + 4).ok_or(BtfError::Malformed(id))?;
            if at + 12 > end {
                return Err(BtfError::Malformed(id));
            }
            types.push(at as u32);
            let vlen = (info & 0xffff) as usize;
            at += 12
                + match (info >> 24) & 0x1f {
                    KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                    KIND_ARRAY => 12,
                    KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                    KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                    // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG.
                    2 | 7..=12 | 16 | 18 => 0,
                    _ => return Err(BtfError::Malformed(id)),
                };
        }
        if at != end {
            return Err(BtfError::Malformed(types.len() as u32));
        }
        Ok(Self {
            data,
            types,
            strings: strings_start..strings_start + strings_len,
        })
    }

    fn u32_at(&self, at: usize) -> u32 {
        self.data
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    }

    fn header(&self, id: u32) -> Option<Header> {
        let at = *self.types.get(id as usize)? as usize;
        if id == 0 {
            return None;
        }
        let info = self.u32_at(at + 4);
        Some(Header {
            name: self.u32_at(at),
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            size_or_type: self.u32_at(at + 8),
            rest: at + 12,
        })
    }

    fn name(&self, offset: u32) -> &[u8] {
        let strings = self.data.get(self.strings.clone()).unwrap_or_default();
        let bytes = strings.get(offset as usize..).unwrap_or_default();
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        &bytes[..len]
    }

    /// Ids of the types named `name`.
    fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = u32> + 'a {
        (1..self.types.len() as u32).filter(move |&id| {
            self.header(id)
                .is_some_and(|h| h.name != 0 && self.name(h.name) == name.as_bytes())
        })
    }

    /// Members of a struct or union; None for other kinds.
    fn members(&self, id: u32) -> Option<Vec<Member>> {
        let h = self.header(id)?;
        if h.kind != KIND_STRUCT && h.kind != KIND_UNION {
            return None;
        }
        Some(
            (0..h.vlen)
                .map(|i| {
                    let at = h.rest + 12 * i;
                    let offset = self.u32_at(at + 8);
                    Member {
                        name: self.u32_at(at),
                        type_id: self.u32_at(at + 4),
                        // With kind_flag the top 8 bits hold a bitfield's size.
                        bit_offset: if h.kind_flag {
                            offset & 0xff_ffff
                        } else {
                            offset
                        },
                    }
                })
                .collect(),
        )
    }

    /// Follows typedefs (and nothing else).
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            match self.header(id) {
                Some(h) if h.kind == KIND_TYPEDEF => id = h.size_or_type,
                _ => break,
            }
        }
        id
    }

    /// Byte offset of `member` in struct (or typedef of a struct) `name`, looking inside anonymous
    /// structs and unions as C does. None when the struct or member does not exist or is a bitfield.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        // The first struct of that name with members (forward declarations have none).
        let members = self
            .named(name)
            .find_map(|id| self.members(self.resolve(id)).filter(|m| !m.is_empty()))?;
        let bits = self.find_member(&members, member, 0, 0)?;
        (bits % 8 == 0).then_some(bits / 8)
    }

    fn find_member(&self, members: &[Member], wanted: &str, base: u32, depth: u32) -> Option<u32> {
        for m in members {
            let name = self.name(m.name);
            if name == wanted.as_bytes() {
                return Some(base + m.bit_offset);
            }
            if name.is_empty()
                && depth < 8
                && let Some(inner) = self.members(self.resolve(m.type_id))
                && let Some(found) =
                    self.find_member(&inner, wanted, base + m.bit_offset, depth + 1)
            {
                return Some(found);
            }
        }
        None
    }

    /// The names and values of enum `name`'s enumerators (32-bit enums). None when the kernel has
    /// no such enum.
    pub fn enum_values(&self, name: &str) -> Option<Vec<(String, i64)>> {
        let header = self
            .named(name)
            .filter_map(|id| self.header(id))
            .find(|h| h.kind == KIND_ENUM)?;
        Some(
            (0..header.vlen)
                .map(|i| {
                    let at = header.rest + 8 * i;
                    let name = String::from_utf8_lossy(self.name(self.u32_at(at))).into_owned();
                    let raw = self.u32_at(at + 4);
                    // kind_flag: the enum is signed.
                    let value = if header.kind_flag {
                        i64::from(raw as i32)
                    } else {
                        i64::from(raw)
                    };
                    (name, value)
                })
                .collect(),
        )
    }

    /// Arguments of BTF-enabled tracepoint `name` (`btf_trace_<name>`, whose first parameter is
    /// the tracepoint's private data and not counted). None when the kernel has no such type.
    pub fn tracepoint_args(&self, name: &str) -> Option<usize> {
        let typedef = format!("btf_trace_{name}");
        self.named(&typedef).find_map(|id| {
            let ptr = self.header(self.resolve(id))?;
            if ptr.kind != KIND_PTR {
                return None;
            }
            let proto = self.header(ptr.size_or_type)?;
            (proto.kind == KIND_FUNC_PROTO).then(|| proto.vlen.checked_sub(1))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BTF blob: struct s { int a; union { int b; struct { int c; int d; }; }; } and the
    /// typedef btf_trace_t of a pointer to void (*)(void *, int).
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0c\0d\0btf_trace_t\0".to_vec();
        let name = |s: &str| {
            let needle = format!("\0{s}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .map(|p| p as u32 + 1)
                .expect("string")
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        let info = |kind: u32, vlen: u32| (kind << 24) | vlen;
        push(&[name("int"), info(KIND_INT, 0), 4, 32]); // 1: int
        push(&[
            0,
            info(KIND_STRUCT, 2),
            8,
            name("c"),
            1,
            0,
            name("d"),
            1,
            32,
        ]); // 2: anon struct
        push(&[0, info(KIND_UNION, 2), 8, name("b"), 1, 0, 0, 2, 0]); // 3: anon union
        push(&[
            name("s"),
            info(KIND_STRUCT, 2),
            12,
            name("a"),
            1,
            0,
            0,
            3,
            32,
        ]); // 4: s
        push(&[0, info(KIND_FUNC_PROTO, 2), 0, 0, 0, 0, 1]); // 5: proto
        push(&[0, info(KIND_PTR, 0), 5]); // 6: pointer to it
        push(&[name("btf_trace_t"), info(KIND_TYPEDEF, 0), 6]); // 7
        let mut data = Vec::new();
        data.extend_from_slice(&MAGIC.to_le_bytes());
        data.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            data.extend_from_slice(&w.to_le_bytes());
        }
        data.extend_from_slice(&types);
        data.extend_from_slice(&strings);
        data
    }

    #[test]
    fn finds_members_inside_anonymous_unions_and_structs() {
        let btf = Btf::parse(blob()).expect("parses");
        assert_eq!(btf.member_offset("s", "a"), Some(0));
        assert_eq!(btf.member_offset("s", "b"), Some(4));
        assert_eq!(btf.member_offset("s", "c"), Some(4));
        assert_eq!(btf.member_offset("s", "d"), Some(8));
        assert_eq!(btf.member_offset("s", "e"), None);
        assert_eq!(btf.member_offset("t", "a"), None);
    }

    #[test]
    fn counts_tracepoint_arguments_without_the_private_pointer() {
        let btf = Btf::parse(blob()).expect("parses");
        assert_eq!(btf.tracepoint_args("t"), Some(1));
        assert_eq!(btf.tracepoint_args("missing"), None);
    }

    #[test]
    fn refuses_garbage_and_truncation() {
        assert!(Btf::parse(b"nonsense".to_vec()).is_err());
        let data = blob();
        for len in [0, 10, 24, 40, data.len() - 1] {
            assert!(
                Btf::parse(data[..len].to_vec()).is_err(),
                "accepted {len} bytes"
            );
        }
    }

    #[test]
    fn reads_this_kernels_enums() {
        let btf = Btf::from_file(Path::new("/sys/kernel/btf/vmlinux")).expect("vmlinux BTF parses");
        let states = btf.enum_values("sock_flags").expect("enum sock_flags");
        assert!(states.contains(&("SOCK_DONE".to_string(), 1)), "{states:?}");
        assert!(btf.enum_values("no_such_enum_anywhere").is_none());
    }

    #[test]
    fn reads_this_kernels_socket_offsets() {
        // Every kernel this project builds and tests on has BTF (see the README).
        let path = Path::new("/sys/kernel/btf/vmlinux");
        let btf = Btf::from_file(path).expect("vmlinux BTF parses");
        // Stable for years (include/net/sock.h): the address pair leads struct sock_common.
        assert_eq!(btf.member_offset("sock_common", "skc_daddr"), Some(0));
        assert_eq!(btf.member_offset("sock_common", "skc_rcv_saddr"), Some(4));
        assert_eq!(btf.member_offset("sock_common", "skc_family"), Some(16));
        assert!(btf.member_offset("inet_sock", "inet_sport").is_some());
        assert!(btf.tracepoint_args("inet_sock_set_state") == Some(3));
    }
}
