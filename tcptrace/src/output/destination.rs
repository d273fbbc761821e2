//! Where lines go: stdout, or a file opened for appending that SIGHUP reopens (logrotate's
//! rename-then-signal).

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

pub enum Destination {
    Stdout(io::Stdout),
    File { path: PathBuf, file: File },
}

impl Destination {
    pub fn stdout() -> Self {
        Self::Stdout(io::stdout())
    }

    /// Opens `path` for appending, creating it with mode 0640.
    pub fn file(path: &Path) -> anyhow::Result<Self> {
        Ok(Self::File {
            path: path.to_owned(),
            file: open(path)?,
        })
    }

    /// Reopens the file by name; a no-op for stdout.
    pub fn reopen(&mut self) -> anyhow::Result<()> {
        if let Self::File { path, file } = self {
            *file = open(path)?;
        }
        Ok(())
    }

    /// Whether this destination was just created and is empty (a header belongs first).
    pub fn is_empty_file(&self) -> bool {
        match self {
            Self::Stdout(_) => true,
            Self::File { file, .. } => file.metadata().is_ok_and(|m| m.len() == 0),
        }
    }

    /// Writes whole lines.
    pub fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Self::Stdout(stdout) => {
                let mut lock = stdout.lock();
                lock.write_all(buf).and_then(|()| lock.flush())
            }
            Self::File { file, .. } => file.write_all(buf),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Stdout(_) => "stdout".to_owned(),
            Self::File { path, .. } => path.display().to_string(),
        }
    }
}

fn open(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
        .with_context(|| format!("failed to open {} for appending", path.display()))
}
