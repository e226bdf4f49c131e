//! Reading the TOML settings file, with errors that name the setting.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{Flags, Setting};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// `key` is the setting the file got wrong (`kafka.linger_ms`, or the
    /// unknown key itself); empty when the file is not valid TOML.
    #[error("invalid config file {path}: {detail}")]
    Invalid { path: String, key: String, detail: String },
}

impl FileError {
    /// The setting an invalid file got wrong; `Some("")` for a TOML syntax
    /// error, `None` for an unreadable file.
    pub fn key(&self) -> Option<&str> {
        match self {
            FileError::Invalid { key, .. } => Some(key),
            FileError::Read { .. } => None,
        }
    }
}

/// A binary's settings in order of precedence: the defaults, then the file
/// (if one is given), then the environment and the flags.
pub fn load<C: Setting + Default + DeserializeOwned>(file: Option<&Path>, flags: &Flags<C>) -> Result<C, FileError> {
    let mut c = match file {
        Some(path) => read_file(path)?,
        None => C::default(),
    };
    flags.apply(&mut c);
    Ok(c)
}

/// A settings file in a fresh temporary directory, removed when dropped: for
/// tests that read a file the way a binary does.
pub struct TempFile {
    dir: std::path::PathBuf,
    pub path: std::path::PathBuf,
}

impl TempFile {
    /// `text` as `<tmp>/<name>-<pid>/c.toml`.
    pub fn new(name: &str, text: &str) -> TempFile {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let path = dir.join("c.toml");
        std::fs::write(&path, text).expect("a temporary file");
        TempFile { dir, path }
    }

    /// The path, as a command-line argument.
    pub fn arg(&self) -> &str {
        self.path.to_str().expect("a UTF-8 temporary path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads a settings file (a [`crate::settings!`] struct); keys it leaves out
/// keep their defaults.
pub fn read_file<C: DeserializeOwned>(path: &Path) -> Result<C, FileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| FileError::Read { path: path.display().to_string(), source })?;
    parse_toml(&text, path)
}

/// Parses settings from TOML text; `path` is only for the error.
pub fn parse_toml<C: DeserializeOwned>(text: &str, path: &Path) -> Result<C, FileError> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let path = path.display().to_string();
        // No key: a TOML syntax error, whose own text shows the line.
        if key == "." || inner.message().is_empty() {
            return FileError::Invalid { path, key: String::new(), detail: inner.to_string().trim_end().to_string() };
        }
        let line = inner.span().map(|s| text.bytes().take(s.start).filter(|&b| b == b'\n').count() + 1);
        let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
        let detail = format!("{key}{at}: {}", inner.message());
        FileError::Invalid { path, key, detail }
    })
}
