//! Workdirs on an S3-compatible server: moto in server mode (installed by
//! `scripts/setup.sh`) on 127.0.0.1, which honours conditional writes as
//! S3 does. Every genecis process gets its own mirror, as processes on
//! different machines would.
#![cfg(feature = "s3")]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// A moto server, stopped when dropped. (A workdir `s3://B/P` is mirrored
/// at `$GENECIS_MIRROR/B/P`.)
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let child = Command::new(root.join(".venv/bin/python"))
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto is installed by scripts/setup.sh (make setup)");
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(60), "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, port }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// boto3 against this server: `code` sees `s3`, a client.
    fn boto(&self, code: &str) -> String {
        python(&format!(
            "import boto3, botocore\n\
             s3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='testing')\n{code}",
            self.endpoint()
        ))
    }

    /// genecis with this server's endpoint and credentials, and `mirror`
    /// as its local mirror.
    fn genecis(&self, mirror: &Path, args: &[&str]) -> Command {
        let mut c = bin();
        c.args(args)
            .env("AWS_ENDPOINT_URL", self.endpoint())
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("GENECIS_MIRROR", mirror);
        c
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server refuses a second create of one key (If-None-Match: *), which
/// is what put-if-absent relies on.
fn honours_conditional_writes(moto: &Moto) {
    let out = moto.boto(
        "s3.create_bucket(Bucket='probe')\n\
         s3.put_object(Bucket='probe', Key='k', Body=b'first', IfNoneMatch='*')\n\
         try:\n    s3.put_object(Bucket='probe', Key='k', Body=b'second', IfNoneMatch='*'); print('overwrote')\n\
         except botocore.exceptions.ClientError as e:\n    print('refused', e.response['Error']['Code'])\n\
         print(s3.get_object(Bucket='probe', Key='k')['Body'].read().decode())",
    );
    assert!(
        out.contains("refused PreconditionFailed") && out.contains("first"),
        "moto does not honour If-None-Match: {out}"
    );
}

/// Three processes (shards 0/2 and 1/2, shard 1 twice), each with its own
/// mirror, commit one stage to an S3 bucket: one log version, the tables
/// byte-identical to an unsharded local run; `status` and `sql` from a
/// fourth mirror read it.
#[test]
fn shards_on_s3_commit_once_and_match_a_local_run() {
    let moto = Moto::start();
    honours_conditional_writes(&moto);
    moto.boto("s3.create_bucket(Bucket='runs')");
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("data.tsv"), 1_000);
    let m = ingest_manifest(dir.path(), "data.tsv", ", chunk_rows = 100");
    let m = m.to_str().unwrap();
    let url = "s3://runs/team/cc3m";
    let children: Vec<_> = ["0/2", "1/2", "1/2"]
        .iter()
        .enumerate()
        .map(|(i, s)| {
            moto.genecis(
                &dir.path().join(format!("mirror{i}")),
                &["run", m, "-q", "--workdir", url, "--shard", s],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let mut all = String::new();
    for c in children {
        let r: Res = c.wait_with_output().unwrap().into();
        all.push_str(&r.ok().stdout);
    }
    assert_eq!(all.matches("+ captions (").count(), 1, "{all}");
    let log = moto.boto(
        "print(s3.list_objects_v2(Bucket='runs', Prefix='team/cc3m/captions/_log/')['KeyCount'])",
    );
    assert_eq!(log.trim(), "1", "one log version");

    let reader = dir.path().join("mirror-reader");
    let st: Res = moto
        .genecis(&reader, &["status", m, "--workdir", url])
        .output()
        .unwrap()
        .into();
    assert!(
        st.ok().stdout.contains("captions             done"),
        "{}",
        st.stdout
    );
    let q: Res = moto
        .genecis(
            &reader,
            &[
                "sql",
                url,
                "SELECT count(*) AS n FROM captions",
                "--format",
                "csv",
            ],
        )
        .output()
        .unwrap()
        .into();
    assert_eq!(q.ok().stdout.lines().nth(1), Some("1000"), "{}", q.stdout);

    let local = dir.path().join("local");
    genecis(&["run", m, "-q", "--workdir", local.to_str().unwrap()]).ok();
    for table in ["captions", "rejects"] {
        assert!(
            parts(&reader.join("runs/team/cc3m/captions").join(table))
                == parts(&local.join("captions").join(table)),
            "{table}: the S3 run differs from the local one"
        );
    }
    // A rerun from yet another machine finds the stage done.
    let again: Res = moto
        .genecis(
            &dir.path().join("mirror-late"),
            &["run", m, "--workdir", url],
        )
        .output()
        .unwrap()
        .into();
    assert!(
        again.ok().stdout.contains("captions (ingest): up to date"),
        "{}",
        again.stdout
    );
}

/// A whole evaluation pipeline (templates -> embed -> score) on S3: each
/// stage reads its inputs from the bucket (through a fresh mirror per
/// stage) and the score stage's side files (the report) are in the bucket;
/// the results equal a local run's.
#[test]
fn an_evaluation_pipeline_runs_on_s3() {
    let moto = Moto::start();
    moto.boto("s3.create_bucket(Bucket='runs')");
    let tmp = tempfile::tempdir().unwrap();
    let w = crate::eval::small_world(tmp.path());
    let m = crate::eval::manifest(tmp.path(), &w, false);
    let m = m.to_str().unwrap();
    let url = "s3://runs/eval";
    for stage in ["templates", "embed", "score"] {
        let r: Res = moto
            .genecis(
                &tmp.path().join(format!("mirror-{stage}")),
                &["run", m, "-q", "--workdir", url, "--only", stage],
            )
            .output()
            .unwrap()
            .into();
        r.ok();
    }
    let keys = moto.boto(
        "print('\\n'.join(o['Key'] for o in s3.list_objects_v2(Bucket='runs', Prefix='eval/score/')['Contents']))",
    );
    assert!(keys.contains("/report.html"), "{keys}");
    let local = tmp.path().join("local");
    genecis(&["run", m, "-q", "--workdir", local.to_str().unwrap()]).ok();
    let reader = tmp.path().join("mirror-reader");
    let q = "SELECT task, method, recall_at_1 FROM results ORDER BY task, method";
    let on_s3: Res = moto
        .genecis(&reader, &["sql", url, q, "--format", "csv"])
        .output()
        .unwrap()
        .into();
    assert_eq!(on_s3.ok().stdout, sql_csv(&local, q).join("\n") + "\n");
    assert!(
        parts(&reader.join("runs/eval/score/results")) == parts(&local.join("score/results")),
        "results differ"
    );
}
