//! The object store the lake is written to, through the Apache Arrow
//! project's `object_store` crate: a local directory (fsync'd, written to a
//! temporary name and renamed) or S3 and S3-compatible stores (the standard
//! AWS credential chain, an endpoint override, multipart upload for large
//! objects, retries with backoff). A small blocking facade over its async
//! API: the enricher's consumer loop is synchronous, and each call here
//! must be complete (durable, or failed) before an offset is committed.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::TryStreamExt as _;
use object_store::{
    aws::AmazonS3Builder, buffered::BufWriter, local::LocalFileSystem, path::Path, BackoffConfig,
    ClientOptions, ObjectStore, ObjectStoreExt as _, PutMode, PutOptions, PutPayload, RetryConfig,
};
use tokio::io::AsyncWriteExt as _;

use crate::config::S3Settings;

/// Objects at least this large are uploaded in parts (S3 multipart upload).
const PART_SIZE: usize = 8 * 1024 * 1024;

/// One object of a listing.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The key below the store's root.
    pub key: String,
    pub age: Duration,
}

pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// Keys are below this (the URL's path for S3; empty for a directory).
    root: Path,
    rt: tokio::runtime::Runtime,
    /// What the store is, for messages (`s3://bucket/prefix`, a directory).
    pub url: String,
}

impl Store {
    /// `output` is `s3://bucket[/prefix]` or a local directory (a path or
    /// `file:///path`).
    pub fn open(output: &str, s3: &S3Settings) -> anyhow::Result<Store> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (inner, root): (Arc<dyn ObjectStore>, Path) =
            if let Some(rest) = output.strip_prefix("s3://") {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                anyhow::ensure!(!bucket.is_empty(), "output {output:?}: no bucket name");
                (Arc::new(s3_store(bucket, s3)?), Path::from(prefix))
            } else {
                let dir = output.strip_prefix("file://").unwrap_or(output);
                anyhow::ensure!(
                    !dir.contains("://"),
                    "output {output:?}: only s3:// URLs and local directories are supported"
                );
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("output directory {dir}"))?;
                let local = LocalFileSystem::new_with_prefix(dir)?.with_fsync(true);
                (Arc::new(local), Path::default())
            };
        Ok(Store {
            inner,
            root,
            rt,
            url: output.to_string(),
        })
    }

    fn path(&self, key: &str) -> Path {
        let mut p = self.root.clone();
        for part in key.split('/').filter(|s| !s.is_empty()) {
            p = p.clone().join(part);
        }
        p
    }

    /// Writes `bytes` under `key`, replacing what is there: readers see the
    /// old object or the new one, never a part.
    pub fn put(&self, key: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        let path = self.path(key);
        let what = || format!("writing {key} to {}", self.url);
        self.rt
            .block_on(async {
                if bytes.len() < PART_SIZE {
                    self.inner.put(&path, PutPayload::from(bytes)).await?;
                    return Ok(());
                }
                // Large: parts uploaded as they fill, completed at shutdown.
                let mut w = BufWriter::with_capacity(self.inner.clone(), path, PART_SIZE);
                w.write_all(&bytes).await?;
                w.shutdown().await?;
                anyhow::Ok(())
            })
            .with_context(what)
    }

    /// Creates `key` only if it does not exist; false if it already did.
    pub fn create(&self, key: &str, bytes: Vec<u8>) -> anyhow::Result<bool> {
        let path = self.path(key);
        let opts = PutOptions::from(PutMode::Create);
        match self
            .rt
            .block_on(self.inner.put_opts(&path, PutPayload::from(bytes), opts))
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("creating {key} in {}", self.url)),
        }
    }

    /// The object under `key`, None if there is none.
    pub fn get(&self, key: &str) -> anyhow::Result<Option<Bytes>> {
        let path = self.path(key);
        let got = self.rt.block_on(async {
            match self.inner.get(&path).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        got.with_context(|| format!("reading {key} from {}", self.url))
    }

    /// Deletes `key` (no error if it is not there).
    pub fn delete(&self, key: &str) -> anyhow::Result<()> {
        let path = self.path(key);
        match self.rt.block_on(self.inner.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting {key} in {}", self.url)),
        }
    }

    /// Every object whose key starts with the folder `prefix`.
    pub fn list(&self, prefix: &str) -> anyhow::Result<Vec<Listed>> {
        let path = self.path(prefix);
        let metas: Vec<_> = self
            .rt
            .block_on(self.inner.list(Some(&path)).try_collect())
            .with_context(|| format!("listing {prefix} in {}", self.url))?;
        let now = unix_millis();
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let key = m.location.as_ref().strip_prefix(self.root.as_ref())?;
                let age = (now - m.last_modified.timestamp_millis()).max(0) as u64;
                Some(Listed {
                    key: key.trim_start_matches('/').to_string(),
                    age: Duration::from_millis(age),
                })
            })
            .collect())
    }
}

fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// S3 with the standard credential chain (environment, web identity as
/// with IRSA, container and instance credentials), `[s3]` settings on top.
fn s3_store(bucket: &str, s3: &S3Settings) -> anyhow::Result<object_store::aws::AmazonS3> {
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Some(region) = &s3.region {
        b = b.with_region(region);
    }
    if let Some(url) = &s3.endpoint_url {
        b = b.with_endpoint(url).with_virtual_hosted_style_request(false);
    }
    // Plain http only for an endpoint given as such (a local test server).
    // Set here, not on the builder: its client options replace the builder's.
    let client = ClientOptions::new()
        .with_timeout(Duration::from_secs(s3.request_timeout_secs))
        .with_connect_timeout(Duration::from_secs(5))
        .with_allow_http(s3.endpoint_url.as_deref().is_some_and(|u| u.starts_with("http://")));
    let retry = RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 10,
        retry_timeout: Duration::from_secs(s3.retry_timeout_secs),
    };
    Ok(b.with_client_options(client).with_retry(retry).build()?)
}
