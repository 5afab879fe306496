//! Any S3-compatible store (Garage, MinIO, AWS) through the `object_store` crate.
//!
//! S3 makes a PUT visible only once it is complete and acknowledges it once stored, which is
//! the backend contract; no conditional request is used (Garage ignores `If-None-Match`).
//! The backend runs its own small tokio runtime so that callers can stay synchronous.

use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutPayload};

use super::{Backend, BackendError, check_key};

/// Requests in flight at once in a batch.
const CONCURRENCY: usize = 16;

/// How long one request is retried before its error reaches the caller: a few quick retries
/// for a blip, then the error, within seconds. `object_store`'s default (ten retries, up to
/// three minutes) would hold a node's committer, and a sender waiting for its answer, for
/// minutes during an outage; the node retries stored work with its own back-off instead.
fn retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: std::time::Duration::from_millis(100),
            max_backoff: std::time::Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: std::time::Duration::from_secs(10),
    }
}

#[derive(Debug)]
pub struct S3Backend {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: String,
    rt: tokio::runtime::Runtime,
}

/// How to reach an S3 service, when not taken from the environment.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub prefix: String,
}

impl S3Backend {
    /// `s3://bucket[/prefix]`, with endpoint, region and credentials from `AWS_ENDPOINT_URL`
    /// (or `AWS_ENDPOINT`), `AWS_REGION`, `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    pub fn from_url(url: &str) -> Result<S3Backend, BackendError> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| BackendError::Config(format!("{url}: expected s3://bucket/prefix")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(BackendError::Config(format!("{url}: no bucket name")));
        }
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry());
        let endpoint = std::env::var("AWS_ENDPOINT_URL")
            .or_else(|_| std::env::var("AWS_ENDPOINT"))
            .unwrap_or_default();
        if endpoint.starts_with("http://") {
            builder = builder.with_allow_http(true);
        }
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            builder = builder.with_region("us-east-1");
        }
        let store = builder
            .build()
            .map_err(|e| BackendError::Config(format!("{url}: {e}")))?;
        S3Backend::new(url.to_string(), Arc::new(store), prefix)
    }

    /// An explicitly configured S3 service (tests and embedded use).
    pub fn with_config(c: &S3Config) -> Result<S3Backend, BackendError> {
        let store = AmazonS3Builder::new()
            .with_endpoint(&c.endpoint)
            .with_allow_http(c.endpoint.starts_with("http://"))
            .with_region(&c.region)
            .with_bucket_name(&c.bucket)
            .with_access_key_id(&c.access_key_id)
            .with_secret_access_key(&c.secret_access_key)
            .with_retry(retry())
            .build()
            .map_err(|e| BackendError::Config(format!("{}: {e}", c.endpoint)))?;
        S3Backend::new(
            format!("s3://{}/{} at {}", c.bucket, c.prefix, c.endpoint),
            Arc::new(store),
            &c.prefix,
        )
    }

    fn new(
        url: String,
        store: Arc<dyn ObjectStore>,
        prefix: &str,
    ) -> Result<S3Backend, BackendError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("store-s3")
            .enable_all()
            .build()
            .map_err(|e| {
                BackendError::Config(format!("cannot start the S3 client runtime: {e}"))
            })?;
        let prefix = prefix.trim_matches('/').to_string();
        Ok(S3Backend {
            url,
            store,
            prefix,
            rt,
        })
    }

    fn path(&self, key: &str) -> Result<ObjPath, BackendError> {
        check_key(key)?;
        Ok(if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        })
    }

    /// Runs a future on the backend's runtime and waits for it, from any thread.
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, BackendError>> + Send + 'static,
    ) -> Result<T, BackendError> {
        let handle = self.rt.spawn(fut);
        futures::executor::block_on(handle)
            .map_err(|e| BackendError::Remote(format!("request task failed: {e}")))?
    }
}

fn remote(key: &str, e: object_store::Error) -> BackendError {
    match e {
        object_store::Error::NotFound { .. } => BackendError::NotFound(key.to_string()),
        e => BackendError::Remote(format!("{key}: {e}")),
    }
}

impl Backend for S3Backend {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        self.put_batch(vec![(key.to_string(), data)])
    }

    fn put_batch(&self, items: Vec<(String, Bytes)>) -> Result<(), BackendError> {
        let jobs: Vec<(String, ObjPath, Bytes)> = items
            .into_iter()
            .map(|(k, v)| Ok((k.clone(), self.path(&k)?, v)))
            .collect::<Result<_, BackendError>>()?;
        let store = self.store.clone();
        self.run(async move {
            futures::stream::iter(jobs)
                .map(|(key, path, data)| {
                    let store = store.clone();
                    async move {
                        store
                            .put(&path, PutPayload::from(data))
                            .await
                            .map(|_| ())
                            .map_err(|e| remote(&key, e))
                    }
                })
                .buffer_unordered(CONCURRENCY)
                .try_collect::<Vec<()>>()
                .await
                .map(|_| ())
        })
    }

    fn get(&self, key: &str) -> Result<Bytes, BackendError> {
        let path = self.path(key)?;
        let store = self.store.clone();
        let key = key.to_string();
        self.run(async move {
            let r = store.get(&path).await.map_err(|e| remote(&key, e))?;
            r.bytes().await.map_err(|e| remote(&key, e))
        })
    }

    fn exists(&self, key: &str) -> Result<bool, BackendError> {
        let path = self.path(key)?;
        let store = self.store.clone();
        let key = key.to_string();
        self.run(async move {
            match store.head(&path).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(remote(&key, e)),
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, BackendError> {
        let store = self.store.clone();
        let base = self.prefix.clone();
        let want = prefix.to_string();
        self.run(async move {
            let root = (!base.is_empty()).then(|| ObjPath::from(base.as_str()));
            let metas: Vec<object_store::ObjectMeta> = store
                .list(root.as_ref())
                .try_collect()
                .await
                .map_err(|e| remote(&want, e))?;
            Ok(metas
                .into_iter()
                .filter_map(|m| {
                    let loc = m.location.to_string();
                    let key = if base.is_empty() {
                        loc
                    } else {
                        loc.strip_prefix(&format!("{base}/"))?.to_string()
                    };
                    key.starts_with(&want).then_some((key, m.size))
                })
                .collect())
        })
    }

    fn delete(&self, key: &str) -> Result<(), BackendError> {
        let path = self.path(key)?;
        let store = self.store.clone();
        let key = key.to_string();
        self.run(async move {
            match store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(remote(&key, e)),
            }
        })
    }
}
