//! A tier on an S3-compatible object store (AWS S3, MinIO, Cloudflare R2,
//! s3s-fs...), built on `object_store`.
//!
//! # What this tier guarantees
//!
//! - **No torn objects.** An object written through [`Tier::create`] is
//!   uploaded as a multipart upload that becomes visible only when
//!   [`TierWriter::finish`] completes it; an object no larger than one part
//!   is sent as a single `PUT`. Either way readers see the whole new object
//!   or nothing. A write, abort or drop before `finish` aborts the upload;
//!   nothing appears under the path.
//! - **Durable on return.** `finish` and [`Tier::put`] return once the
//!   server has acknowledged the object.
//! - **At most one commit.** `put(.., PutMode::Create)` is a conditional
//!   `PUT` (`If-None-Match: *`): of concurrent writers exactly one succeeds,
//!   the others get [`Error::AlreadyExists`]. AWS S3, MinIO, R2 and s3s-fs
//!   honour it.
//! - **Bounded memory.** At most [`ObjectTierConfig::max_parts_in_flight`]
//!   parts are uploading at a time, plus one part being filled. Parts hold
//!   the caller's [`Bytes`] as they are: nothing is copied on the way up.
//! - **Ranged reads.** [`Tier::get_range`] and [`Tier::read_into`] are
//!   ranged `GET`s; `read_into` copies the body once, into the caller's
//!   buffer. A range past the end of an object is [`Error::Incomplete`].
//! - **Typed errors.** A missing object is [`Error::NotFound`]. Everything
//!   else is [`Error::Backend`] naming the endpoint, the bucket, the
//!   operation and the object: rejected credentials and a missing bucket
//!   say so and are not retryable; connection failures, timeouts and 5xx
//!   responses are retryable (after `object_store`'s own retries, see
//!   [`ObjectTierConfig::with_retry`]).
//!
//! `list(prefix)` matches the prefix as a string, like the in-memory
//! reference tier, and lists recursively. Deleting an absent object
//! succeeds.
//!
//! # Servers without conditional writes
//!
//! Some S3-compatible servers ignore `If-None-Match` (and silently
//! overwrite) or reject it. For those, set
//! [`ObjectTierConfig::with_conditional_put`]`(false)`: `PutMode::Create`
//! then checks with a `HEAD` and writes with a plain `PUT`. That is
//! **safe for a single writer only**: two writers racing for the same
//! commit marker can both succeed, the later one overwriting the earlier.
//! [`Tier::capabilities`] reports `atomic_create: false` in that mode. Keep
//! the default (`true`) on AWS S3, MinIO, R2 and s3s-fs.
//!
//! # Failures during an upload
//!
//! If the server goes away mid-upload, the write or `finish` fails and the
//! writer tries to abort the multipart upload. If the abort cannot reach
//! the server either, the incomplete upload stays on the server: invisible
//! (no object is listed or readable), but holding storage until a bucket
//! lifecycle rule (`AbortIncompleteMultipartUpload`) removes it. Configure
//! one on production buckets.
//!
//! # Configuration
//!
//! [`ObjectTier::from_url`] starts from `AmazonS3Builder::from_env()`, so
//! the usual variables apply: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_REGION` / `AWS_DEFAULT_REGION`,
//! `AWS_ENDPOINT_URL` / `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`,
//! `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`, and the rest of `object_store`'s
//! `AWS_*` keys. [`ObjectTierConfig`] settings override the environment.
//! Requests use path-style addressing (`http://host/bucket/key`) unless
//! virtual-hosted style is asked for, which is what MinIO and most other
//! non-AWS servers need. Plain `http://` is allowed when asked for, and
//! for a loopback endpoint (`127.0.0.1`, `localhost`, `[::1]`).
//!
//! ```no_run
//! # fn main() -> ckpt_core::Result<()> {
//! use std::sync::Arc;
//! use ckpt_core::{Checkpointer, TierPolicy};
//! use ckpt_io::object::{ObjectTier, ObjectTierConfig};
//!
//! let tier = ObjectTier::from_url(
//!     "s3://my-bucket/checkpoints",
//!     ObjectTierConfig::default().with_endpoint("http://127.0.0.1:9000"),
//! )?;
//! let ckpt = Checkpointer::builder("llama-7b")
//!     .tier(Arc::new(tier), TierPolicy::keep_last(3))
//!     .build()?;
//! # Ok(()) }
//! ```
//!
//! Compression is not offered: checkpoints are restored with ranged reads
//! at chunk granularity, which a whole-object zstd stream cannot serve, and
//! training state (floating point) compresses poorly.
//!
//! The tier's futures must run inside a tokio runtime (the `object_store`
//! HTTP client needs one); the checkpointer's background runtime is one.

mod download;
mod upload;

use std::error::Error as StdError;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, Checksum};
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path;
use object_store::{ClientConfigKey, ObjectStore, RetryConfig};

use ckpt_core::ErrorSource as Source;
use ckpt_core::{
    Capabilities, CreateGuarantee, Error, ObjectMeta, PutMode, Result, Tier, TierWriter,
};

pub use object_store;

/// Smallest part S3 accepts (all parts but the last).
const MIN_PART_SIZE: usize = 5 << 20;
/// Largest part S3 accepts.
const MAX_PART_SIZE: usize = 5 << 30;
/// Most parts of one multipart upload S3 accepts.
pub const DEFAULT_MAX_PARTS: u64 = 10_000;

/// Settings of an [`ObjectTier`]: upload shape, retries, conditional writes,
/// and, for [`ObjectTier::from_url`], how to reach the server.
#[derive(Clone)]
pub struct ObjectTierConfig {
    part_size: usize,
    max_parts: u64,
    max_parts_in_flight: usize,
    retry: Option<RetryConfig>,
    conditional_put: bool,
    endpoint: Option<String>,
    region: Option<String>,
    allow_http: Option<bool>,
    virtual_hosted_style: Option<bool>,
    credentials: Option<(String, String)>,
    request_timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
    payload_checksum: PayloadChecksum,
    options: Vec<(String, String)>,
}

/// How the bytes of every request body are protected on the way to the
/// server. A server that checks the chosen checksum refuses a body altered
/// in transit (a flipped bit on a NIC, a proxy, a bad DIMM on the path)
/// instead of storing it, and the tier sends it again; the checkpoint's own
/// crc32c, verified on every restore, is the last line behind both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PayloadChecksum {
    /// An `x-amz-checksum-crc64nvme` header on every `PUT` and part
    /// (`x-amz-checksum-algorithm: CRC64NVME` on the multipart upload), and
    /// `UNSIGNED-PAYLOAD` in the SigV4 signature: the request is still
    /// signed, its body is checked by the CRC, which costs the saving host
    /// far less CPU than SHA-256 (`BENCHMARKS.md`: 15.3 s against 33.5 s
    /// over ten 2 GiB saves). Garage 2.5 verifies it on single `PUT`s and
    /// on every part (tested), as AWS S3 and MinIO document they do.
    /// **s3s-fs 0.14 verifies it on single `PUT`s only**, not on the
    /// parts of a multipart upload (`ckpt-io/tests/s3.rs` pins what each
    /// bundled server does); use [`PayloadChecksum::SignedSha256`] there if
    /// the path to the server can corrupt data.
    #[default]
    Crc64Nvme,
    /// The SHA-256 of every body in the SigV4 signature
    /// (`x-amz-content-sha256`), which SigV4 servers check (s3s-fs and
    /// Garage do, tested). It costs the saving host about 0.9 core-seconds
    /// per GiB uploaded (measured with SHA extensions; `BENCHMARKS.md`),
    /// which on a
    /// busy host slows the other tiers of the same save.
    SignedSha256,
}

impl Default for ObjectTierConfig {
    fn default() -> Self {
        Self {
            part_size: 16 << 20,
            max_parts: DEFAULT_MAX_PARTS,
            max_parts_in_flight: 4,
            retry: None,
            conditional_put: true,
            endpoint: None,
            region: None,
            allow_http: None,
            virtual_hosted_style: None,
            credentials: None,
            request_timeout: None,
            connect_timeout: None,
            payload_checksum: PayloadChecksum::default(),
            options: Vec::new(),
        }
    }
}

impl fmt::Debug for ObjectTierConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectTierConfig")
            .field("part_size", &self.part_size)
            .field("max_parts", &self.max_parts)
            .field("max_parts_in_flight", &self.max_parts_in_flight)
            .field("retry", &self.retry)
            .field("conditional_put", &self.conditional_put)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("allow_http", &self.allow_http)
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(k, _)| (k, "<redacted>")),
            )
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("payload_checksum", &self.payload_checksum)
            .field(
                "options",
                &self.options.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl ObjectTierConfig {
    /// Size of each multipart part (default 16 MiB; S3 allows 5 MiB to
    /// 5 GiB). Objects no larger than one part are sent with a single `PUT`.
    pub fn with_part_size(mut self, bytes: usize) -> Self {
        self.part_size = bytes;
        self
    }

    /// Most parts of one multipart upload (default 10 000, S3's limit;
    /// some compatible servers allow fewer). Together with the part size it
    /// bounds the largest shard file: a save of a larger one fails on this
    /// tier at once, naming the part size it needs, instead of uploading
    /// and failing at the end.
    pub fn with_max_parts(mut self, n: u64) -> Self {
        self.max_parts = n;
        self
    }

    /// How many parts of one object upload at the same time (default 4).
    pub fn with_max_parts_in_flight(mut self, n: usize) -> Self {
        self.max_parts_in_flight = n;
        self
    }

    /// Retries and backoff of every request (`object_store`'s
    /// [`RetryConfig`]). Default: [`default_retry`], a few quick retries
    /// bounded to 20 s in all, so a dead server fails a save in seconds
    /// (and the checkpointer takes the tier out and probes it) instead of
    /// holding staging memory for `object_store`'s 3 minutes. Used by
    /// [`ObjectTier::from_url`]; a store given to [`ObjectTier::with_config`]
    /// keeps its own.
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = Some(retry);
        self
    }

    /// Whether `PutMode::Create` uses a conditional `PUT` (default `true`).
    /// `false` falls back to `HEAD` then `PUT`, safe for a single writer
    /// only; see the [module docs](self#servers-without-conditional-writes).
    pub fn with_conditional_put(mut self, on: bool) -> Self {
        self.conditional_put = on;
        self
    }

    /// Endpoint URL of an S3-compatible server, e.g.
    /// `http://127.0.0.1:9000` (overrides `AWS_ENDPOINT_URL`).
    pub fn with_endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoint = Some(url.into());
        self
    }

    /// Region (overrides `AWS_REGION`; default `us-east-1`).
    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Allows plain `http://` endpoints (overrides `AWS_ALLOW_HTTP`).
    /// Loopback endpoints are allowed without it.
    pub fn with_allow_http(mut self, allow: bool) -> Self {
        self.allow_http = Some(allow);
        self
    }

    /// Virtual-hosted-style requests (`http://bucket.host/key`) instead of
    /// path style (`http://host/bucket/key`, the default).
    pub fn with_virtual_hosted_style(mut self, on: bool) -> Self {
        self.virtual_hosted_style = Some(on);
        self
    }

    /// Static credentials (override `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`).
    pub fn with_credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        self.credentials = Some((access_key_id.into(), secret_access_key.into()));
        self
    }

    /// Timeout of each HTTP request (`object_store`'s default: 30 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// Timeout of establishing a connection (`object_store`'s default: 5 s).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// How request bodies are checked in transit (default
    /// [`PayloadChecksum::Crc64Nvme`]; overrides `AWS_UNSIGNED_PAYLOAD`,
    /// and `AWS_CHECKSUM_ALGORITHM` for `Crc64Nvme`: with `SignedSha256` an
    /// algorithm set there still adds its header). Used by [`ObjectTier::from_url`]; a store
    /// given to [`ObjectTier::with_config`] keeps its own.
    pub fn with_payload_checksum(mut self, checksum: PayloadChecksum) -> Self {
        self.payload_checksum = checksum;
        self
    }

    /// Any other `AmazonS3Builder` key (`aws_session_token`,
    /// `aws_checksum_algorithm`, `aws_sse_kms_key_id`...), applied last.
    pub fn with_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.push((key.into(), value.into()));
        self
    }

    /// Multipart part size in bytes.
    pub fn part_size(&self) -> usize {
        self.part_size
    }

    /// Parts of one object uploading at the same time.
    pub fn max_parts_in_flight(&self) -> usize {
        self.max_parts_in_flight
    }

    /// Whether `PutMode::Create` is a conditional `PUT`.
    pub fn conditional_put(&self) -> bool {
        self.conditional_put
    }

    /// How request bodies are checked in transit.
    pub fn payload_checksum(&self) -> PayloadChecksum {
        self.payload_checksum
    }

    fn validate(&self) -> Result<()> {
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size) {
            return Err(Error::Config(format!(
                "object tier part size {} must be between 5 MiB and 5 GiB",
                self.part_size
            )));
        }
        if self.max_parts == 0 {
            return Err(Error::Config(
                "object tier max parts must be at least 1".into(),
            ));
        }
        if self.max_parts_in_flight == 0 {
            return Err(Error::Config(
                "object tier max parts in flight must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// A [`Tier`] on an S3-compatible object store. See the
/// [module docs](self) for what it guarantees. Clones share the client.
#[derive(Debug, Clone)]
pub struct ObjectTier {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn ObjectStore>,
    /// The same client's part-level API, when the tier built it
    /// ([`ObjectTier::from_url`]): multipart uploads then send each part
    /// themselves and can send a refused one again.
    parts: Option<PartStore>,
    /// Key prefix without leading or trailing `/` (may be empty).
    prefix: String,
    location: String,
    /// `endpoint …, bucket …` or the store's own description, for errors.
    target: Target,
    config: ObjectTierConfig,
    /// What the server's conditional create turned out to guarantee
    /// (probed once, at the first commit or `ckpt ls`).
    create_guarantee: tokio::sync::OnceCell<CreateGuarantee>,
}

/// A [`MultipartStore`](object_store::multipart::MultipartStore) (which
/// is not `Debug`).
#[derive(Clone)]
struct PartStore(Arc<dyn object_store::multipart::MultipartStore>);

impl fmt::Debug for PartStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PartStore")
    }
}

#[derive(Debug)]
enum Target {
    Known { endpoint: String, bucket: String },
    Opaque(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Known { endpoint, bucket } => {
                write!(f, "endpoint {endpoint}, bucket `{bucket}`")
            }
            Target::Opaque(s) => f.write_str(s),
        }
    }
}

impl ObjectTier {
    /// A tier on `store` under `prefix`, with the default
    /// [`ObjectTierConfig`]. `location_label` is what
    /// [`Tier::location`] reports, e.g. `s3://bucket/prefix`.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: impl Into<String>,
        location_label: impl Into<String>,
    ) -> Result<Self> {
        Self::with_config(store, prefix, location_label, ObjectTierConfig::default())
    }

    /// A tier on `store` under `prefix` with `config` (its connection
    /// settings are ignored: the store is already built).
    pub fn with_config(
        store: Arc<dyn ObjectStore>,
        prefix: impl Into<String>,
        location_label: impl Into<String>,
        config: ObjectTierConfig,
    ) -> Result<Self> {
        let label = location_label.into();
        let target = Target::Opaque(format!("{label} ({store})"));
        Self::build(store, None, prefix.into(), label, target, config)
    }

    /// A tier for `s3://bucket/prefix`, configured from the `AWS_*`
    /// environment and `config` (see the
    /// [module docs](self#configuration)). Builds the client; sends no
    /// request. Use [`ObjectTier::check`] to test the connection.
    pub fn from_url(url: &str, config: ObjectTierConfig) -> Result<Self> {
        let (bucket, prefix) = parse_s3_url(url)?;
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(e) = &config.endpoint {
            b = b.with_endpoint(e.clone());
        }
        if let Some(r) = &config.region {
            b = b.with_region(r.clone());
        }
        if let Some((k, s)) = &config.credentials {
            b = b
                .with_access_key_id(k.clone())
                .with_secret_access_key(s.clone());
        }
        let endpoint = b.get_config_value(&AmazonS3ConfigKey::Endpoint);
        match config.allow_http {
            Some(allow) => b = b.with_allow_http(allow),
            None if endpoint.as_deref().is_some_and(is_loopback_http) => {
                b = b.with_allow_http(true)
            }
            None => {}
        }
        if let Some(v) = config.virtual_hosted_style {
            b = b.with_virtual_hosted_style_request(v);
        }
        b = b.with_retry(config.retry.clone().unwrap_or_else(default_retry));
        b = match config.payload_checksum {
            PayloadChecksum::Crc64Nvme => b
                .with_unsigned_payload(true)
                .with_checksum_algorithm(Checksum::CRC64NVME),
            PayloadChecksum::SignedSha256 => b.with_unsigned_payload(false),
        };
        if let Some(t) = config.request_timeout {
            b = b.with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                format!("{}ms", t.as_millis()),
            );
        }
        if let Some(t) = config.connect_timeout {
            b = b.with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                format!("{}ms", t.as_millis()),
            );
        }
        for (k, v) in &config.options {
            let key: AmazonS3ConfigKey = k.parse().map_err(|e| {
                Error::Config(format!(
                    "object tier option `{k}` is not an S3 setting: {e}"
                ))
            })?;
            b = b.with_config(key, v.clone());
        }
        let region = b
            .get_config_value(&AmazonS3ConfigKey::Region)
            .unwrap_or_else(|| "us-east-1".into());
        let endpoint = b
            .get_config_value(&AmazonS3ConfigKey::Endpoint)
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let store = b
            .build()
            .map_err(|e| Error::Config(format!("cannot configure S3 client for {url}: {e}")))?;
        let location = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        let target = Target::Known {
            endpoint,
            bucket: bucket.to_string(),
        };
        let store = Arc::new(store);
        let parts = PartStore(store.clone());
        Self::build(store, Some(parts), prefix, location, target, config)
    }

    fn build(
        store: Arc<dyn ObjectStore>,
        parts: Option<PartStore>,
        prefix: String,
        location: String,
        target: Target,
        config: ObjectTierConfig,
    ) -> Result<Self> {
        config.validate()?;
        let prefix = prefix.trim_matches('/').to_string();
        if !prefix.is_empty() {
            Path::parse(&prefix).map_err(|e| Error::InvalidPath {
                path: prefix.clone(),
                reason: format!("not a valid object key prefix: {e}"),
            })?;
            check_echo_safe(&prefix, "prefix")?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                parts,
                prefix,
                location,
                target,
                config,
                create_guarantee: tokio::sync::OnceCell::new(),
            }),
        })
    }

    /// The underlying `object_store` client.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner.store
    }

    /// The key prefix inside the bucket (no leading or trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The configuration.
    pub fn config(&self) -> &ObjectTierConfig {
        &self.inner.config
    }

    /// The full object key of a tier path (prefix included), for raw
    /// access through [`ObjectTier::store`].
    pub fn object_key(&self, path: &str) -> Result<Path> {
        self.inner.key(path)
    }

    /// Checks with one list request that the endpoint answers, the
    /// credentials are accepted and the bucket exists; the errors name
    /// which of these failed.
    pub async fn check(&self) -> Result<()> {
        let prefix = self.inner.dir_key("")?;
        self.inner
            .store
            .list_with_delimiter(prefix.as_ref())
            .await
            .map(|_| ())
            .map_err(|e| self.inner.error(Op::List, "", e))
    }
}

/// The retry policy of [`ObjectTier::from_url`] unless
/// [`ObjectTierConfig::with_retry`] says otherwise: 3 retries, backoff from
/// 100 ms up to 2 s, nothing retried more than 20 s after the first try.
/// Together with the request timeout (`AWS_TIMEOUT`, default 30 s) this
/// bounds how long one request can take.
pub fn default_retry() -> RetryConfig {
    RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: Duration::from_secs(20),
    }
}

fn is_loopback_http(endpoint: &str) -> bool {
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return false;
    };
    ["127.0.0.1", "localhost", "[::1]"].iter().any(|h| {
        rest.strip_prefix(h)
            .is_some_and(|t| t.is_empty() || t.starts_with(':') || t.starts_with('/'))
    })
}

/// Splits `s3://bucket/prefix` (or `s3a://`).
fn parse_s3_url(url: &str) -> Result<(&str, String)> {
    let rest = url
        .strip_prefix("s3://")
        .or_else(|| url.strip_prefix("s3a://"))
        .ok_or_else(|| Error::Config(format!("`{url}` is not an s3://bucket/prefix URL")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(Error::Config(format!("`{url}` names no bucket")));
    }
    Ok((bucket, prefix.trim_matches('/').to_string()))
}

/// What was being done when a request failed, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Put,
    Get,
    Head,
    List,
    Delete,
    CreateUpload,
    UploadPart,
    CompleteUpload,
    AbortUpload,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::Head => "head",
            Op::List => "list",
            Op::Delete => "delete",
            Op::CreateUpload => "start multipart upload of",
            Op::UploadPart => "upload part of",
            Op::CompleteUpload => "complete multipart upload of",
            Op::AbortUpload => "abort multipart upload of",
        })
    }
}

impl Inner {
    /// Full key of a tier path.
    fn key(&self, path: &str) -> Result<Path> {
        let full = if self.prefix.is_empty() {
            path.to_string()
        } else {
            format!("{}/{path}", self.prefix)
        };
        check_echo_safe(path, "object key")?;
        Path::parse(&full).map_err(|e| Error::InvalidPath {
            path: path.to_string(),
            reason: format!("not a valid object key on {}: {e}", self.location),
        })
    }

    /// Key of a directory (`None`: the whole bucket).
    fn dir_key(&self, dir: &str) -> Result<Option<Path>> {
        let dir = dir.trim_matches('/');
        if dir.is_empty() && self.prefix.is_empty() {
            return Ok(None);
        }
        if dir.is_empty() {
            return Ok(Some(self.key_of_prefix()));
        }
        self.key(dir).map(Some)
    }

    fn key_of_prefix(&self) -> Path {
        // Validated in `ObjectTier::build`.
        Path::parse(&self.prefix).unwrap_or_else(|_| Path::from(self.prefix.as_str()))
    }

    /// Tier path of a listed key, if it is under the prefix.
    fn relative<'k>(&self, key: &'k str) -> Option<&'k str> {
        if self.prefix.is_empty() {
            return Some(key);
        }
        key.strip_prefix(self.prefix.as_str())?.strip_prefix('/')
    }

    fn backend(&self, retryable: bool, message: String) -> Error {
        Error::backend(self.location.clone(), retryable, message)
    }

    /// Maps an `object_store` error of `op` on `path` to ckpt's error kinds.
    /// The classification reads the typed error and the HTTP status of the
    /// response, never the object path: a key that happens to contain
    /// `NoSuchBucket` is not a missing bucket.
    fn error(&self, op: Op, path: &str, e: object_store::Error) -> Error {
        use object_store::Error as E;
        let status = http_status(&e);
        let text = chain_text(&e);
        let code = s3_error_code(&text);
        let target = &self.target;
        let what = if path.is_empty() {
            format!("{op} at the tier root")
        } else {
            format!("{op} `{path}`")
        };
        let source: Source = Arc::new(e);
        let e: &object_store::Error = source
            .downcast_ref()
            .expect("the source was built from this object_store error one line up");
        let fail = |retryable: bool, summary: String| Error::Backend {
            tier: self.location.clone(),
            retryable,
            message: format!("{summary} ({target}; {what}): {text}"),
            source: Some(source.clone()),
        };
        let bucket_missing = || match target {
            Target::Known { bucket, .. } => {
                fail(false, format!("bucket `{bucket}` does not exist"))
            }
            Target::Opaque(_) => fail(false, "the bucket does not exist".into()),
        };
        let denied = |status: Option<u16>| {
            let status = status.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
            fail(
                false,
                format!(
                    "credentials were rejected or lack permission{status}; check \
                     AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
                ),
            )
        };
        if code.as_deref() == Some("NoSuchBucket") {
            return bucket_missing();
        }
        match e {
            E::NotFound { .. } if op == Op::List => bucket_missing(),
            E::NotFound { .. } => Error::NotFound {
                path: path.to_string(),
            },
            E::AlreadyExists { .. } | E::Precondition { .. } => Error::AlreadyExists {
                path: path.to_string(),
            },
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => denied(status),
            E::NotImplemented { .. } | E::NotSupported { .. } => {
                fail(false, "operation not supported by the store".into())
            }
            E::InvalidPath { .. } => Error::InvalidPath {
                path: path.to_string(),
                reason: format!("not a valid object key: {text}"),
            },
            _ => match status {
                Some(401 | 403) => denied(status),
                Some(404) if op == Op::List => bucket_missing(),
                Some(404) => Error::NotFound {
                    path: path.to_string(),
                },
                Some(416) => Error::Incomplete {
                    path: path.to_string(),
                    reason: format!("requested range is past the end of the object: {text}"),
                },
                Some(s @ (408 | 429 | 500 | 502..=599)) => {
                    fail(true, format!("the server failed the request (HTTP {s})"))
                }
                Some(s) => fail(false, format!("the server refused the request (HTTP {s})")),
                None if is_transport(e) => fail(true, "cannot reach the server".into()),
                None => fail(false, "request failed".into()),
            },
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        // object_store lists whole path segments; list the enclosing
        // directory and match the rest of the prefix as a string.
        let dir = prefix.rfind('/').map_or("", |i| &prefix[..i]);
        let dir_key = self.dir_key(dir)?;
        let mut stream = self.store.list(dir_key.as_ref());
        let mut out = Vec::new();
        while let Some(item) = stream.next().await {
            let meta = item.map_err(|e| self.error(Op::List, prefix, e))?;
            if let Some(rel) = self.relative(meta.location.as_ref())
                && rel.starts_with(prefix)
            {
                out.push(ObjectMeta {
                    path: rel.to_string(),
                    size: meta.size,
                });
            }
        }
        Ok(out)
    }

    async fn delete(&self, path: &str) -> Result<()> {
        let key = self.key(path)?;
        let mut results = self
            .store
            .delete_stream(futures::stream::once(async move { Ok(key) }).boxed());
        while let Some(r) = results.next().await {
            match r.map_err(|e| self.error(Op::Delete, path, e)) {
                Ok(_) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Words that `object_store` reads as a failure anywhere in the body of a
/// `200 OK` (its retry layer's check for S3's in-body errors), and that a
/// bulk delete or a multipart completion echo back with the key: a key
/// containing one fails every such request.
const ECHOED_ERROR_WORDS: [&str; 2] = ["InternalError", "SlowDown"];

/// Refuses a key or prefix that would make successful requests look
/// failed (see [`ECHOED_ERROR_WORDS`]), naming the word.
fn check_echo_safe(path: &str, what: &str) -> Result<()> {
    match ECHOED_ERROR_WORDS.iter().find(|w| path.contains(*w)) {
        Some(word) => Err(Error::InvalidPath {
            path: path.to_string(),
            reason: format!(
                "an {what} on an object store must not contain `{word}`: the S3 client reads \
                 that word in a response body (which echoes the key) as a failed request; \
                 rename the run, prefix or incarnation"
            ),
        }),
        None => Ok(()),
    }
}

/// Every message of an error's source chain, joined.
fn chain_text(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = s.source();
    }
    out
}

/// The S3 error code of a failed response (`<Code>NoSuchBucket</Code>`),
/// read from the response body that `object_store` quotes in its message.
fn s3_error_code(text: &str) -> Option<String> {
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    Some(text[start..start + len].to_string())
}

/// S3 error codes of a request refused because its body did not match the
/// checksum sent with it (AWS, MinIO: `BadDigest`,
/// `XAmzContentSHA256Mismatch`, `XAmzContentChecksumMismatch`; Garage:
/// `InvalidDigest`).
const DIGEST_CODES: [&str; 4] = [
    "BadDigest",
    "InvalidDigest",
    "XAmzContentSHA256Mismatch",
    "XAmzContentChecksumMismatch",
];

/// How many times the object tier sends a body the server refused because
/// it did not match its checksum (altered on the way), counting the first.
pub const DIGEST_ATTEMPTS: usize = 3;

/// Whether the server refused the request because the body it received
/// does not match its checksum: the bytes were altered on the way, and
/// sending the same (intact) bytes again is the cure.
fn refused_digest(e: &object_store::Error) -> bool {
    http_status(e) == Some(400)
        && s3_error_code(&chain_text(e)).is_some_and(|c| DIGEST_CODES.contains(&c.as_str()))
}

/// Runs `send` until it succeeds, fails otherwise, or has been refused for
/// a checksum mismatch [`DIGEST_ATTEMPTS`] times; `what` names the request
/// in the warning each resend logs.
async fn resend_on_digest<T, F, Fut>(what: &str, mut send: F) -> object_store::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = object_store::Result<T>>,
{
    let mut attempt = 1;
    loop {
        match send().await {
            Err(e) if attempt < DIGEST_ATTEMPTS && refused_digest(&e) => {
                tracing::warn!(request = what, attempt, error = %e, "the server refused a body that did not match its checksum (altered in transit); sending it again");
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// The HTTP status of a failed response somewhere in the chain, read from
/// `object_store`'s message (its request error type is private).
fn http_status(e: &(dyn StdError + 'static)) -> Option<u16> {
    const MARK: &str = "status code: ";
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        let m = err.to_string();
        if let Some(i) = m.find(MARK) {
            let digits = m.get(i + MARK.len()..i + MARK.len() + 3)?;
            return digits.parse().ok();
        }
        cur = err.source();
    }
    None
}

/// Whether the chain holds a connection-level failure (refused, reset,
/// timed out): worth retrying later.
fn is_transport(e: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<HttpError>() {
            return matches!(
                h.kind(),
                HttpErrorKind::Connect
                    | HttpErrorKind::Request
                    | HttpErrorKind::Timeout
                    | HttpErrorKind::Interrupted
            );
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        cur = err.source();
    }
    false
}

impl Tier for ObjectTier {
    fn location(&self) -> String {
        self.inner.location.clone()
    }

    fn capabilities(&self) -> Capabilities {
        let c = &self.inner.config;
        // A part is uploaded only once full, and `max_parts_in_flight` of
        // them may be in the air: that much staged memory stays referenced.
        Capabilities::NONE
            .with_atomic_create(c.conditional_put)
            .with_survives_process(true)
            .with_survives_node(true)
            .with_buffered_write(
                (c.part_size as u64).saturating_mul(c.max_parts_in_flight as u64 + 1),
            )
            .with_max_object(Some((c.part_size as u64).saturating_mul(c.max_parts)))
    }

    /// With conditional puts on (the default), the server's answer is
    /// probed once ([`ckpt_core::probe_create`], 16 racers under
    /// `.ckpt-probe/`) and a server that does not honour them is named in
    /// one warning; with them off, [`CreateGuarantee::Ignored`]. A probe
    /// that could not run (an outage) is tried again next time.
    fn create_guarantee(&self) -> BoxFuture<'_, CreateGuarantee> {
        Box::pin(async move {
            let inner = &self.inner;
            if !inner.config.conditional_put {
                return CreateGuarantee::Ignored;
            }
            if let Some(g) = inner.create_guarantee.get() {
                return g.clone();
            }
            let nonce = ckpt_core::format::layout::new_attempt("probe", 0);
            let g = ckpt_core::probe_create(self, &nonce, 16).await;
            if matches!(g, CreateGuarantee::Unknown { .. }) {
                return g;
            }
            let g = inner.create_guarantee.get_or_init(|| async { g }).await;
            if !g.is_atomic() {
                tracing::warn!(
                    tier = %inner.location,
                    server = %inner.target,
                    guarantee = %g,
                    "this S3 server does not make conditional creates atomic: {}",
                    g.consequence()
                );
            }
            g.clone()
        })
    }

    fn create<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Box<dyn TierWriter>>> {
        Box::pin(async move {
            let writer = upload::ObjectWriter::new(self.inner.clone(), path)?;
            Ok(Box::new(writer) as Box<dyn TierWriter>)
        })
    }

    fn put<'a>(&'a self, path: &'a str, data: Bytes, mode: PutMode) -> BoxFuture<'a, Result<()>> {
        Box::pin(upload::put(&self.inner, path, data, mode))
    }

    fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Bytes>> {
        Box::pin(download::get(&self.inner, path))
    }

    fn get_range<'a>(&'a self, path: &'a str, range: Range<u64>) -> BoxFuture<'a, Result<Bytes>> {
        Box::pin(download::get_range(&self.inner, path, range))
    }

    fn read_into<'a>(
        &'a self,
        path: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(download::read_into(&self.inner, path, offset, buf))
    }

    fn size<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(download::size(&self.inner, path))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>>> {
        Box::pin(self.inner.list(prefix))
    }

    fn delete<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.inner.delete(path))
    }
}

#[cfg(test)]
mod tests;
