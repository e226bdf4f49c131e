//! A real S3 endpoint for tests: moto's S3 server (from `make setup`'s
//! venv) on 127.0.0.1, and `scripts/s3_fault_proxy.py` in front of it to
//! inject a remote store's failures (503 SlowDown, 500, slow answers,
//! connection resets, the endpoint down). See the script's docs for the
//! fault rules; wrapped below.

use std::{
    io,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use super::script_server::ScriptServer;

/// moto's server, relative to [`super::tools_dir`].
pub const MOTO_SERVER: &str = "venv-py-1/bin/moto_server";

/// The fault proxy script.
pub fn proxy_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/s3_fault_proxy.py")
}

/// moto's server on a free port, stopped on drop. Any bucket, any
/// credentials (signatures are not checked unless a test turns moto's auth on).
pub struct Moto {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Moto {
    /// Starts moto and waits until it accepts connections (about a second).
    pub fn start() -> io::Result<Moto> {
        let mut last = None;
        for _ in 0..5 {
            // The port may be taken between picking and binding: try another.
            let port = super::free_port();
            let mut child = Command::new(super::tool(MOTO_SERVER))
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let addr = format!("127.0.0.1:{port}");
            let t0 = Instant::now();
            loop {
                if std::net::TcpStream::connect(&addr).is_ok() {
                    return Ok(Moto { child, addr });
                }
                if let Some(st) = child.try_wait()? {
                    last = Some(io::Error::other(format!("moto_server exited: {st}")));
                    break;
                }
                if t0.elapsed() > Duration::from_secs(30) {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "moto_server did not listen within 30 s"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("moto_server did not start")))
    }

    /// The endpoint URL for a client (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fault proxy in front of an S3 endpoint, stopped on drop. Point the
/// client at [`S3FaultProxy::url`]; requests are forwarded unchanged until a
/// fault rule matches.
pub struct S3FaultProxy {
    server: ScriptServer,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl S3FaultProxy {
    /// Starts the proxy before `upstream` (`http://HOST:PORT`) and waits for its port.
    pub fn start(upstream: &str) -> io::Result<S3FaultProxy> {
        let server = ScriptServer::start(&proxy_script(), &["--upstream", upstream], "the S3 fault proxy")?;
        Ok(S3FaultProxy { addr: server.addr.clone(), server })
    }

    /// The endpoint URL for a client (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn call(&self, method: &str, path: &str, body: &str) -> io::Result<Value> {
        self.server.call(method, path, body)
    }

    /// Arms fault rules (one rule or a JSON list), e.g.
    /// `{"method": "PUT", "path": "/lake/", "status": 503, "count": 3}`,
    /// `{"delay_ms": 20000}`, `{"action": "reset", "after": true}`, `{"action": "down"}`.
    pub fn fault(&self, rules: &Value) -> io::Result<()> {
        self.call("POST", "/_fault", &rules.to_string()).map(drop)
    }

    /// Clears every rule and down mode.
    pub fn clear(&self) -> io::Result<()> {
        self.call("DELETE", "/_fault", "").map(drop)
    }

    /// `{"requests": {"PUT": n, ...}, "forwarded": n, "faults": {"error 503":
    /// n, "delay": n, "reset": n, "down": n}, "rules": [...], "down": bool}`.
    pub fn stats(&self) -> io::Result<Value> {
        self.call("GET", "/_stats", "")
    }

    /// How many faults of one kind were injected so far ("error 503", "down", ...).
    pub fn injected(&self, kind: &str) -> u64 {
        self.stats().ok().and_then(|s| s["faults"][kind].as_u64()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Through the proxy, moto answers S3 requests; an armed 503 comes back
    /// as S3's SlowDown error and is spent; down mode gives no answer until
    /// cleared. (Signed SDK requests: scripts/tests/test_s3_fault_proxy.py.)
    #[test]
    fn the_proxy_forwards_and_injects() {
        if !super::super::have_tools(&[MOTO_SERVER]) {
            return;
        }
        let moto = Moto::start().unwrap();
        let proxy = S3FaultProxy::start(&moto.url()).unwrap();
        // moto does not check signatures here, but an unsigned request is
        // anonymous (and may not read a private object): any SigV4 header.
        let auth = "AWS4-HMAC-SHA256 Credential=test/20261130/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0";
        let s3 = |method: &str, path: &str, body: &str| super::super::http_with(&proxy.addr, method, path, &[("Authorization", auth)], body);
        assert_eq!(s3("PUT", "/lake", "").unwrap().0, 200, "bucket created");
        assert_eq!(s3("PUT", "/lake/dt=2026-11-30/a", "abc").unwrap().0, 200);
        assert_eq!(s3("GET", "/lake/dt=2026-11-30/a", "").unwrap(), (200, "abc".to_string()));
        proxy.fault(&json!({"method": "PUT", "status": 503})).unwrap();
        let (code, body) = s3("PUT", "/lake/dt=2026-11-30/b", "x").unwrap();
        assert_eq!(code, 503);
        assert!(body.contains("<Code>SlowDown</Code>"), "{body}");
        assert_eq!(s3("PUT", "/lake/dt=2026-11-30/b", "x").unwrap().0, 200, "the rule is spent");
        proxy.fault(&json!({"action": "down"})).unwrap();
        assert!(s3("GET", "/lake/dt=2026-11-30/a", "").is_err(), "no answer while down");
        proxy.clear().unwrap();
        assert_eq!(s3("GET", "/lake/dt=2026-11-30/a", "").unwrap().0, 200);
        assert_eq!((proxy.injected("error 503"), proxy.injected("down")), (1, 1));
        assert!(proxy.fault(&json!({"action": "explode"})).is_err(), "a bad rule is refused");
    }
}
