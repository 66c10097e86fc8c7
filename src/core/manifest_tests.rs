//! Longhorn's documented examples as written, and every way a manifest can be wrong.

use super::*;

const SUM: &str = "304f3ed30ca6878e9056ee6f1b02b328239f0d0c2c1272840998212f9734b196371560b3b939037e4f4c2884ce457c2cbc9f0621f4f5d1ca983983c8cdf8cd9a";

/// The seed's first BackingImage example, verbatim.
const SEED_DOWNLOAD: &str = "apiVersion: longhorn.io/v1beta1
kind: BackingImage
metadata:
  name: bi-download
  namespace: longhorn-system
spec:
  sourceType: download
  sourceParameters:
    url: https://longhorn-backing-image.s3-us-west-1.amazonaws.com/parrot.raw
  checksum: 304f3ed30ca6878e9056ee6f1b02b328239f0d0c2c1272840998212f9734b196371560b3b939037e4f4c2884ce457c2cbc9f0621f4f5d1ca983983c8cdf8cd9a
";

/// The seed's second BackingImage example, verbatim.
const SEED_EXPORT: &str = "apiVersion: longhorn.io/v1beta1
kind: BackingImage
metadata:
  name: bi-export
  namespace: longhorn-system
spec:
  sourceType: export-from-volume
  sourceParameters:
    volume-name: vol-export-src
    export-type: qcow2
";

fn err(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

fn one(text: &str) -> ImageSpec {
    let docs = parse(text).unwrap();
    assert_eq!(docs.len(), 1, "{docs:?}");
    match docs.into_iter().next().unwrap().wanted {
        Wanted::Create(spec) => spec,
        other => panic!("expected a spec, got {other:?}"),
    }
}

#[test]
fn the_seed_download_example_reads_as_written() {
    let spec = one(SEED_DOWNLOAD);
    assert_eq!(
        spec,
        ImageSpec::download(
            "bi-download",
            "https://longhorn-backing-image.s3-us-west-1.amazonaws.com/parrot.raw",
            SUM
        )
    );
}

#[test]
fn the_seed_export_example_reads_as_written() {
    let spec = one(SEED_EXPORT);
    assert_eq!(spec.name, "bi-export");
    assert_eq!(spec.source_type, SourceType::ExportFromVolume);
    assert_eq!(spec.source_parameters["volume-name"], "vol-export-src");
    assert_eq!(spec.source_parameters["export-type"], "qcow2");
}

#[test]
fn several_documents_separated_by_dashes() {
    let text = format!("---\n{SEED_DOWNLOAD}---\n# only a comment\n---\n{SEED_EXPORT}");
    let docs = parse(&text).unwrap();
    let names: Vec<&str> = docs.iter().map(|d| d.wanted.name()).collect();
    assert_eq!(names, ["bi-download", "bi-export"]);
    assert_eq!(docs[1].kind, "BackingImage");
    assert!(
        docs[1].line > 10,
        "line of the second document: {}",
        docs[1].line
    );
}

#[test]
fn two_documents_without_dashes_say_to_separate_them() {
    // The seed's page shows both examples one after the other; pasted as is they are
    // one mapping with every key twice.
    let e = err(&format!("{SEED_DOWNLOAD}{SEED_EXPORT}"));
    assert!(
        e.contains("line 11: apiVersion: given twice (first on line 1)") && e.contains("---"),
        "{e}"
    );
}

#[test]
fn newer_fields_are_read_and_tags_sorted() {
    let spec = one(&format!(
        "{SEED_DOWNLOAD}  minNumberOfCopies: 2\n  nodeSelector: [zone-b, ssd, ssd]\n  diskSelector:\n  - fast\n"
    )
    .replace("v1beta1", "v1beta2"));
    assert_eq!(spec.min_number_of_copies, 2);
    assert_eq!(spec.node_selector, ["ssd", "zone-b"]);
    assert_eq!(spec.disk_selector, ["fast"]);
}

#[test]
fn unknown_fields_are_named_with_their_line() {
    let e = err(&SEED_DOWNLOAD.replace("  checksum:", "  checksumm:"));
    assert!(
        e.starts_with("line 10: spec.checksumm: unknown field"),
        "{e}"
    );
    let e = err(&SEED_DOWNLOAD.replace("    url:", "    uri:"));
    assert!(
        e.starts_with("line 9: spec.sourceParameters.uri: unknown parameter"),
        "{e}"
    );
    let e = err(&format!("{SEED_DOWNLOAD}extra: 1\n"));
    assert!(e.starts_with("line 11: extra: unknown field"), "{e}");
}

#[test]
fn unknown_kinds_and_versions_are_named() {
    let e = err(&SEED_DOWNLOAD.replace("kind: BackingImage", "kind: Volume"));
    assert!(
        e.starts_with("line 2: kind: \"Volume\" is not a kind"),
        "{e}"
    );
    let e = err(&SEED_DOWNLOAD.replace("longhorn.io/v1beta1", "longhorn.io/v1"));
    assert!(e.starts_with("line 1: apiVersion:"), "{e}");
}

#[test]
fn an_unknown_source_type_is_named() {
    let e = err(&SEED_DOWNLOAD.replace("sourceType: download", "sourceType: http"));
    assert!(
        e.starts_with("line 7: spec.sourceType: \"http\" is not a source type"),
        "{e}"
    );
}

#[test]
fn a_missing_url_is_named() {
    let e = err(&SEED_DOWNLOAD.replace(
        "    url: https://longhorn-backing-image.s3-us-west-1.amazonaws.com/parrot.raw\n",
        "",
    ));
    assert!(e.contains("spec.sourceParameters.url: is missing"), "{e}");
    let e = err(&SEED_DOWNLOAD.replace("https://longhorn", "ftp://longhorn"));
    assert!(e.starts_with("line 9: spec.sourceParameters.url:"), "{e}");
}

#[test]
fn bad_names_and_checksums_are_named() {
    let e = err(&SEED_DOWNLOAD.replace("name: bi-download", "name: BI_Download"));
    assert!(
        e.starts_with("line 4: metadata.name: invalid image name"),
        "{e}"
    );
    let e = err(&SEED_DOWNLOAD.replace(SUM, "abc"));
    assert!(
        e.starts_with("line 10: spec.checksum: invalid checksum"),
        "{e}"
    );
    let sha256 = format!("sha256:{}", "ab".repeat(32));
    assert_eq!(one(&SEED_DOWNLOAD.replace(SUM, &sha256)).checksum, sha256);
}

#[test]
fn bad_yaml_names_its_line() {
    let e = err("apiVersion: longhorn.io/v1beta1\nkind: BackingImage\nmetadata:\n  name: [x\n");
    assert!(e.contains("not valid YAML"), "{e}");
    let e = err("- a\n- b\n");
    assert!(e.contains("expected a mapping"), "{e}");
}

#[test]
fn an_alias_bomb_stops_at_the_node_budget() {
    let mut text = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let prev = (b'a' + i - 1) as char;
        let me = (b'a' + i) as char;
        text.push_str(&format!(
            "{me}: &{me} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
        ));
    }
    // 10^12 nodes if expanded; refused after a few hundred events.
    let e = err(&text);
    assert!(e.contains(&format!("more than {MAX_NODES} nodes")), "{e}");
}

#[test]
fn deep_nesting_and_huge_input_are_refused() {
    let deep = format!(
        "{}x{}",
        "[".repeat(MAX_DEPTH + 5),
        "]".repeat(MAX_DEPTH + 5)
    );
    assert!(err(&deep).contains("nests deeper"));
    let huge = format!("# {}\n", "x".repeat(MAX_INPUT_BYTES));
    assert!(err(&huge).contains("at most"));
}

#[test]
fn aliases_within_the_budget_work() {
    let text = "apiVersion: longhorn.io/v1beta2\nkind: BackingImage\nmetadata: {name: a}\n\
                spec:\n  sourceType: download\n  sourceParameters: &p {url: 'http://h/x'}\n";
    assert_eq!(one(text).url(), Some("http://h/x"));
}

#[test]
fn merge_keys_fill_in_what_a_mapping_does_not_give() {
    let text = "apiVersion: longhorn.io/v1beta2\nkind: BackingImage\nmetadata: {name: a}\n\
                spec: &base\n  sourceType: download\n  sourceParameters: {url: 'http://h/a'}\n\
                ---\napiVersion: longhorn.io/v1beta2\nkind: BackingImage\nmetadata: {name: b}\n\
                spec:\n  <<: *base\n  sourceParameters: {url: 'http://h/b'}\n";
    let docs = parse(text).unwrap();
    let urls: Vec<_> = docs
        .iter()
        .map(|d| match &d.wanted {
            Wanted::Create(s) => s.url().unwrap().to_string(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(urls, ["http://h/a", "http://h/b"]);
    // A chain of merges deeper than the limit is refused, not recursed into. The anchors
    // sit under metadata.labels, which bifs does not look into.
    let n = MAX_DEPTH + 2;
    let mut text = String::from(
        "apiVersion: longhorn.io/v1beta2\nkind: BackingImage\nmetadata:\n  name: a\n  labels:\n    a0: &a0 {sourceType: download}\n",
    );
    for i in 1..=n {
        text.push_str(&format!("    a{i}: &a{i} {{<<: *a{}}}\n", i - 1));
    }
    text.push_str(&format!("spec: {{<<: *a{n}}}\n"));
    let e = err(&text);
    assert!(e.contains("spec: merge keys (<<) chained deeper"), "{e}");
}

fn kv(pairs: &[&str]) -> Result<Wanted> {
    from_parameters(&pairs.iter().map(|s| s.to_string()).collect::<Vec<_>>())
}

#[test]
fn storage_class_parameters_as_the_seed_writes_them() {
    let w = kv(&[
        "numberOfReplicas=3",
        "staleReplicaTimeout=2880",
        "backingImage=bi-download",
        "backingImageDataSourceType=download",
        r#"backingImageDataSourceParameters={"url": "https://backing-image-example.s3-region.amazonaws.com/test-backing-image"}"#,
        &format!("backingImageChecksum={SUM}"),
    ])
    .unwrap();
    assert_eq!(
        w,
        Wanted::Create(ImageSpec::download(
            "bi-download",
            "https://backing-image-example.s3-region.amazonaws.com/test-backing-image",
            SUM
        ))
    );
    // JSON's own `\/` escape is a '/', as Longhorn's JSON decoding reads it.
    let w = kv(&[
        "backingImage=x",
        "backingImageDataSourceType=download",
        r#"backingImageDataSourceParameters={"url": "https:\/\/h\/x"}"#,
    ])
    .unwrap();
    assert_eq!(
        w,
        Wanted::Create(ImageSpec::download("x", "https://h/x", ""))
    );
}

#[test]
fn storage_class_mistakes_name_the_parameter() {
    let base = ["backingImage=x", "backingImageDataSourceType=download"];
    let e = kv(&[
        base[0],
        base[1],
        "backingImageDataSourceParameters={url: h}",
    ])
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("backingImageDataSourceParameters: not JSON"),
        "{e}"
    );
    let e = kv(&[base[0], "backingImageDataSourceType=nfs"])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("backingImageDataSourceType: \"nfs\" is not a source type"),
        "{e}"
    );
    let e = kv(&base).unwrap_err().to_string();
    assert!(
        e.contains("backingImageDataSourceParameters: url is missing"),
        "{e}"
    );
    // A doubled backslash survives JSON decoding as one: the URL holds it.
    let e = kv(&[
        base[0],
        base[1],
        r#"backingImageDataSourceParameters={"url": "https:\\/\\/h/x"}"#,
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("backslash") && e.contains("remove every"), "{e}");
    let e = kv(&["backingImageName=x"]).unwrap_err().to_string();
    assert!(
        e.starts_with("backingImageName: unknown backing image parameter"),
        "{e}"
    );
    let e = kv(&["numberOfReplicas=3"]).unwrap_err().to_string();
    assert!(e.starts_with("backingImage: is missing"), "{e}");
    let e = kv(&["backingImage"]).unwrap_err().to_string();
    assert!(e.contains("KEY=VALUE"), "{e}");
    let e = kv(&[
        base[0],
        "backingImageChecksum=SHA512 checksum of the backing image",
    ])
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("backingImageChecksum: invalid checksum"),
        "{e}"
    );
}

#[test]
fn a_storage_class_naming_only_the_image_asks_for_its_existence() {
    assert_eq!(
        kv(&["backingImage=bi-download"]).unwrap(),
        Wanted::Use {
            name: "bi-download".into(),
            checksum: String::new()
        }
    );
}

#[test]
fn a_storage_class_document_reads_its_parameters_with_lines() {
    let seed = r#"kind: StorageClass
apiVersion: storage.k8s.io/v1
metadata:
  name: longhorn-backing-image-example
provisioner: driver.longhorn.io
allowVolumeExpansion: true
reclaimPolicy: Delete
volumeBindingMode: Immediate
parameters:
  numberOfReplicas: "3"
  staleReplicaTimeout: "2880"
  backingImage: "bi-download"
  backingImageDataSourceType: "download"
  backingImageDataSourceParameters: '{"url": "https://backing-image-example.s3-region.amazonaws.com/test-backing-image"}'
  backingImageChecksum: "SHA512 checksum of the backing image"
"#;
    // As written, the checksum is a placeholder: named, with its line.
    let e = err(seed);
    assert!(
        e.starts_with("line 15: parameters.backingImageChecksum: invalid checksum"),
        "{e}"
    );
    let docs = parse(&seed.replace("SHA512 checksum of the backing image", SUM)).unwrap();
    assert_eq!(docs[0].kind, "StorageClass");
    assert_eq!(
        docs[0].wanted,
        Wanted::Create(ImageSpec::download(
            "bi-download",
            "https://backing-image-example.s3-region.amazonaws.com/test-backing-image",
            SUM
        ))
    );
    let e = err(&seed
        .replace("SHA512 checksum of the backing image", SUM)
        .replace("'{\"url\"", "'{url"));
    assert!(
        e.starts_with("line 14: parameters.backingImageDataSourceParameters: not JSON"),
        "{e}"
    );
}

proptest::proptest! {
    /// Whatever the input, parsing answers Ok or a BadInput naming a line, and never panics
    /// (the CLI and the --manifests watcher feed it files as they find them).
    #[test]
    fn any_input_gives_a_document_list_or_an_error_with_a_line(
        s in "[-:&*\\[\\]{}#|>'\" \\na-zA-Z0-9!,?.]{0,300}"
    ) {
        match parse(&s) {
            Ok(_) => {}
            Err(Error::BadInput(msg)) => proptest::prop_assert!(
                msg.starts_with("line ") || msg.starts_with("the manifest is"),
                "{msg}"
            ),
            Err(e) => proptest::prop_assert!(false, "unexpected error kind: {e:?}"),
        }
    }
}
