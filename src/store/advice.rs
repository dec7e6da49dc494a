//! The Redis settings runledger recommends, checked against a live server, so
//! a worker can say at start what its Redis costs it (see the README, "Redis
//! settings").

use super::Store;
use crate::embedded::RECOMMENDED_CONFIG;
use crate::error::Result;

/// A setting of the server that falls short of what runledger recommends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigAdvice {
    pub name: String,
    pub actual: String,
    pub recommended: String,
}

impl Store {
    /// The settings of [`RECOMMENDED_CONFIG`] this server falls short of
    /// (numbers: a lower value; others: a different one). Empty when it
    /// refuses CONFIG GET, as managed Redis services often do.
    pub async fn config_advice(&self) -> Result<Vec<ConfigAdvice>> {
        let mut conn = self.conn().await?;
        let mut out = Vec::new();
        for (name, recommended) in RECOMMENDED_CONFIG {
            let pair: Vec<String> = match redis::cmd("CONFIG").arg("GET").arg(*name).query_async(&mut conn).await {
                Ok(pair) => pair,
                // Refused (CONFIG renamed away, ACL): nothing to say.
                Err(e) if matches!(e.kind(), redis::ErrorKind::Server(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            let Some(actual) = pair.get(1) else { continue };
            let short = match (actual.parse::<i64>(), recommended.parse::<i64>()) {
                (Ok(a), Ok(r)) => a < r,
                _ => actual != recommended,
            };
            if short {
                out.push(ConfigAdvice {
                    name: name.to_string(),
                    actual: actual.clone(),
                    recommended: recommended.to_string(),
                });
            }
        }
        Ok(out)
    }
}
