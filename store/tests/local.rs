//! The store on the local-directory backend: commit point, listing, verification, corruption
//! fallback, retention and multipart uploads.

use atoll_store::{block_on, CheckpointStore, ResumeFrom, Snapshot, StoreOptions, MANIFEST};
use std::path::Path;

fn snapshot(step: u64, big: usize) -> Snapshot {
    let mut s = Snapshot::new(step, "trainer");
    s.add("config.json", format!("{{\"step\": {step}}}").into_bytes());
    // Deterministic, step-dependent content so a stale file would be noticed.
    let bytes: Vec<u8> = (0..big)
        .map(|i| ((i as u64 * 31 + step) % 251) as u8)
        .collect();
    s.add("model.safetensors", bytes);
    s
}

fn open(dir: &Path) -> CheckpointStore {
    CheckpointStore::open(
        dir.to_str().unwrap(),
        StoreOptions {
            part_size: 5 << 20,
            ..StoreOptions::default()
        },
    )
    .unwrap()
}

#[test]
fn a_checkpoint_exists_only_once_its_manifest_is_written_and_loads_back_verified() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    block_on(async {
        // 12 MiB > the 5 MiB part size: a multipart upload of three parts.
        let written = store.write(snapshot(10, 12 << 20)).await.unwrap();
        assert_eq!(written.files.len(), 2);
        assert_eq!(written.total_bytes(), (12 << 20) + 12);
        let loaded = store.load(10).await.unwrap();
        assert_eq!(loaded.file("model.safetensors").unwrap().len(), 12 << 20);
        assert_eq!(
            loaded.file("model.safetensors").unwrap()[..],
            snapshot(10, 12 << 20).files[1].1[..]
        );
        assert!(store.verify(10).await.unwrap().is_empty());

        // A half-written checkpoint (files, no manifest) is listed but not committed.
        std::fs::create_dir_all(dir.path().join("step-20")).unwrap();
        std::fs::write(dir.path().join("step-20/model.safetensors"), b"partial").unwrap();
        let listed = store.list().await.unwrap();
        assert_eq!(
            listed.iter().map(|l| l.step).collect::<Vec<_>>(),
            vec![10, 20]
        );
        assert!(listed[1].manifest.is_none());
        assert_eq!(store.committed().await.unwrap(), vec![10]);
        let latest = store
            .load_resume(ResumeFrom::Latest)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(latest.manifest.step, 10);
        let e = store.load(20).await.unwrap_err().to_string();
        assert!(e.contains("not a committed checkpoint"), "{e}");
    })
    .unwrap();
}

#[test]
fn corruption_is_detected_and_latest_falls_back_to_the_newest_intact_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    block_on(async {
        for step in [5, 10, 15] {
            store.write(snapshot(step, 1000)).await.unwrap();
        }
        // Flip one byte in step-15 (same size: only the digest catches it) and drop a file of
        // step-10.
        let victim = dir.path().join("step-15/model.safetensors");
        let mut bytes = std::fs::read(&victim).unwrap();
        bytes[500] ^= 1;
        std::fs::write(&victim, bytes).unwrap();
        std::fs::remove_file(dir.path().join("step-10/config.json")).unwrap();

        let problems = store.verify(15).await.unwrap();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].file, "model.safetensors");
        assert!(problems[0].what.contains("sha256"), "{}", problems[0]);
        let problems = store.verify(10).await.unwrap();
        assert_eq!(problems[0].file, "config.json");
        assert_eq!(problems[0].what, "missing");
        let e = format!("{:#}", store.load(15).await.unwrap_err());
        assert!(
            e.contains("step-15/model.safetensors") && e.contains("sha256"),
            "{e}"
        );

        let latest = store
            .load_resume(ResumeFrom::Latest)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(latest.manifest.step, 5, "15 and 10 are corrupt");
        assert!(store.load_resume(ResumeFrom::Step(15)).await.is_err());

        // Truncation: a size mismatch.
        std::fs::write(dir.path().join("step-5/config.json"), b"{").unwrap();
        let problems = store.verify(5).await.unwrap();
        assert!(problems[0].what.contains("size 1 B"), "{}", problems[0]);
        assert!(store
            .load_resume(ResumeFrom::Latest)
            .await
            .unwrap()
            .is_none());
        let problems = store.verify(99).await.unwrap();
        assert_eq!(problems[0].file, MANIFEST);
    })
    .unwrap();
}

#[test]
fn retention_keeps_the_last_n_and_every_kth_and_clears_stale_partials() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    block_on(async {
        std::fs::create_dir_all(dir.path().join("step-3")).unwrap();
        std::fs::write(dir.path().join("step-3/model.safetensors"), b"crashed").unwrap();
        for step in (10..=70).step_by(10) {
            store.write(snapshot(step, 100)).await.unwrap();
        }
        let deleted = store.apply_retention(2, Some(30)).await.unwrap();
        assert_eq!(deleted, vec![3, 10, 20, 40, 50]);
        assert_eq!(store.committed().await.unwrap(), vec![30, 60, 70]);
        assert!(!dir.path().join("step-10").exists());
        // Nothing newer than the newest commit is touched: it may be an upload in progress.
        std::fs::create_dir_all(dir.path().join("step-80")).unwrap();
        std::fs::write(dir.path().join("step-80/model.safetensors"), b"uploading").unwrap();
        assert!(store.apply_retention(2, Some(30)).await.unwrap().is_empty());
        assert!(dir.path().join("step-80/model.safetensors").exists());
    })
    .unwrap();
}

#[test]
fn rewriting_a_step_replaces_it_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    block_on(async {
        store.write(snapshot(7, 100)).await.unwrap();
        let mut other = snapshot(7, 200);
        other.files.truncate(1);
        other.add("model.safetensors", vec![9u8; 200]);
        store.write(other).await.unwrap();
        let loaded = store.load(7).await.unwrap();
        assert_eq!(
            loaded.file("model.safetensors").unwrap()[..],
            vec![9u8; 200][..]
        );
    })
    .unwrap();
}

#[test]
fn resume_names_parse() {
    assert_eq!("latest".parse::<ResumeFrom>().unwrap(), ResumeFrom::Latest);
    assert_eq!(
        "step-40".parse::<ResumeFrom>().unwrap(),
        ResumeFrom::Step(40)
    );
    assert_eq!("40".parse::<ResumeFrom>().unwrap(), ResumeFrom::Step(40));
    let e = "newest".parse::<ResumeFrom>().unwrap_err().to_string();
    assert!(e.contains("latest") && e.contains("step-N"), "{e}");
}

/// Deferred files are built one builder at a time, each one's files uploaded before the next
/// builder runs (so a snapshot of a large model is never all in memory serialised), and the
/// manifest lists every file in snapshot order: the eager files, then each builder's.
#[test]
fn deferred_builders_run_one_at_a_time_after_the_previous_upload() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut s = snapshot(30, 1000);
    for shard in 0..3 {
        let step_dir = dir.path().join("step-30");
        s.defer(move || {
            for earlier in 0..shard {
                let path = step_dir.join(format!("shard-{earlier}.bin"));
                assert!(
                    path.exists(),
                    "shard {earlier} not uploaded before shard {shard}"
                );
            }
            let later = step_dir.join(format!("shard-{}.bin", shard + 1));
            assert!(!later.exists(), "shard {} built too early", shard + 1);
            Ok(vec![(
                format!("shard-{shard}.bin"),
                vec![shard as u8; 4096],
            )])
        });
    }
    let written = block_on(store.write(s)).unwrap().unwrap();
    let names: Vec<&str> = written.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        names,
        [
            "config.json",
            "model.safetensors",
            "shard-0.bin",
            "shard-1.bin",
            "shard-2.bin"
        ]
    );
    let loaded = block_on(store.load(30)).unwrap().unwrap();
    assert_eq!(loaded.file("shard-2.bin").unwrap()[..], [2u8; 4096][..]);
    assert!(block_on(store.verify(30)).unwrap().unwrap().is_empty());
}
