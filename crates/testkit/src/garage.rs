//! A real single-node Garage S3 service for tests, started in a temporary folder and stopped
//! on drop. The binary comes from `$MEDLEDGER_GARAGE`, else `~/.cache/medledger/garage/bin`,
//! else `PATH`; `scripts/test` installs it there (`scripts/install-garage`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Garage node with one bucket and one access key allowed on it.
#[derive(Debug)]
pub struct Garage {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    child: Child,
    config: PathBuf,
    binary: PathBuf,
    _dir: tempfile::TempDir,
}

/// Where the Garage binary is.
pub fn garage_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MEDLEDGER_GARAGE") {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = Path::new(&home).join(".cache/medledger/garage/bin/garage");
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from("garage")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

impl Garage {
    /// Starts a node and creates a bucket and key. Panics, saying how to install Garage, if
    /// the binary is missing: a skipped S3 test would pass without testing anything.
    pub fn start() -> Garage {
        let binary = garage_binary();
        let version = Command::new(&binary).arg("--version").output();
        assert!(
            version.as_ref().is_ok_and(|o| o.status.success()),
            "Garage not found at {} ({version:?}): run scripts/install-garage (scripts/test \
             does) or set MEDLEDGER_GARAGE",
            binary.display()
        );
        let dir = tempfile::tempdir().expect("temporary folder");
        let (s3, rpc, admin) = (free_port(), free_port(), free_port());
        let secret: String = (0..32)
            .map(|i| format!("{:02x}", (i * 37 + s3 as usize) % 256))
            .collect();
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                meta = dir.path().join("meta").display(),
                data = dir.path().join("data").display(),
            ),
        )
        .expect("write garage.toml");
        let log = std::fs::File::create(dir.path().join("server.log")).expect("log file");
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start garage");
        let mut g = Garage {
            endpoint: format!("http://127.0.0.1:{s3}"),
            region: "garage".into(),
            bucket: "medledger-test".into(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            child,
            config,
            binary,
            _dir: dir,
        };
        let node = g.retry("node id -q", |out| {
            out.trim()
                .split('@')
                .next()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        });
        g.admin(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        g.admin(&["layout", "apply", "--version", "1"]);
        g.admin(&["bucket", "create", "medledger-test"]);
        let key = g.admin(&["key", "create", "medledger-test-key"]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("no {name} in garage output:\n{key}"))
        };
        g.access_key_id = field("Key ID:");
        g.secret_access_key = field("Secret key:");
        g.admin(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            "medledger-test",
            "--key",
            "medledger-test-key",
        ]);
        g
    }

    fn run(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
    }

    /// Runs an admin command. `node id` answers before the server's RPC listener is up, so
    /// a command that cannot connect yet is tried again for up to 30 s; any other failure
    /// fails at once.
    fn admin(&mut self, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.run(args).expect("run garage");
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            let starting = err.contains("Unable to connect") || err.contains("Connection refused");
            let exited = self.child.try_wait().ok().flatten();
            assert!(
                starting && exited.is_none() && Instant::now() < deadline,
                "garage {args:?} failed: {err}(server: {exited:?}, log: {})",
                std::fs::read_to_string(self._dir.path().join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a command until the node answers and `parse` accepts the output.
    fn retry(&self, args: &str, parse: impl Fn(&str) -> Option<String>) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let args: Vec<&str> = args.split(' ').collect();
            if let Ok(out) = self.run(&args)
                && out.status.success()
                && let Some(v) = parse(&String::from_utf8_lossy(&out.stdout))
            {
                return v;
            }
            assert!(Instant::now() < deadline, "garage did not start in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The environment a `medledger` command needs to reach this node as `s3://bucket/...`.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
