//! The agent's state directory: its private key, its certificate, the pinned CA and where the server is.
//! Every file is mode 0600; the directory 0700.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentState {
    /// `HOST:PORT` of the server's tunnel listener.
    pub server: String,
    pub device_id: String,
}

pub struct StateDir(PathBuf);

impl StateDir {
    pub fn new(dir: &Path) -> Self {
        StateDir(dir.to_owned())
    }

    pub fn key(&self) -> PathBuf {
        self.0.join("device.key")
    }
    pub fn cert(&self) -> PathBuf {
        self.0.join("device.crt")
    }
    pub fn ca(&self) -> PathBuf {
        self.0.join("ca.crt")
    }
    pub fn state(&self) -> PathBuf {
        self.0.join("agent.json")
    }

    pub fn create(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.0)
            .with_context(|| format!("creating state directory {}", self.0.display()))
    }

    /// Write a file readable by the owner only, replacing it atomically.
    pub fn write_private(&self, path: &Path, contents: &[u8]) -> anyhow::Result<()> {
        proxyfleet_proto::file::write_private(path, contents)
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn read(&self, path: &Path) -> anyhow::Result<Vec<u8>> {
        std::fs::read(path).with_context(|| {
            format!(
                "reading {} (has this device been enrolled with `proxyfleet-agent enroll`?)",
                path.display()
            )
        })
    }

    pub fn load(&self) -> anyhow::Result<AgentState> {
        let bytes = self.read(&self.state())?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not valid agent state", self.state().display()))
    }
}
