//! Unit tests of the object tier on `object_store`'s in-memory store.

use super::*;

#[test]
fn parses_urls() {
    assert_eq!(
        parse_s3_url("s3://b/p/q/").ok(),
        Some(("b", "p/q".to_string()))
    );
    assert_eq!(parse_s3_url("s3a://b").ok(), Some(("b", String::new())));
    assert!(parse_s3_url("s3:///p").is_err());
    assert!(parse_s3_url("gs://b/p").is_err());
}

#[test]
fn loopback_endpoints_allow_http() {
    assert!(is_loopback_http("http://127.0.0.1:9000"));
    assert!(is_loopback_http("http://localhost"));
    assert!(is_loopback_http("http://[::1]:80/"));
    assert!(!is_loopback_http("http://127.0.0.10:9000"));
    assert!(!is_loopback_http("http://localhost.evil.com"));
    assert!(!is_loopback_http("https://127.0.0.1"));
}

#[test]
fn config_is_validated_and_redacted() {
    let c = ObjectTierConfig::default().with_part_size(1 << 20);
    assert!(c.validate().is_err());
    let c = ObjectTierConfig::default().with_max_parts_in_flight(0);
    assert!(c.validate().is_err());
    let c = ObjectTierConfig::default().with_credentials("AKIA", "very-secret");
    assert!(c.validate().is_ok());
    let shown = format!("{c:?}");
    assert!(
        shown.contains("AKIA") && !shown.contains("very-secret"),
        "{shown}"
    );
}

#[test]
fn string_prefix_listing_maps_keys() {
    let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let tier = ObjectTier::new(store, "/a/b/", "mem").expect("tier");
    assert_eq!(tier.prefix(), "a/b");
    assert_eq!(tier.inner.relative("a/b/x/y"), Some("x/y"));
    assert_eq!(tier.inner.relative("a/bc/x"), None);
    assert_eq!(
        tier.object_key("run/step/MANIFEST.json")
            .expect("key")
            .as_ref(),
        "a/b/run/step/MANIFEST.json"
    );
    assert!(tier.object_key("run//x").is_err());
}

fn mem_tier(conditional: bool) -> (Arc<object_store::memory::InMemory>, ObjectTier) {
    let store = Arc::new(object_store::memory::InMemory::new());
    let tier = ObjectTier::with_config(
        store.clone(),
        "pre",
        "mem://pre",
        ObjectTierConfig::default()
            .with_part_size(MIN_PART_SIZE)
            .with_max_parts_in_flight(2)
            .with_conditional_put(conditional),
    )
    .expect("tier");
    (store, tier)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_splits_parts_and_aborts_cleanly() {
    let (store, tier) = mem_tier(true);
    let data: Vec<u8> = (0..2 * MIN_PART_SIZE + 12345)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let data = Bytes::from(data);
    let mut w = tier.create("d/obj").await.expect("create");
    let mut rest = data.clone();
    for n in [1, MIN_PART_SIZE - 1, 3 << 20, usize::MAX] {
        let piece = rest.split_to(n.min(rest.len()));
        w.write(piece).await.expect("write");
    }
    w.finish().await.expect("finish");
    assert_eq!(tier.get("d/obj").await.expect("get"), data);
    let key = tier.object_key("d/obj").expect("key");
    assert!(
        object_store::ObjectStoreExt::head(store.as_ref(), &key)
            .await
            .is_ok()
    );

    // Exactly one part: a single PUT; an empty object too.
    for (path, len) in [("one", MIN_PART_SIZE), ("empty", 0)] {
        let mut w = tier.create(path).await.expect("create");
        w.write(data.slice(..len)).await.expect("write");
        w.finish().await.expect("finish");
        assert_eq!(tier.size(path).await.expect("size"), len as u64);
    }

    let mut w = tier.create("d/aborted").await.expect("create");
    w.write(data.clone()).await.expect("write");
    w.abort().await.expect("abort");
    let mut buf = vec![0u8; 100];
    tier.read_into("d/obj", MIN_PART_SIZE as u64 - 50, &mut buf)
        .await
        .expect("read_into");
    assert_eq!(buf[..], data[MIN_PART_SIZE - 50..MIN_PART_SIZE + 50]);
    let listed: Vec<String> = tier
        .list("")
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.path)
        .collect();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(!listed.iter().any(|p| p.contains("aborted")), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_create_range_and_list_semantics() {
    for conditional in [true, false] {
        let (_store, tier) = mem_tier(conditional);
        tier.put("m", Bytes::from_static(b"1"), PutMode::Create)
            .await
            .expect("create");
        let e = tier
            .put("m", Bytes::from_static(b"2"), PutMode::Create)
            .await
            .expect_err("twice");
        assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");
        tier.put("a/x", Bytes::from_static(b"0123"), PutMode::Overwrite)
            .await
            .expect("put");
        tier.put("a/xy", Bytes::from_static(b"z"), PutMode::Overwrite)
            .await
            .expect("put");
        assert_eq!(
            &tier.get_range("a/x", 1..3).await.expect("range")[..],
            b"12"
        );
        for r in [2..5, 4..5, 5..5] {
            let e = tier
                .get_range("a/x", r.clone())
                .await
                .expect_err("past end");
            assert!(matches!(e, Error::Incomplete { .. }), "{r:?}: {e}");
        }
        assert!(matches!(tier.size("zz").await, Err(Error::NotFound { .. })));
        let mut l: Vec<String> = tier
            .list("a/x")
            .await
            .expect("list")
            .into_iter()
            .map(|o| o.path)
            .collect();
        l.sort();
        assert_eq!(l, ["a/x", "a/xy"]);
        tier.delete("a/x").await.expect("delete");
        tier.delete("a/x").await.expect("delete absent");
        assert_eq!(tier.list("a/").await.expect("list").len(), 1);
    }
}

mod counting {
    //! An in-memory store that counts requests and measures how many parts
    //! upload at once.

    use std::fmt;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::time::Duration;

    use async_trait::async_trait;
    use futures::stream::BoxStream;
    use object_store::memory::InMemory;
    use object_store::path::Path;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
        PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
    };

    #[derive(Debug, Default)]
    pub(super) struct Counts {
        pub puts: AtomicUsize,
        pub uploads: AtomicUsize,
        pub parts: AtomicUsize,
        pub aborts: AtomicUsize,
        pub in_flight: AtomicUsize,
        pub max_in_flight: AtomicUsize,
    }

    #[derive(Debug, Default)]
    pub(super) struct Counting {
        pub inner: InMemory,
        pub counts: std::sync::Arc<Counts>,
    }

    impl fmt::Display for Counting {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "Counting({})", self.inner)
        }
    }

    #[async_trait]
    impl ObjectStore for Counting {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.counts.puts.fetch_add(1, SeqCst);
            self.inner.put_opts(location, payload, opts).await
        }

        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.counts.uploads.fetch_add(1, SeqCst);
            let inner = self.inner.put_multipart_opts(location, opts).await?;
            Ok(Box::new(CountingUpload {
                inner,
                counts: self.counts.clone(),
            }))
        }

        async fn get_opts(
            &self,
            location: &Path,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            self.inner.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<Path>>,
        ) -> BoxStream<'static, object_store::Result<Path>> {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &Path,
            to: &Path,
            options: CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    #[derive(Debug)]
    struct CountingUpload {
        inner: Box<dyn MultipartUpload>,
        counts: std::sync::Arc<Counts>,
    }

    #[async_trait]
    impl MultipartUpload for CountingUpload {
        fn put_part(&mut self, data: PutPayload) -> UploadPart {
            self.counts.parts.fetch_add(1, SeqCst);
            let part = self.inner.put_part(data);
            let c = self.counts.clone();
            Box::pin(async move {
                let now = c.in_flight.fetch_add(1, SeqCst) + 1;
                c.max_in_flight.fetch_max(now, SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                let r = part.await;
                c.in_flight.fetch_sub(1, SeqCst);
                r
            })
        }

        async fn complete(&mut self) -> object_store::Result<PutResult> {
            self.inner.complete().await
        }

        async fn abort(&mut self) -> object_store::Result<()> {
            self.counts.aborts.fetch_add(1, SeqCst);
            self.inner.abort().await
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_objects_are_one_put_large_ones_bounded_multipart() {
    use std::sync::atomic::Ordering::SeqCst;
    let store = Arc::new(counting::Counting::default());
    let counts = store.counts.clone();
    let tier = ObjectTier::with_config(
        store.clone(),
        "",
        "mem://counting",
        ObjectTierConfig::default()
            .with_part_size(MIN_PART_SIZE)
            .with_max_parts_in_flight(2),
    )
    .expect("tier");

    // Up to one part: a single PUT, no multipart upload.
    let mut w = tier.create("small").await.expect("create");
    w.write(Bytes::from(vec![7u8; MIN_PART_SIZE - 10]))
        .await
        .expect("write");
    w.write(Bytes::from(vec![8u8; 10])).await.expect("write");
    w.finish().await.expect("finish");
    assert_eq!(
        (counts.puts.load(SeqCst), counts.uploads.load(SeqCst)),
        (1, 0)
    );

    // Six parts and a byte, written as one buffer: one upload, seven parts,
    // never more than two uploading at once.
    let big = Bytes::from(vec![1u8; 6 * MIN_PART_SIZE + 1]);
    let mut w = tier.create("big").await.expect("create");
    w.write(big.clone()).await.expect("write");
    w.finish().await.expect("finish");
    assert_eq!(counts.uploads.load(SeqCst), 1);
    assert_eq!(counts.parts.load(SeqCst), 7);
    assert_eq!(counts.max_in_flight.load(SeqCst), 2);
    assert_eq!(tier.size("big").await.expect("size"), big.len() as u64);

    // Abort and drop both abort the upload.
    let mut w = tier.create("gone").await.expect("create");
    w.write(big.slice(..3 * MIN_PART_SIZE))
        .await
        .expect("write");
    w.abort().await.expect("abort");
    assert_eq!(counts.aborts.load(SeqCst), 1);
    let mut w = tier.create("dropped").await.expect("create");
    w.write(big.slice(..3 * MIN_PART_SIZE))
        .await
        .expect("write");
    drop(w);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while counts.aborts.load(SeqCst) < 2 {
        assert!(std::time::Instant::now() < deadline, "drop did not abort");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let listed: Vec<String> = tier
        .list("")
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.path)
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
}

/// The conformance suite every tier passes, over `object_store`'s
/// `InMemory` store (which honours conditional puts): the object tier is
/// checked even where no S3 server runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_on_in_memory_store() {
    let (_store, tier) = mem_tier(true);
    crate::conformance::run_all(Arc::new(tier)).await;
}

/// `InMemory` honours conditional puts under a race: the probe says so,
/// leaves nothing behind, and is asked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_finds_in_memory_atomic() {
    let (store, tier) = mem_tier(true);
    assert_eq!(tier.create_guarantee().await, CreateGuarantee::Atomic);
    assert!(tier.list("").await.expect("list").is_empty());
    let listed = store.list(None).count().await;
    assert_eq!(listed, 0, "probe objects left in the store");
    assert_eq!(tier.create_guarantee().await, CreateGuarantee::Atomic);
    let (_, off) = mem_tier(false);
    assert_eq!(off.create_guarantee().await, CreateGuarantee::Ignored);
}
