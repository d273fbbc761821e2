//! Just enough of a BTF reader to find struct member offsets and tracepoint prototypes in the
//! running kernel's `/sys/kernel/btf/vmlinux`, so BTF mode reads kernel structs at the offsets of
//! this kernel, never of the build machine's headers.
//! Format: <https://docs.kernel.org/bpf/btf.html>

use std::{collections::HashMap, path::Path};

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

#[derive(Clone, Debug)]
enum Type {
    Composite { members: Vec<Member> },
    Typedef { type_id: u32 },
    Ptr { type_id: u32 },
    FuncProto { params: usize },
    Other,
}

/// The parsed type section: types by id, names of the named ones.
pub struct Btf {
    types: Vec<Type>,
    names: Vec<u32>,
    strings: Vec<u8>,
    by_name: HashMap<String, Vec<u32>>,
}

impl Btf {
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u16_at = |at: usize| -> Option<u16> {
            Some(u16::from_le_bytes(data.get(at..at + 2)?.try_into().ok()?))
        };
        let u32_at = |at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
        };
        if u16_at(0) != Some(MAGIC) {
            return Err(BtfError::BadHeader);
        }
        let header = (|| {
            let hdr_len = u32_at(4)? as usize;
            let type_off = u32_at(8)? as usize;
            let type_len = u32_at(12)? as usize;
            let str_off = u32_at(16)? as usize;
            let str_len = u32_at(20)? as usize;
            Some((hdr_len + type_off, type_len, hdr_len + str_off, str_len))
        })()
        .ok_or(BtfError::BadHeader)?;
        let (types_start, types_len, strings_start, strings_len) = header;
        let strings = data
            .get(strings_start..strings_start + strings_len)
            .ok_or(BtfError::BadHeader)?
            .to_vec();
        let end = types_start + types_len;
        if data.len() < end {
            return Err(BtfError::BadHeader);
        }

        // Type id 0 is void.
        let mut types = vec![Type::Other];
        let mut names = vec![0];
        let mut at = types_start;
        while at < end {
            let id = types.len() as u32;
            let bad = || BtfError::Malformed(id);
            let name = u32_at(at).ok_or_else(bad)?;
            let info = u32_at(at + 4).ok_or_else(bad)?;
            let size_or_type = u32_at(at + 8).ok_or_else(bad)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let ty = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => {
                    at += 4;
                    Type::Other
                }
                KIND_ARRAY => {
                    at += 12;
                    Type::Other
                }
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for _ in 0..vlen {
                        let offset = u32_at(at + 8).ok_or_else(bad)?;
                        members.push(Member {
                            name: u32_at(at).ok_or_else(bad)?,
                            type_id: u32_at(at + 4).ok_or_else(bad)?,
                            // With kind_flag the top 8 bits hold a bitfield's size.
                            bit_offset: if kind_flag {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                        });
                        at += 12;
                    }
                    Type::Composite { members }
                }
                KIND_ENUM => {
                    at += 8 * vlen;
                    Type::Other
                }
                KIND_FUNC_PROTO => {
                    at += 8 * vlen;
                    Type::FuncProto { params: vlen }
                }
                KIND_DATASEC | KIND_ENUM64 => {
                    at += 12 * vlen;
                    Type::Other
                }
                KIND_TYPEDEF => Type::Typedef {
                    type_id: size_or_type,
                },
                KIND_PTR => Type::Ptr {
                    type_id: size_or_type,
                },
                // FWD, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG: nothing follows.
                7 | 9..=12 | 16 | 18 => Type::Other,
                _ => return Err(bad()),
            };
            types.push(ty);
            names.push(name);
        }
        if at != end {
            return Err(BtfError::Malformed(types.len() as u32));
        }
        let mut btf = Self {
            types,
            names,
            strings,
            by_name: HashMap::new(),
        };
        for id in 1..btf.types.len() as u32 {
            let name = btf.name(id);
            if !name.is_empty() {
                btf.by_name.entry(name.to_owned()).or_default().push(id);
            }
        }
        Ok(btf)
    }

    fn name(&self, id: u32) -> &str {
        let Some(&offset) = self.names.get(id as usize) else {
            return "";
        };
        let bytes = self.strings.get(offset as usize..).unwrap_or_default();
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..len]).unwrap_or_default()
    }

    /// The struct named `name` (the first one with members: forward declarations have none).
    fn composite(&self, name: &str) -> Option<&[Member]> {
        self.by_name
            .get(name)?
            .iter()
            .find_map(|&id| match &self.types[id as usize] {
                Type::Composite { members } if !members.is_empty() => Some(members.as_slice()),
                _ => None,
            })
    }

    /// Byte offset of `member` in struct `name`, looking inside anonymous structs and unions as C
    /// does. None when the struct or member does not exist or is a bitfield.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        let bits = self.find_member(self.composite(name)?, member, 0)?;
        (bits % 8 == 0).then_some(bits / 8)
    }

    fn find_member(&self, members: &[Member], wanted: &str, base: u32) -> Option<u32> {
        for m in members {
            let name = self.name_at(m.name);
            if name == wanted {
                return Some(base + m.bit_offset);
            }
            if name.is_empty()
                && let Type::Composite { members: inner } = self.resolve(m.type_id)
                && let Some(found) = self.find_member(inner, wanted, base + m.bit_offset)
            {
                return Some(found);
            }
        }
        None
    }

    fn name_at(&self, offset: u32) -> &str {
        let bytes = self.strings.get(offset as usize..).unwrap_or_default();
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..len]).unwrap_or_default()
    }

    /// Follows typedefs (and nothing else).
    fn resolve(&self, mut id: u32) -> &Type {
        for _ in 0..16 {
            match self.types.get(id as usize) {
                Some(Type::Typedef { type_id }) => id = *type_id,
                Some(ty) => return ty,
                None => break,
            }
        }
        &Type::Other
    }

    /// Arguments of BTF-enabled tracepoint `name` (`btf_trace_<name>`, whose first parameter is
    /// the tracepoint's private data and not counted). None when the kernel has no such type.
    pub fn tracepoint_args(&self, name: &str) -> Option<usize> {
        let ids = self.by_name.get(&format!("btf_trace_{name}"))?;
        ids.iter().find_map(|&id| match self.resolve(id) {
            Type::Ptr { type_id } => match self.types.get(*type_id as usize)? {
                Type::FuncProto { params } => params.checked_sub(1),
                _ => None,
            },
            _ => None,
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
        let btf = Btf::parse(&blob()).expect("parses");
        assert_eq!(btf.member_offset("s", "a"), Some(0));
        assert_eq!(btf.member_offset("s", "b"), Some(4));
        assert_eq!(btf.member_offset("s", "c"), Some(4));
        assert_eq!(btf.member_offset("s", "d"), Some(8));
        assert_eq!(btf.member_offset("s", "e"), None);
        assert_eq!(btf.member_offset("t", "a"), None);
    }

    #[test]
    fn counts_tracepoint_arguments_without_the_private_pointer() {
        let btf = Btf::parse(&blob()).expect("parses");
        assert_eq!(btf.tracepoint_args("t"), Some(1));
        assert_eq!(btf.tracepoint_args("missing"), None);
    }

    #[test]
    fn refuses_garbage_and_truncation() {
        assert!(Btf::parse(b"nonsense").is_err());
        let data = blob();
        for len in [0, 10, 24, 40, data.len() - 1] {
            assert!(Btf::parse(&data[..len]).is_err(), "accepted {len} bytes");
        }
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
