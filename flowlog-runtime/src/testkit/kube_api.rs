//! The local Kubernetes API fixture (`scripts/kube_api_fixture.py`): the
//! API's real JSON (lists, gets, chunked watches with resourceVersions,
//! bookmarks and 410 Gone) on 127.0.0.1, for tests whose client is the real
//! one (kube-rs). No API server can be installed here; see the script's
//! docs for what it serves and its admin endpoints, wrapped below.

use std::{
    io,
    path::{Path, PathBuf},
};

use serde_json::Value;

use super::script_server::ScriptServer;

/// The fixture script.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kube_api_fixture.py")
}

/// A running fixture on a port the kernel picked, stopped on drop.
pub struct KubeApi {
    server: ScriptServer,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl KubeApi {
    /// Starts the fixture (bookmarks every half second, so watches move on
    /// quickly) and waits for its port.
    pub fn start() -> io::Result<KubeApi> {
        let server = ScriptServer::start(&script(), &["--bookmark-secs", "0.5"], "the Kubernetes API fixture")?;
        Ok(KubeApi { addr: server.addr.clone(), server })
    }

    /// The API server URL for a client (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn call(&self, method: &str, path: &str, body: &str) -> io::Result<Value> {
        self.server.call(method, path, body)
    }

    /// Creates or replaces objects (one, a JSON list, or `{"items": [...]}`):
    /// ADDED or MODIFIED watch events. Returns them as stored (uid,
    /// resourceVersion filled in).
    pub fn apply(&self, objects: &Value) -> io::Result<Vec<Value>> {
        let v = self.call("POST", "/admin/objects", &objects.to_string())?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }

    /// Deletes an object (`kind`: `Pod` or `pods`; `namespace` "" for a
    /// cluster-scoped one): a DELETED watch event.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> io::Result<()> {
        let path = if namespace.is_empty() {
            format!("/admin/objects/{kind}/{name}")
        } else {
            format!("/admin/objects/{kind}/{namespace}/{name}")
        };
        self.call("DELETE", &path, "").map(drop)
    }

    /// Forgets the event history and ends the open watches: their clients
    /// come back with an old resourceVersion and get 410 Gone.
    pub fn compact(&self) -> io::Result<()> {
        self.call("POST", "/admin/compact", "").map(drop)
    }

    /// Sets the fault mode: "ok", "down", "unavailable", "slow" (each answer
    /// `delay_secs` late) or "garbage".
    pub fn fault(&self, mode: &str, delay_secs: f64) -> io::Result<()> {
        let body = serde_json::json!({"mode": mode, "delay_secs": delay_secs});
        self.call("POST", "/admin/fault", &body.to_string()).map(drop)
    }

    /// resourceVersion, open watches and request counts (`requests["list
    /// pods"]`, `requests["watch pods"]`, ...), for waiting on the client.
    pub fn state(&self) -> io::Result<Value> {
        self.call("GET", "/admin/state", "")
    }

    /// How many requests of one kind were served so far ("list pods", ...).
    pub fn requests(&self, what: &str) -> u64 {
        self.state().ok().and_then(|s| s["requests"][what].as_u64()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The fixture answers as the API does: lists with a resourceVersion and
    /// selectors, gets, 404 and 410 Statuses, faults; and its admin changes.
    #[test]
    fn the_fixture_serves_the_api_shapes() {
        let api = KubeApi::start().expect("python3 and the fixture");
        let pod = |name: &str, node: &str| json!({"kind": "Pod", "metadata": {"name": name, "namespace": "ns", "labels": {"app": name}}, "spec": {"nodeName": node}});
        let stored = api.apply(&json!([pod("a", "n1"), pod("b", "n2")])).unwrap();
        assert_eq!(stored[1]["metadata"]["resourceVersion"], "2");
        assert!(stored[0]["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36));
        let get = |path: &str| super::super::http(&api.addr, "GET", path, "").unwrap();
        let (code, body) = get("/api/v1/pods?fieldSelector=spec.nodeName%3Dn1");
        let list: Value = serde_json::from_str(&body).unwrap();
        assert_eq!((code, list["kind"].as_str(), list["metadata"]["resourceVersion"].as_str()), (200, Some("PodList"), Some("2")));
        assert_eq!(list["items"].as_array().unwrap().len(), 1);
        assert_eq!(list["items"][0]["kind"], Value::Null, "list items carry no kind, as the API's");
        let (_, body) = get("/api/v1/namespaces/ns/pods?labelSelector=app%20in%20(b,c)");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["items"][0]["metadata"]["name"], "b");
        let (code, body) = get("/api/v1/namespaces/ns/pods/zz");
        assert_eq!((code, serde_json::from_str::<Value>(&body).unwrap()["reason"].as_str()), (404, Some("NotFound")));
        // A watch from before the compacted history: one ERROR event, 410.
        api.compact().unwrap();
        let (code, body) = get("/api/v1/pods?watch=true&resourceVersion=1");
        let event: Value = serde_json::from_str(body.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
        assert_eq!((code, event["type"].as_str(), event["object"]["code"].as_u64()), (200, Some("ERROR"), Some(410)));
        api.delete("Pod", "ns", "a").unwrap();
        assert!(api.delete("Pod", "ns", "a").is_err());
        api.fault("unavailable", 0.0).unwrap();
        assert_eq!(get("/api/v1/pods").0, 503);
        api.fault("garbage", 0.0).unwrap();
        assert!(serde_json::from_str::<Value>(&get("/api/v1/pods").1).is_err());
        api.fault("ok", 0.0).unwrap();
        assert_eq!(api.requests("list pods"), 2, "faulted requests are not served");
        assert_eq!(api.state().unwrap()["objects"], 1);
    }
}
