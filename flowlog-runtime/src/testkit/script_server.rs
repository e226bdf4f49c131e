//! A test server that is a Python script of `scripts/` (the Kubernetes API
//! fixture, the S3 fault proxy): started with `--port 0`, it prints the port
//! the kernel gave it on its first line; its admin endpoints answer JSON.

use std::{
    io::{self, BufRead, BufReader},
    path::Path,
    process::{Child, ChildStdout, Command, Stdio},
};

use serde_json::Value;

/// A running script server, stopped on drop.
pub struct ScriptServer {
    child: Child,
    /// Held open: the script's stdout (it prints nothing after the port).
    _stdout: BufReader<ChildStdout>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl ScriptServer {
    /// Starts `python3 SCRIPT --port 0 ARGS...` and waits for its port;
    /// `what` names it in errors.
    pub fn start(script: &Path, args: &[&str], what: &str) -> io::Result<ScriptServer> {
        let mut child = Command::new("python3").arg(script).args(["--port", "0"]).args(args).stdout(Stdio::piped()).spawn()?;
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let Ok(port) = line.trim().parse::<u16>() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other(format!("{what} did not print its port: {line:?}")));
        };
        Ok(ScriptServer { child, _stdout: stdout, addr: format!("127.0.0.1:{port}") })
    }

    /// Calls an admin endpoint: its JSON answer, or an error unless 200.
    pub fn call(&self, method: &str, path: &str, body: &str) -> io::Result<Value> {
        let (code, text) = super::http(&self.addr, method, path, body)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if code != 200 {
            return Err(io::Error::other(format!("{method} {path}: {code} {v}")));
        }
        Ok(v)
    }
}

impl Drop for ScriptServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
