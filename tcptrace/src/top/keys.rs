//! The keys the view answers, read from the terminal itself. Not crossterm's event reader: on a
//! terminal that hung up (the ssh session closed) every read returns nothing at once, and that
//! reader retries for ever at 100% of a core. Here a hang-up ends the view.

use std::{
    fs::File,
    io::{IsTerminal as _, Read as _},
    os::fd::{AsRawFd as _, RawFd},
    time::Duration,
};

/// A key the view knows; anything else is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Char(char),
    Enter,
    Esc,
    Backspace,
    /// Ctrl-C: raw mode makes it a key, not SIGINT.
    Interrupt,
}

/// What a wait for keys found.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    Keys(Vec<Key>),
    Timeout,
    /// The terminal is gone.
    HungUp,
}

/// The terminal's input: stdin when it is the terminal, `/dev/tty` otherwise (as the view draws
/// on stdout).
pub struct Keys {
    tty: Option<File>,
    buffer: [u8; 256],
}

impl Keys {
    pub fn open() -> std::io::Result<Self> {
        let tty = if std::io::stdin().is_terminal() {
            None
        } else {
            Some(File::open("/dev/tty")?)
        };
        Ok(Self {
            tty,
            buffer: [0; 256],
        })
    }

    fn fd(&self) -> RawFd {
        self.tty.as_ref().map_or(0, File::as_raw_fd)
    }

    /// Waits up to `timeout` for keys.
    pub fn wait(&mut self, timeout: Duration) -> Input {
        let mut terminal = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one pollfd, on a descriptor this process holds open.
        let ready = unsafe { libc::poll(&mut terminal, 1, millis) };
        if ready == 0 {
            return Input::Timeout;
        }
        if ready < 0 {
            // EINTR (a signal): look again at the next wait.
            return Input::Timeout;
        }
        if terminal.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            return Input::HungUp;
        }
        let fd = self.fd();
        let read = match &mut self.tty {
            Some(tty) => tty.read(&mut self.buffer),
            None => {
                // SAFETY: reads into our buffer, at most its length, from stdin.
                let n =
                    unsafe { libc::read(fd, self.buffer.as_mut_ptr().cast(), self.buffer.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }
        };
        match read {
            // End of input: nobody is at the terminal any more.
            Ok(0) => Input::HungUp,
            Ok(n) => Input::Keys(parse(&self.buffer[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Input::Timeout,
            Err(_) => Input::HungUp,
        }
    }
}

/// The keys in what the terminal sent, in raw mode. Escape sequences (arrows, function keys)
/// are skipped; an escape alone is Esc.
pub fn parse(bytes: &[u8]) -> Vec<Key> {
    let mut keys = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            0x1b => match bytes.get(i + 1) {
                None => {
                    keys.push(Key::Esc);
                    i += 1;
                }
                // CSI: parameters up to a final byte in 0x40..=0x7e.
                Some(b'[') => {
                    i += 2;
                    while i < bytes.len() && !(0x40..=0x7e).contains(&bytes[i]) {
                        i += 1;
                    }
                    i += 1;
                }
                // SS3: one byte follows.
                Some(b'O') => i += 3,
                // Alt and a key, or two escapes: an escape, then the next from there.
                Some(_) => {
                    keys.push(Key::Esc);
                    i += 1;
                }
            },
            b'\r' | b'\n' => {
                keys.push(Key::Enter);
                i += 1;
            }
            0x7f | 0x08 => {
                keys.push(Key::Backspace);
                i += 1;
            }
            0x03 => {
                keys.push(Key::Interrupt);
                i += 1;
            }
            byte if byte < 0x20 => i += 1,
            _ => {
                // One character, UTF-8 encoded.
                let end = (i + 1..=bytes.len().min(i + 4))
                    .find(|&end| std::str::from_utf8(&bytes[i..end]).is_ok())
                    .unwrap_or(i + 1);
                if let Ok(text) = std::str::from_utf8(&bytes[i..end]) {
                    keys.extend(text.chars().map(Key::Char));
                }
                i = end;
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_in_raw_mode() {
        assert_eq!(
            parse(b"qs/80\r\x7f\x03"),
            [
                Key::Char('q'),
                Key::Char('s'),
                Key::Char('/'),
                Key::Char('8'),
                Key::Char('0'),
                Key::Enter,
                Key::Backspace,
                Key::Interrupt
            ]
        );
        assert_eq!(parse(b"\x1b"), [Key::Esc]);
        assert_eq!(parse("é".as_bytes()), [Key::Char('é')]);
    }

    #[test]
    fn escape_sequences_are_skipped() {
        // Up, F5 and an SS3 Home, then p.
        assert_eq!(parse(b"\x1b[A\x1b[15~\x1bOHp"), [Key::Char('p')]);
    }
}
