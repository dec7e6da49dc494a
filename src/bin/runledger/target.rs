//! Where the commands connect: the global flags (`--redis`, `--prefix`,
//! `--cluster`, `--sentinel-master`, `--wait-replicas`, `--tls-ca`) as one value every command takes.

/// Where the commands connect, from the global flags.
#[derive(Clone)]
pub struct Target {
    /// `--redis` / `REDIS_URL`, if given.
    pub url: Option<String>,
    pub prefix: String,
    pub cluster: bool,
    /// `--sentinel-master`: the URL names sentinels of the master of this name.
    pub sentinel_master: Option<String>,
    pub wait_replicas: u32,
    /// `--tls-ca` / `RUNLEDGER_TLS_CA`, if given.
    pub tls_ca: Option<std::path::PathBuf>,
}

impl Target {
    /// The store settings these flags ask for, with another prefix.
    pub fn config(&self, prefix: &str) -> runledger::StoreConfig {
        runledger::StoreConfig {
            prefix: prefix.to_string(),
            cluster: self.cluster,
            sentinel_master: self.sentinel_master.clone(),
            wait_replicas: self.wait_replicas,
            tls_ca_file: self.tls_ca.clone(),
            ..Default::default()
        }
    }
}
