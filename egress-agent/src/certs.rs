//! Placeholder until the per-actor certificate store lands (replaced on merge).
use serde::Deserialize;

/// Where per-actor certificates come from.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "source", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// Files written by the runtime.
    Files {
        /// The directory.
        dir: std::path::PathBuf,
    },
}

impl SourceConfig {
    /// `files` or `signer`.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Files { .. } => "files",
        }
    }
}
