//! A private s3s-fs server for tests that stop and restart their S3
//! server: shared by the object tier's tests (`ckpt-io/tests/s3.rs`) and
//! the process-level tests of the root crate.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether a missing S3 server is a failure (`CKPT_REQUIRE_S3=1`, as CI
/// sets) rather than a skip.
pub fn require_s3() -> bool {
    std::env::var("CKPT_REQUIRE_S3").is_ok_and(|v| v == "1")
}

/// A private s3s-fs process, killed when dropped.
pub struct Server {
    child: Option<Child>,
    bin: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
    root: PathBuf,
    /// Its access key.
    pub access_key: String,
    /// Its secret key.
    pub secret_key: String,
}

impl Server {
    pub fn start(bin: PathBuf, root: PathBuf, port: u16) -> Self {
        let mut s = Server {
            child: None,
            bin,
            port,
            root,
            access_key: "private-access".into(),
            secret_key: "private-secret-key".into(),
        };
        s.spawn();
        s
    }

    pub fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", &self.access_key])
            .args(["--secret-key", &self.secret_key])
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("s3s-fs exited at start on port {}: {status}", self.port);
            }
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not listen on 127.0.0.1:{} within 60 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn s3s_fs_binary(test: &str) -> Option<PathBuf> {
    let bin = std::env::var_os("CKPT_S3S_FS")
        .map(PathBuf::from)
        .or_else(|| {
            let tools = std::env::var_os("CKPT_TOOLS")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/ckpt-tools"))
                })?;
            Some(tools.join("bin/s3s-fs"))
        })
        .filter(|p| p.is_file());
    if bin.is_none() {
        let why = format!(
            "{test}: SKIPPED: no s3s-fs binary (set CKPT_S3S_FS, or run scripts/s3-server.sh start \
             once to install it)"
        );
        assert!(!require_s3(), "CKPT_REQUIRE_S3=1 but {why}");
        eprintln!("{why}");
    }
    bin
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The S3 server the test command started (`scripts/s3-server.sh`, whose
/// env file sets `CKPT_TEST_S3_*` and the `AWS_*` credentials).
pub struct Bundled {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The test bucket.
    pub bucket: String,
}

impl Bundled {
    /// The bundled server, or `None` (after saying why) when the tests run
    /// without one; a failure instead with `CKPT_REQUIRE_S3=1`.
    pub fn get(test: &str) -> Option<Self> {
        let endpoint = std::env::var("CKPT_TEST_S3_ENDPOINT").ok();
        let bucket = std::env::var("CKPT_TEST_S3_BUCKET").ok();
        let keys = std::env::var("AWS_ACCESS_KEY_ID").is_ok()
            && std::env::var("AWS_SECRET_ACCESS_KEY").is_ok();
        match (endpoint, bucket) {
            (Some(endpoint), Some(bucket)) if keys => Some(Self { endpoint, bucket }),
            _ => {
                let why = format!(
                    "{test}: SKIPPED: no S3 server configured (CKPT_TEST_S3_ENDPOINT, \
                     CKPT_TEST_S3_BUCKET, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); run \
                     `scripts/s3-server.sh start` and `source target/s3-test-server.env`"
                );
                assert!(!require_s3(), "CKPT_REQUIRE_S3=1 but {why}");
                eprintln!("{why}");
                None
            }
        }
    }

    /// A location no other test (or earlier run) uses.
    pub fn location(&self, test: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!(
            "s3://{}/ckpt-tests/{test}-{}-{nanos}",
            self.bucket,
            std::process::id()
        )
    }

    /// The environment of a user pointed at this server (credentials are
    /// inherited).
    pub fn env(&self, cmd: &mut Command) {
        cmd.env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_REGION", self.region());
    }

    /// The server's region (`AWS_REGION` of its env file; Garage names its
    /// own), `us-east-1` if unset.
    pub fn region(&self) -> String {
        std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into())
    }
}

/// What the conditional create of the server named `server`
/// (`CKPT_TEST_S3_SERVER`: `s3s-fs-0.14.1`, `garage-2.5.0`, `minio`, `aws`)
/// guarantees, as `CreateGuarantee::name` spells it (docs/s3.md).
pub fn expected_guarantee(server: &str) -> Option<&'static str> {
    match server {
        s if s.starts_with("s3s-fs") => Some("racy"),
        s if s.starts_with("garage") => Some("ignored"),
        s if s.starts_with("minio") || s.starts_with("aws") => Some("atomic"),
        _ => None,
    }
}

/// Whether the server named `server` (`CKPT_TEST_S3_SERVER`) checks an
/// `x-amz-checksum-*` header on the parts of a multipart upload, not only
/// on single `PUT`s. s3s-fs 0.14 does not, Garage 2.5 does (docs/s3.md);
/// AWS S3 and MinIO document that they do, and the test holds them to it.
pub fn verifies_part_checksums(server: &str) -> bool {
    !server.starts_with("s3s-fs")
}

/// Whether the server named `server` keeps an object whose single `PUT` it
/// refused for a checksum mismatch (s3s-fs 0.14 checks after storing).
pub fn keeps_refused_puts(server: &str) -> bool {
    server.starts_with("s3s-fs")
}
